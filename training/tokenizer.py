"""The embedded model's tokenizer: byte-level BPE with newlines split off, ChatML and FIM tokens.

    python training/tokenizer.py --corpus /tmp/emb/corpus --vocab 4096 8192 --out /tmp/emb/tok

Trains one tokenizer per ``--vocab`` on the training files and prints the held-out
bytes per token (higher is better compression; bits per byte = loss / ln 2 /
bytes per token, so a model's loss can be compared across vocabularies).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def read_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Newlines are tokens of their own: merged with the next line's indentation, a prompt
    # ending in a bare "\n" is a token the model never saw, and greedy decoding then
    # repeats it. Runs of spaces (indentation) stay tokens of their own via ByteLevel's regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("\n"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json that transformers 4.x and 5.x both read."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX],
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"eos_token": EOS, "pad_token": EOS, "additional_special_tokens": config["additional_special_tokens"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def bytes_per_token(tok, texts: list[str]) -> float:
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    return sum(len(t.encode()) for t in texts) / n_tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("/tmp/emb/corpus"))
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096])
    ap.add_argument("--out", type=Path, default=Path("/tmp/emb/tok"))
    a = ap.parse_args(argv)
    train = [d["text"] for d in read_docs(a.corpus / "train.jsonl")]
    held = [d["text"] for d in read_docs(a.corpus / "held_out.jsonl")]
    results = {}
    for vocab in a.vocab:
        tok = train_tokenizer(train, vocab)
        save_tokenizer(tok, a.out / str(vocab))
        results[vocab] = round(bytes_per_token(tok, held), 4)
        print(f"vocab {vocab}: {results[vocab]} held-out bytes per token", flush=True)
    (a.out / "bytes_per_token.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
