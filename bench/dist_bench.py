"""One engine process against a 2-rank distributed engine (docs/distributed.md), on loopback.

    python -m bench.dist_bench [--model DIR] [--tokens 64] [--rounds 3] [--capacity N]
        --out bench/results/dist-cpu-embedded.json

Both through the daemon (bench/launch.py), alternating 1 and 2 ranks each round
so that a change in the machine's load hits both: a warm-up request, then one
greedy request of ``--tokens`` tokens (ignore_eos), timed by the engine's own
decode rate (``engine_decode_tok_s``) and by the client (wall, first token).
For 2 ranks, each rank's bytes handed to the ring during the timed request
(its ``status`` figures before and after) per generated token, against the size
of one token's hidden state (what a pipeline stage must pass on). Both ranks
run on this one machine: the ring is loopback TCP, and the ranks share its
cores, so the figures say what the lockstep and the pipeline cost here, not what
two machines would gain. The load average is recorded with every run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench import emit, log
from bench.launch import DaemonProcess

PROMPT = "def fibonacci(n):"


def ranks_figures(c, tokens_at_least: int, timeout: float = 30.0) -> list[dict]:
    """Each rank's figures once the stats include ``tokens_at_least`` generated tokens."""
    deadline = time.monotonic() + timeout
    while True:
        ranks = c.status().get("ranks") or []
        if ranks and ranks[0]["tokens_generated"] >= tokens_at_least or time.monotonic() > deadline:
            return ranks
        time.sleep(0.2)


def one_run(model: Path | None, ranks: int, tokens: int, capacity: int | None) -> dict:
    args = (["--ranks", str(ranks)] if ranks > 1 else []) + (["--capacity", str(capacity)] if capacity else [])
    d = DaemonProcess(model, tuple(args))
    try:
        t0 = time.monotonic()
        d.wait_ready(180)
        ready_s = time.monotonic() - t0
        load_before = os.getloadavg()
        with d.client(timeout=300) as c:
            warm = c.complete(PROMPT, max_tokens=8, temperature=0)
            before = ranks_figures(c, len(warm.token_ids)) if ranks > 1 else []
            t = time.monotonic()
            stream = c.generate(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)
            first = None
            for _ in stream:
                first = first or time.monotonic() - t
            wall = time.monotonic() - t
            n = stream.usage.get("completion_tokens", 0)
            after = ranks_figures(c, (before[0]["tokens_generated"] if before else 0) + n) if ranks > 1 else []
            run = {"ranks": ranks, "capacity": capacity, "tokens": n, "ready_s": round(ready_s, 3),
                   "engine_decode_tok_s": stream.timings.get("engine_decode_tok_s"),
                   "client_tok_s": n / wall if wall else None, "first_token_s": first,
                   "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        per_rank = []
        for b, a in zip(before, after):
            generated = a["tokens_generated"] - b["tokens_generated"]
            pipeline = a["pipeline_bytes"] - b["pipeline_bytes"]
            lockstep = a["lockstep_bytes"] - b["lockstep_bytes"]
            per_rank.append({
                "rank": a["rank"], "layers": a["layers"], "split": a["split"], "rss_bytes": a["rss_bytes"],
                "generated": generated, "activation_bytes": a["activation_bytes"],
                "pipeline_bytes_per_token": pipeline / generated if generated else None,
                "lockstep_bytes_per_token": lockstep / generated if generated else None,
                "sent_per_token_over_activation": (pipeline + lockstep) / generated / a["activation_bytes"]
                if generated and a["activation_bytes"] else None,
            })
        run["per_rank"] = per_rank
        return run
    finally:
        d.kill()


def markdown(result: dict) -> str:
    lines = [f"# 1 against 2 ranks, loopback on one machine ({result['machine']})", "",
             f"model {result['model']}, {result['tokens']} greedy tokens per run, capacity "
             f"{result['capacity'] or 'all experts'}; both ranks share this machine's cores (loopback ring).", "",
             "| round | ranks | engine tok/s | client tok/s | first token s | load avg (1 min) before/after |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["runs"]):
        tok = r["engine_decode_tok_s"]
        lines.append(f"| {i // 2 + 1} | {r['ranks']} | {tok:.1f} | {r['client_tok_s']:.1f} | {r['first_token_s']:.3f} | "
                     f"{r['loadavg_before'][0]:.2f} / {r['loadavg_after'][0]:.2f} |" if tok else f"| {i // 2 + 1} | {r['ranks']} | - | - | - | - |")
    lines += ["", "Bytes each rank handed to the ring per generated token (2 ranks), against one token's hidden state:", "",
              "| round | rank | layers | pipeline B/token | lockstep B/token | activation B | sent / activation |",
              "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(result["runs"]):
        for p in r["per_rank"]:
            lines.append(f"| {i // 2 + 1} | {p['rank']} | {p['layers'][0]}-{p['layers'][1] - 1} | "
                         f"{p['pipeline_bytes_per_token']:.0f} | {p['lockstep_bytes_per_token']:.0f} | "
                         f"{p['activation_bytes']} | {p['sent_per_token_over_activation']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded model)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--capacity", type=int, default=None, help="expert slots per layer (default: all resident)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    runs = []
    for r in range(args.rounds):
        for ranks in (1, 2):
            log(f"round {r + 1}: {ranks} rank(s)")
            runs.append(one_run(args.model, ranks, args.tokens, args.capacity))
    result = {"model": str(args.model or "embedded"), "tokens": args.tokens, "capacity": args.capacity,
              "machine": f"{os.cpu_count()} CPUs, MLX CPU backend, ring backend over loopback", "runs": runs}
    for ranks in (1, 2):
        rates = sorted(x["engine_decode_tok_s"] for x in runs if x["ranks"] == ranks and x["engine_decode_tok_s"])
        result[f"median_engine_tok_s_{ranks}"] = rates[len(rates) // 2] if rates else None
    emit(result, args.out)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
