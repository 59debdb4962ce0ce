"""Per-token cost of constrained decoding (llguidance through moed/engine/structured.py), JSON out.

    python -m bench.structured_bench [--model DIR] [--tokens N] [--rounds R] [--out FILE]

In process, greedy, through mlx-lm's ``generate_step``: tokens/s without a constraint and with
``response_format`` json_schema, alternating rounds (the machine is shared), and the time spent
inside the processor itself per token: reading the sampled token (which waits for it: the one
sync a constraint needs), llguidance's mask, and building the masking op (MLX runs it lazily).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

# Long enough to keep a model busy: an object of string values (ends when the model closes it).
SCHEMA = {"type": "object", "additionalProperties": {"type": "string"}}


def decode(model, prompt, n: int, processors) -> tuple[int, float]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    t0, count = time.perf_counter(), 0
    for _ in generate_step(mx.array(prompt), model, max_tokens=n, logits_processors=processors):
        count += 1
    return count, time.perf_counter() - t0


class Timed:
    def __init__(self, proc):
        self.proc, self.seconds, self.calls = proc, 0.0, 0

    def __call__(self, tokens, logits):
        t0 = time.perf_counter()  # no eval here: that would time the model's forward too
        out = self.proc(tokens, logits)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def main(argv=None) -> int:
    import llguidance
    import mlx.core as mx
    import mlx_lm

    from moed.engine.structured import Grammars
    from moed.models import embedded_model_path
    from moed_client import protocol as P

    p = argparse.ArgumentParser(prog="python -m bench.structured_bench")
    p.add_argument("--model", type=Path, default=embedded_model_path())
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    model, tokenizer = mlx_lm.load(str(args.model))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Give me a JSON object."}], add_generation_prompt=True)
    grammars = Grammars(tokenizer, model.args.vocab_size)
    request = P.parse_generate({"id": "b", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "schema": SCHEMA}})
    t0 = time.perf_counter()
    grammars.processor(request)  # the first builds llguidance's tokenizer
    first_build = time.perf_counter() - t0
    decode(model, prompt, 8, None)  # warm-up
    plain, constrained, inside = [], [], []
    for _ in range(args.rounds):
        n, s = decode(model, prompt, args.tokens, None)
        plain.append(s / n)
        t0 = time.perf_counter()
        proc = Timed(grammars.processor(request))
        build = time.perf_counter() - t0
        n, s = decode(model, prompt, args.tokens, [proc])
        constrained.append(s / n)
        inside.append(proc.seconds / max(proc.calls, 1))
    result = {
        "bench": "structured", "model": str(args.model), "vocab_size": model.args.vocab_size, "tokens": args.tokens, "rounds": args.rounds,
        "llguidance": llguidance.__version__ if hasattr(llguidance, "__version__") else None, "mlx": mx.__version__,
        "machine": platform.machine(), "processor_first_build_s": first_build, "processor_build_s": build,
        "plain_ms_per_token": [1e3 * x for x in plain], "constrained_ms_per_token": [1e3 * x for x in constrained],
        "processor_ms_per_token": [1e3 * x for x in inside],
        "median_overhead_ms_per_token": 1e3 * (statistics.median(constrained) - statistics.median(plain)),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
