"""CPU decode speed of models, measured alternately so that load on a shared machine hits them alike.

    python training/decode_speed.py moed/embedded/model OTHER_MODEL [--rounds 2]

For each round and model, 64 greedy tokens of each of quality.PROMPTS; prints the median and range
of tokens per second per model.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    import mlx_lm

    from quality import PROMPTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args(argv)
    loaded = {path: mlx_lm.load(path) for path in a.models}
    rates = {path: [] for path in loaded}
    for _ in range(a.rounds):
        for path, (model, tokenizer) in loaded.items():
            for prompt in PROMPTS.values():
                t0 = time.perf_counter()
                n = sum(1 for _ in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=a.tokens))
                rates[path].append(n / (time.perf_counter() - t0))
    for path, r in rates.items():
        print(f"{path}: median {statistics.median(r):.0f} tok/s, range {min(r):.0f}-{max(r):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
