"""Prefill at partial residency, and prefill beside other streams, against physical limits (issue 16).

    python -m bench.prefill_bench --model mixtral=DIR --model qwen3-next=DIR [--prompt-tokens 256]
        [--gap-model DIR --gap-prompts 8000,28000 --gap-tokens 64] --out bench/results/prefill.json

For each model and residency (100/50/25% of each layer's experts) a fresh
process loads the model, the page cache is dropped (as root: drop_caches;
else per shard), and the engine (moed/engine/batch.py: chunked prefill, chunk
length by time; expert-major layers, moed/experts/streaming.py) is timed from
submit to the first token of a random prompt. Beside it:

- stock: mlx-lm with every weight in memory, the same prompt, warm: the compute time;
- the disk-bound limit: bytes of the distinct routed experts / measured
  sequential read bandwidth (one shard read cold in 8 MiB reads), per chunk
  summed (each chunk must read the experts it routes to that are not
  resident) and for the whole prompt (what one chunk of it all would read);
- bytes read during the prefill against those distinct experts' bytes;
- ``ttft / (limit + stock compute)``: the issue's target is <= 1.5 at 25%.

The gap section starts a daemon on ``--gap-model`` (one message per token) and
streams ``--gap-tokens`` tokens alone, then again while another client sends
long prompts one after another: p99 inter-token gap against the solo p99
(target: <= 2x solo + 300 ms). JSON to --out, markdown next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import emit, log

REPO = Path(__file__).resolve().parent.parent
SHARES = (1.0, 0.5, 0.25)


def drop_caches(model_dir: Path) -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        from moed.platform import drop_file_cache

        return "fadvise" if all([drop_file_cache(p) for p in Path(model_dir).glob("*.safetensors")]) else "none"


def sequential_read_gb_s(model_dir: Path, most: int = 1 << 30) -> dict:
    """Cold sequential read of the largest shard, 8 MiB at a time."""
    shard = max(Path(model_dir).glob("*.safetensors"), key=lambda p: p.stat().st_size)
    how = drop_caches(model_dir)
    done, t0 = 0, time.perf_counter()
    with open(shard, "rb", buffering=0) as f:
        while done < most and (n := len(f.read(8 << 20))):
            done += n
    dt = time.perf_counter() - t0
    return {"file": shard.name, "bytes": done, "seconds": dt, "gb_s": done / dt / 1e9, "cache": how}


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


# -- one configuration, in its own process -----------------------------------------

def child_stock(spec: dict) -> dict:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, _ = mlx_lm.load(spec["model_dir"])
    mx.eval(model.parameters())
    ids = prompt_ids(model.args.vocab_size, spec["prompt_tokens"], spec["seed"])
    times = []
    for _ in range(2):  # the first run warms up; the faster counts
        t0 = time.perf_counter()
        token, _ = next(generate_step(mx.array(ids), model, max_tokens=1))
        times.append(time.perf_counter() - t0)
    return {"ttft_s": min(times), "runs_s": times, "first_token": int(token)}


def child_lazy(spec: dict) -> dict:
    from moed.channel import EngineOptions, Submit
    from moed.engine.batch import Engine
    from moed.experts import load_model

    model_dir = Path(spec["model_dir"])
    cfg = json.loads((model_dir / "config.json").read_text())
    experts = cfg.get("num_experts") or cfg["num_local_experts"]
    cap = max(1, int(experts * spec["share"]))
    model, tok, manager = load_model(model_dir, capacity=cap, prefetch=False, profile=None)
    routed: dict[tuple[int, int], set] = {}  # (forward, layer) -> experts routed to
    for cache in manager.caches:
        record = cache.record

        def logged(needed, count_stats=True, _record=record, _layer=cache.layer):
            routed.setdefault((manager.forward_id, _layer), set()).update(int(e) for e in needed)
            return _record(needed, count_stats)

        cache.record = logged
    opts = EngineOptions(max_context=spec["prompt_tokens"] + 8, prefill_chunk_ms=spec["chunk_ms"])
    engine = Engine(model, tok, manager, opts)
    vocab = model.args.vocab_size

    def first_token(seq: int, ids: list[int]) -> int:
        engine.submit(Submit.from_map(dict(seq=seq, token_ids=ids, max_tokens=1, temperature=0.0, top_p=1.0, min_p=0.0,
                                           top_k=0, ignore_eos=True)), ids)
        while True:
            for ev in engine.step():
                if ev["token_ids"]:
                    return ev["token_ids"][0]

    first_token(0, prompt_ids(vocab, 8, spec["seed"] + 1))  # warm-up (MLX's first run is slow), as stock's
    routed.clear()
    ids = prompt_ids(vocab, spec["prompt_tokens"], spec["seed"])
    before = manager.stats()["bytes_read"]
    cache_drop = drop_caches(model_dir)
    t0 = time.perf_counter()
    first = first_token(1, ids)
    ttft = time.perf_counter() - t0
    stats = manager.stats()
    per_expert = manager.caches[0].expert_bytes
    forwards = sorted({f for f, _ in routed})
    by_layer: dict[int, set] = {}
    for (_, layer), es in routed.items():
        by_layer.setdefault(layer, set()).update(es)
    manager.close()
    return {"capacity": cap, "ttft_s": ttft, "first_token": int(first), "cache_drop": cache_drop,
            "bytes_read": stats["bytes_read"] - before, "expert_bytes": per_expert, "forwards": len(forwards),
            "distinct_bytes_per_chunk_sum": sum(len(es) for es in routed.values()) * per_expert,
            "distinct_bytes_whole_prompt": sum(len(es) for es in by_layer.values()) * per_expert,
            "expert_wait_s": stats["expert_wait_s"], "stream": stats["prefill_stream"],
            "chunks": engine.chunk_clock.stats()}


def run_child(kind: str, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.prefill_bench", "--child", kind, json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(name: str, model_dir: Path, prompt_tokens: int, chunk_ms: float, seed: int) -> dict:
    spec = {"model_dir": str(model_dir), "prompt_tokens": prompt_tokens, "seed": seed, "chunk_ms": chunk_ms}
    disk = sequential_read_gb_s(model_dir)
    log(f"{name}: sequential read {disk['gb_s']:.2f} GB/s")
    stock = run_child("stock", spec)
    log(f"{name}: stock {stock}")
    out = {"model_dir": str(model_dir), "prompt_tokens": prompt_tokens, "disk": disk, "stock": stock, "residency": {}}
    for share in SHARES:
        r = run_child("lazy", dict(spec, share=share))
        if "error" not in r:
            bw = disk["gb_s"] * 1e9
            r["limit_s"] = r["distinct_bytes_per_chunk_sum"] / bw
            r["limit_whole_prompt_s"] = r["distinct_bytes_whole_prompt"] / bw
            compute = stock.get("ttft_s", 0.0)
            r["ttft_vs_limit_plus_compute"] = r["ttft_s"] / (r["limit_s"] + compute) if share < 1 else None
            r["ttft_vs_whole_prompt_limit_plus_compute"] = r["ttft_s"] / (r["limit_whole_prompt_s"] + compute) if share < 1 else None
            r["ttft_vs_stock"] = r["ttft_s"] / compute if compute else None
            r["bytes_vs_distinct_per_chunk"] = (r["bytes_read"] / r["distinct_bytes_per_chunk_sum"]
                                                if share < 1 and r["distinct_bytes_per_chunk_sum"] else None)
            r["exact_first_token"] = r["first_token"] == stock.get("first_token")
        log(f"{name} {int(share * 100)}%: {r}")
        out["residency"][str(int(share * 100))] = r
    return out


# -- inter-token gaps beside long prompts ----------------------------------------------

def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def stream_gaps(d, n: int) -> list[float]:
    with d.client(timeout=600) as c:
        stamps = []
        for ch in c.generate(token_ids=[5, 6, 7, 8], max_tokens=n, ignore_eos=True):
            stamps += [time.perf_counter()] * max(1, len(ch.token_ids))
    return [b - a for a, b in zip(stamps, stamps[1:])]  # from the first token on: the wait for it is TTFT


def bench_gaps(model_dir: Path, prompts: list[int], tokens: int, chunk_ms: float, serve_args: tuple = ()) -> dict:
    from bench.launch import DaemonProcess

    ctx = max(prompts) + 64
    d = DaemonProcess(model_dir, ("--stream-interval", "0", "--max-context", str(ctx), "--prefill-chunk-ms", str(chunk_ms),
                                  "--no-editor", "--debug", *serve_args))  # --debug: the engine logs every chunk and decode step
    try:
        d.wait_ready(timeout=600)
        load_before = os.getloadavg()
        stream_gaps(d, 8)  # warm-up
        time.sleep(1.2)  # the engine's stats reach the front once a second
        with d.client(timeout=60) as c:
            calibration = (c.status().get("prefill") or {}).get("calibration")
        solo = stream_gaps(d, tokens)
        stop = threading.Event()
        sent = []

        def long_prompts():
            with d.client(timeout=900) as c:
                vocab = 250
                i = 0
                while not stop.is_set():
                    n = prompts[i % len(prompts)]
                    t0 = time.perf_counter()
                    with c.generate(token_ids=prompt_ids(vocab, n, 1000 + i), max_tokens=1) as s:
                        for _ in s:
                            if stop.is_set():
                                break
                    sent.append({"tokens": n, "seconds": time.perf_counter() - t0, "done": not stop.is_set()})
                    i += 1

        t = threading.Thread(target=long_prompts, daemon=True)
        t.start()
        time.sleep(1.0)  # the first long prompt is being prefilled
        busy = stream_gaps(d, tokens)
        stop.set()
        t.join(timeout=60)  # a long prompt still being fed goes with the daemon
        out = {"solo_p99_s": p99(solo), "solo_median_s": statistics.median(solo),
               "busy_p99_s": p99(busy), "busy_median_s": statistics.median(busy), "busy_max_s": max(busy),
               "long_prompts": sent, "prompt_lengths": prompts, "tokens": tokens, "calibration": calibration,
               "chunks": engine_timeline(d.log_text(), chunk_ms), "chunk_target_ms": chunk_ms, "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
        out["busy_p99_vs_target"] = out["busy_p99_s"] / (2 * out["solo_p99_s"] + 0.3)
        return out
    finally:
        d.kill()


CHUNK_LINE = re.compile(r"prefill chunk of (\d+) tokens at (\d+), ([\d.]+) ms \(([\d.]+) ms waiting")
DECODE_LINE = re.compile(r"decode step: \d+ events, ([\d.]+) ms")


def engine_timeline(log_text: str, target_ms: float) -> dict:
    """The engine's own clock (its --debug log): prefill chunks and decode steps, as the gaps' causes."""
    chunks = [(int(n), int(c), float(ms), float(disk)) for n, c, ms, disk in CHUNK_LINE.findall(log_text)]
    decodes = sorted(float(ms) for ms in DECODE_LINE.findall(log_text))
    ms = sorted(c[2] for c in chunks)
    q = lambda xs, f: xs[min(len(xs) - 1, int(f * (len(xs) - 1)))] if xs else None  # noqa: E731
    return {"chunks": len(chunks), "chunk_ms_p50": q(ms, 0.5), "chunk_ms_p99": q(ms, 0.99), "chunk_ms_max": q(ms, 1.0),
            "chunks_over_target_x1_5": sum(m > 1.5 * target_ms for m in ms), "decode_ms_p50": q(decodes, 0.5),
            "decode_ms_p99": q(decodes, 0.99), "longest_chunks": sorted(chunks, key=lambda c: -c[2])[:5],
            "tokens_at_deepest_context": max(chunks, key=lambda c: c[1])[:3] if chunks else None}


def markdown(result: dict) -> str:
    lines = [f"# Prefill benchmark ({result['started']}, {result['machine']})", ""]
    for name, m in result["models"].items():
        st = m["stock"]
        lines += [f"## {name}: {m['prompt_tokens']}-token prompt; sequential read {m['disk']['gb_s']:.2f} GB/s; "
                  f"stock compute {st.get('ttft_s', float('nan')):.2f} s", "",
                  "| residency | TTFT s | limit s (per chunk / whole prompt) | TTFT / (limit + stock) | bytes read / distinct | "
                  "forwards | exact |", "|---|---|---|---|---|---|---|"]
        for share, r in m["residency"].items():
            if "error" in r:
                lines.append(f"| {share}% | error: {r['error'][-200:]!r} | | | | | |")
                continue
            f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"| {share}% | {r['ttft_s']:.2f} | {f(r['limit_s'])} / {f(r['limit_whole_prompt_s'])} | "
                         f"{f(r['ttft_vs_limit_plus_compute'])} | {f(r['bytes_vs_distinct_per_chunk'])} | "
                         f"{r['forwards']} | {r['exact_first_token']} |")
        lines.append("")
    g = result.get("gaps")
    if g:
        lines += ["## Inter-token gap beside long prompts", "",
                  f"solo p99 {g['solo_p99_s'] * 1e3:.0f} ms, beside {g['prompt_lengths']}-token prompts p99 "
                  f"{g['busy_p99_s'] * 1e3:.0f} ms (max {g['busy_max_s'] * 1e3:.0f} ms); p99 / (2 x solo + 300 ms) = "
                  f"{g['busy_p99_vs_target']:.2f}", ""]
        t = g.get("chunks") or {}
        if t.get("chunks"):
            lines += [f"engine clock: {t['chunks']} prefill chunks, p50 {t['chunk_ms_p50']:.0f} ms, p99 "
                      f"{t['chunk_ms_p99']:.0f} ms, max {t['chunk_ms_max']:.0f} ms ({t['chunks_over_target_x1_5']} over 1.5 x {g['chunk_target_ms']:.0f} ms); "
                      f"decode steps p50 {t['decode_ms_p50']:.1f} ms, p99 {t['decode_ms_p99']:.1f} ms; load average "
                      f"{g['load_avg_before'][0]:.1f} before, {g['load_avg_after'][0]:.1f} after; calibration at start "
                      f"{g.get('calibration')}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--chunk-ms", type=float, default=250.0)
    ap.add_argument("--gap-model", type=Path)
    ap.add_argument("--gap-prompts", default="8000,28000")
    ap.add_argument("--gap-tokens", type=int, default=64)
    ap.add_argument("--gap-serve-args", default="", help="more `moed serve` flags for the gap daemon, e.g. '--capacity 128'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print(json.dumps({"stock": child_stock, "lazy": child_lazy}[kind](json.loads(spec))))
        return 0
    import platform

    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}", "models": {}}
    for spec in args.model:
        name, _, path = spec.partition("=")
        result["models"][name] = bench_model(name, Path(path), args.prompt_tokens, args.chunk_ms, args.seed)
    if args.gap_model:
        result["gaps"] = bench_gaps(args.gap_model, [int(x) for x in args.gap_prompts.split(",")], args.gap_tokens,
                                    args.chunk_ms, tuple(args.gap_serve_args.split()))
        result["gaps"]["serve_args"] = args.gap_serve_args
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["load_avg_end"] = os.getloadavg()
    md = markdown(result)
    emit(result, args.out)
    if args.out:
        args.out.with_suffix(".md").write_text(md + "\n")
    print(md, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
