"""What it costs to put an expert into a slot the device has been reading.

    python -m bench.slot_write --out slot_write.json [--expert-mb 1.77] [--slots 64] [--repeats 16]

A load (cache.py) writes an expert's bytes from the CPU straight into a slot of a
device array. On unified memory (Apple silicon) that is ordinary memory. MLX's
CUDA backend allocates managed memory, where a CPU write to pages the GPU
touched last moves them to the host, and the GPU's next read moves them back:
costs no CPU backend shows. Per expert, medians over ``repeats`` slots:

- ``host_copy_ms``: copying the bytes into a host buffer (the floor);
- ``slot_write_ms``: the same copy into a slot the device read just before;
- ``read_after_write_ms`` against ``steady_read_ms``: a device op that reads every
  slot, right after one slot was written, and with nothing written before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def measure(expert_bytes: int, slots: int, repeats: int) -> dict:
    import mlx.core as mx
    import numpy as np

    words = expert_bytes // 4
    stack = mx.random.randint(0, 1 << 30, (slots, words), dtype=mx.uint32)
    mx.eval(stack)
    view = np.frombuffer(stack, dtype=np.uint32).reshape(slots, words)  # as LayerCache's views
    source = np.random.default_rng(0).integers(0, 1 << 30, words, dtype=np.uint32)
    host = np.empty_like(source)

    def read_all() -> float:
        t = time.perf_counter()
        mx.eval(mx.max(stack, axis=1))
        return time.perf_counter() - t

    for _ in range(3):  # warm-up: kernels compiled, every page where the device reads it
        read_all()
    host_copy, write, after, steady = [], [], [], []
    for i in range(repeats):
        t = time.perf_counter()
        np.copyto(host, source)
        host_copy.append(time.perf_counter() - t)
        steady.append(read_all())
        t = time.perf_counter()
        np.copyto(view[i % slots], source)
        write.append(time.perf_counter() - t)
        after.append(read_all())
        if not np.array_equal(np.array(stack[i % slots]), source):  # the device must read what was written
            raise RuntimeError("a slot write through the host view did not reach the device array")
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    out = {"expert_bytes": words * 4, "slots": slots, "repeats": repeats, "device": str(mx.default_device()),
           "host_copy_ms": med(host_copy), "slot_write_ms": med(write),
           "steady_read_ms": med(steady), "read_after_write_ms": med(after)}
    out["write_vs_host_copy"] = out["slot_write_ms"] / out["host_copy_ms"] if out["host_copy_ms"] else None
    out["extra_read_ms"] = out["read_after_write_ms"] - out["steady_read_ms"]
    out["write_gb_s"] = out["expert_bytes"] / out["slot_write_ms"] / 1e6 if out["slot_write_ms"] else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    ap.add_argument("--expert-mb", type=float, default=1.77, help="bytes per expert, in MB (qwen3-next 4-bit: 1.77)")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=16)
    args = ap.parse_args(argv)
    result = measure(int(args.expert_mb * 1e6), args.slots, args.repeats)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
