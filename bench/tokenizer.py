"""The small tokenizers of the benchmarks' and tests' random models, written
next to the weights as mlx-lm loads them (PreTrainedTokenizerFast, chat template inlined)."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["the quick brown fox jumps over the lazy dog", "def main():\n    return 42\n",
          "hello world, experts live on disk and load on demand."] * 20


def _save(tok, out: Path, eos: str) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": "<|endoftext|>",
         "chat_template": CHAT_TEMPLATE}))


def write_tokenizer(out: Path, vocab_size: int = 320, corpus: list[str] = CORPUS,
                    extra_special_tokens: tuple = ()) -> dict:
    """A byte-level BPE tokenizer trained on ``corpus``; EOS is ``<|im_end|>``.
    ``extra_special_tokens`` (e.g. FIM markers) become added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    _save(tok, out, "<|im_end|>")
    return {"vocab_size": tok.get_vocab_size(), "eos_token_id": tok.token_to_id("<|im_end|>")}


def write_byte_tokenizer(out: Path) -> dict:
    """A byte-level tokenizer with no merges (every byte is a token) plus chat specials.

    The EOS (``<|eos|>``) has the highest id and the model's vocabulary stops
    before it: a random model never ends a benchmark run early. Every token the
    chat template writes (``<|im_start|>``, ``<|im_end|>``) is inside the
    vocabulary: an id past the embedding table is an out-of-bounds gather that
    reads whatever memory lies there, so stock and lazy runs would start from
    different garbage (NaN logits in stock, a different first token in moed).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eos|>"]
    for special in specials:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    _save(tok, out, "<|eos|>")
    return {"model_vocab": vocab["<|eos|>"], "eos_token_id": vocab["<|eos|>"]}
