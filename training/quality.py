"""Measure the embedded model against issue 21's quality targets.

    python training/quality.py [--model moed/embedded/model] [--corpus /tmp/emb/corpus] [--json]

- held-out loss (nats per token) on fixed windows of the held-out files, and bits per byte;
- for each of PROMPTS, 64 greedy tokens: distinct 4-gram ratio (target >= 0.6) and whether the
  prompt plus the continuation, trimmed to its last complete line, parses as Python;
- fill-in-the-middle: each of FIM_CASES infilled (greedy, stop at eos), and whether
  prefix + infill + suffix parses.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {
    "function": "def fibonacci(n):\n",
    "class": "class Stack:\n",
    "import and function": "import os\n\n\ndef list_files(path):\n",
    "loop": "total = 0\nfor i in range(10):\n",
}
FIM_CASES = [
    ("def add(a, b):\n", "\n\nprint(add(1, 2))\n"),
    ("def is_even(n):\n    ", "\n\n\nfor i in range(4):\n    print(is_even(i))\n"),
]
TARGETS = {"held_out_loss": 2.5, "distinct_4gram": 0.6}


def distinct_ngram_ratio(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def trimmed(prompt: str, continuation: str) -> str:
    """The prompt plus the continuation up to its last complete line."""
    text = prompt + continuation
    return text[: text.rfind("\n") + 1] if "\n" in continuation else prompt


def held_out_loss(model, tokenizer, corpus: Path, windows: int, context: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    with open(corpus / "held_out.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    eos = tokenizer.eos_token_id
    ids = []
    for t in texts:
        ids.extend(tokenizer.encode(t))
        ids.append(eos)
    stream = np.array(ids, dtype=np.int32)
    n_bytes = sum(len(t.encode()) + 1 for t in texts)
    step = (len(stream) - context - 1) // windows
    total, count = 0.0, 0
    for i in range(windows):
        w = mx.array(stream[i * step : i * step + context + 1])[None]
        logits = model(w[:, :-1]).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, w[:, 1:], reduction="sum").item()
        count += context
    loss = total / count
    return {"nats_per_token": loss, "bits_per_byte": loss / math.log(2) * len(stream) / n_bytes,
            "bytes_per_token": n_bytes / len(stream), "tokens": count}


def greedy(model, tokenizer, prompt: str, tokens: int) -> list[int]:
    from mlx_lm import stream_generate

    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=tokens)]


def generations(model, tokenizer, tokens: int = 64) -> dict:
    out = {}
    for name, prompt in PROMPTS.items():
        # Decoded whole: mlx-lm's streaming detokenizer drops the first token's leading space,
        # which would unindent the first line.
        ids = greedy(model, tokenizer, prompt, tokens)
        text = tokenizer.decode(ids)
        out[name] = {"prompt": prompt, "continuation": text, "distinct_4gram": distinct_ngram_ratio(ids),
                     "parses": parses(trimmed(prompt, text))}
    return out


def infills(model, tokenizer, tokens: int = 48) -> list[dict]:
    out = []
    for before, after in FIM_CASES:
        prompt = f"<|fim_prefix|>{before}<|fim_suffix|>{after}<|fim_middle|>"
        middle = tokenizer.decode(greedy(model, tokenizer, prompt, tokens))
        out.append({"before": before, "after": after, "middle": middle, "parses": parses(before + middle + after)})
    return out


def measure(model, tokenizer, corpus: Path, windows: int = 48, context: int = 512) -> dict:
    gens = generations(model, tokenizer)
    return {
        "held_out": held_out_loss(model, tokenizer, corpus, windows, context) if (corpus / "held_out.jsonl").is_file() else None,
        "generations": gens,
        "fim": infills(model, tokenizer),
        "min_distinct_4gram": min(g["distinct_4gram"] for g in gens.values()),
        "parsing": sum(g["parses"] for g in gens.values()),
    }


def main(argv=None) -> int:
    import mlx_lm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "moed" / "embedded" / "model")
    ap.add_argument("--corpus", type=Path, default=Path("/tmp/emb/corpus"))
    a = ap.parse_args(argv)
    model, tokenizer = mlx_lm.load(str(a.model))
    print(json.dumps(measure(model, tokenizer, a.corpus), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
