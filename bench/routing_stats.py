"""Per-layer routing statistics of a model as JSON (default: the embedded model).

    python -m bench.routing_stats [--model PATH] [--tokens 256]

Texts are the sources of a few standard-library modules, cut to --tokens
tokens each; the statistics come from moed.routing.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json

DEFAULT_MODULES = ["heapq", "fractions", "textwrap", "json.decoder", "string", "bisect", "shlex", "colorsys"]


def markdown(stats: dict) -> str:
    rows = ["| layer | experts | top-k | tokens | normalized entropy | top-25% share | token-to-token reuse (uniform) |", "|---|---|---|---|---|---|---|"]
    for l in stats["layers"]:
        rows.append(
            f"| {l['layer']} | {l['experts']} | {l['top_k']} | {l['tokens']} | {l['normalized_entropy']:.3f} "
            f"| {l['top25_share']:.3f} | {l['token_reuse']:.3f} ({l['uniform_reuse']:.3f}) |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per text")
    ap.add_argument("--modules", nargs="+", default=DEFAULT_MODULES, help="stdlib modules whose sources are the texts")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON")
    a = ap.parse_args(argv)

    import mlx_lm

    from moed.models import resolve_model
    from moed.experts.routing import text_statistics

    model, tokenizer = mlx_lm.load(str(resolve_model(a.model)))
    texts = [inspect.getsource(importlib.import_module(m)) for m in a.modules]
    stats = text_statistics(model, tokenizer, texts, max_tokens=a.tokens)
    stats["texts"] = {"modules": a.modules, "tokens_each": a.tokens}
    print(markdown(stats) if a.markdown else json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
