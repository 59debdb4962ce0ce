"""``python -m bench.integrity_cost``: what checking each expert read against the manifest
(moed/integrity.py) costs in decode, at a residency (default 50%), paired in one process.

Each round loads the model fresh twice, once with the Reader's check on and once off (in a
random order), and decodes the same prompts greedily; page cache warm, so reads are as fast
as they get and the hash's share is at its largest. Prints JSON: the paired decode ratio, and
the check's own time as a share of decode (``stats.on.verify_share_of_decode``), which
resolves a small cost where paired runs on a shared machine cannot.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def decode_tps(model_dir: Path, capacity: int, verify: bool, prompts: list[str], tokens: int) -> tuple[list[float], dict]:
    import mlx.core as mx

    from moed.experts import load_model
    from moed.experts.decode import generate

    model, tok, manager = load_model(model_dir, capacity=capacity, prefetch=False, profile=None, warm_start=False)
    spent = {"verify_s": 0.0, "verify_calls": 0, "verified_bytes": 0}
    manifest = manager.reader.manifest
    if not verify:
        manager.reader.manifest = None
    else:  # the check's own time, which paired runs on a shared machine cannot resolve when it is small
        check = manifest.verify

        def timed(file, offset, nbytes, data):
            t = time.perf_counter()
            check(file, offset, nbytes, data)
            spent["verify_s"] += time.perf_counter() - t
            spent["verify_calls"] += 1
            spent["verified_bytes"] += nbytes

        manifest.verify = timed
    out, decoding = [], 0.0
    try:
        for p in prompts:
            t, n = None, 0
            for _ in generate(mx.array(tok.encode(p)), model, manager, max_tokens=tokens):
                t = t or time.perf_counter()
                n += 1
            decoding += time.perf_counter() - t
            out.append((n - 1) / (time.perf_counter() - t))
        stats = manager.stats()
    finally:
        manager.close()
    if verify:
        spent["verify_share_of_decode"] = spent["verify_s"] / decoding
    return out, {"hit_rate": stats.get("hit_rate"), "bytes_read": stats.get("bytes_read"), **spent}


def main(argv=None) -> int:
    from bench.experts_bench import experts_per_layer, synthetic_checkpoint

    ap = argparse.ArgumentParser(prog="python -m bench.integrity_cost")
    ap.add_argument("--model", type=Path, help="model dir (default: a synthetic 4-bit Qwen3-MoE in --synth-dir)")
    ap.add_argument("--synth-dir", type=Path, default=Path("bench/out/synth-integrity"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--residency", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    model = args.model or synthetic_checkpoint(args.synth_dir, layers=args.layers, progress=lambda *a: None)
    capacity = max(1, round(experts_per_layer(model) * args.residency))
    prompts = ["the quick brown fox", "def main():", "1 2 3 4 5"]
    decode_tps(model, capacity, True, prompts[:1], 4)  # builds the manifest, warms the page cache
    rng, tps, stats = random.Random(0), {"on": [], "off": []}, {}
    for _ in range(args.rounds):
        for name in rng.sample(["on", "off"], 2):
            got, stats[name] = decode_tps(model, capacity, name == "on", prompts, args.tokens)
            tps[name] += got
    ratio = [a / b for a, b in zip(tps["on"], tps["off"])]  # paired: same round, same prompt
    print(json.dumps({"model": str(model), "capacity": capacity, "residency": args.residency, "tokens": args.tokens,
                      "decode_tps_on": statistics.median(tps["on"]), "decode_tps_off": statistics.median(tps["off"]),
                      "median_ratio_on_over_off": statistics.median(ratio), "ratios": ratio, "stats": stats}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
