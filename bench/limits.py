"""Physical limits measured in the same run as moed: disk, memory copy, IPC floor.

Every moed figure is later divided by one of these (see ``bench.__main__``),
so a number like "expert loads at 0.8 GB/s" always comes with "of 1.1 GB/s the
disk gives to plain preads".

Disk reads go around the page cache: files are opened with
``moed.platform.open_uncached`` and their cached pages dropped with
``evict_file_cache`` before each pass, and no pass reads a byte twice.
A VM's host may still cache underneath; that cannot be seen from inside.
"""

from __future__ import annotations

import mmap
import os
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from moed.platform import evict_file_cache, open_uncached

MB = 1 << 20
ALIGN = 4096


def model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in Path(model_dir).glob("*.safetensors") if p.stat().st_size > 0)


class _Files:
    """The model's shards as one address space of (fd, size), opened around the page cache."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.fds = [open_uncached(p) for p in paths]
        self.sizes = [p.stat().st_size for p in paths]
        self.evicted = all([evict_file_cache(fd) for fd in self.fds])

    def evict(self) -> None:
        for fd in self.fds:
            evict_file_cache(fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)

    def spans(self, size: int) -> list[tuple[int, int]]:
        """Every non-overlapping aligned (file index, offset) span of ``size`` bytes."""
        out = []
        for i, n in enumerate(self.sizes):
            out.extend((i, off) for off in range(0, n - size + 1, size))
        return out


def _aligned(size: int) -> memoryview:
    return memoryview(mmap.mmap(-1, size))  # anonymous maps are page-aligned


def sequential_read(files: _Files, max_bytes: int, chunk: int = 8 * MB) -> dict:
    files.evict()
    buf = _aligned(chunk)
    done = 0
    t0 = time.perf_counter()
    for fd, size in zip(files.fds, files.sizes):
        off = 0
        while off < size and done < max_bytes:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
            done += n
        if done >= max_bytes:
            break
    dt = time.perf_counter() - t0
    return {"bytes": done, "seconds": dt, "gb_s": done / dt / 1e9 if dt else None}


def random_read(files: _Files, size: int, threads: int, max_bytes: int, seed: int = 0) -> dict:
    """Preads of ``size`` bytes at random distinct aligned offsets, ``threads`` at a time."""
    spans = files.spans(size)
    if not spans:
        return {"size": size, "threads": threads, "skipped": f"model files are smaller than {size} bytes"}
    random.Random(seed).shuffle(spans)
    spans = spans[: max(1, max_bytes // size)]
    files.evict()
    local = threading.local()
    latencies = []

    def read(span):
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = _aligned(size)
        i, off = span
        t = time.perf_counter()
        os.preadv(files.fds[i], [buf], off)
        latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, spans))
    dt = time.perf_counter() - t0
    total = size * len(spans)
    return {
        "size": size,
        "threads": threads,
        "reads": len(spans),
        "bytes": total,
        "seconds": dt,
        "gb_s": total / dt / 1e9,
        "latency_ms_p50": statistics.median(latencies) * 1e3,
    }


def disk(model_dir: Path, max_bytes: int, sizes=(1 * MB, 2 * MB, 4 * MB), threads=(1, 4)) -> dict:
    paths = model_files(model_dir)
    if not paths:
        return {"error": f"no safetensors in {model_dir}"}
    files = _Files(paths)
    try:
        out = {
            "path": str(model_dir),
            "file_bytes": sum(files.sizes),
            "page_cache_evicted": files.evicted,
            "sequential": sequential_read(files, max_bytes),
            "random": [random_read(files, s, t, max_bytes) for s in sizes for t in threads],
        }
    finally:
        files.close()
    measured = [r["gb_s"] for r in out["random"] if "gb_s" in r]
    out["random_best_gb_s"] = max(measured) if measured else None
    return out


def memcpy(nbytes: int = 256 * MB, repeats: int = 5) -> dict:
    """Host memory copy bandwidth (bytes copied per second, one thread), and host->MLX array."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    out = {"bytes": nbytes, "host_copy_gb_s": nbytes / best / 1e9}
    try:
        import mlx.core as mx

        def to_mx():
            a = mx.array(src)
            mx.eval(a)

        to_mx()
        best = min(_timed(to_mx) for _ in range(repeats))
        out["host_to_mlx_gb_s"] = nbytes / best / 1e9
        out["mlx_device"] = str(mx.default_device())
    except ImportError:
        pass
    return out


def ipc_floor(round_trips: int = 2000, stream_messages: int = 20000) -> dict:
    """ZeroMQ over ipc:// with msgpack framing, as moed uses it: request/reply latency and token-stream rate."""
    import zmq

    from moed_client.protocol import chunk, pack, unpack

    ctx = zmq.Context.instance()
    tmp = tempfile.mkdtemp(prefix="moed-b-", dir="/tmp")
    addr = f"ipc://{tmp}/floor.sock"
    msg = pack(chunk("r1", " token", [1234]))
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.ROUTER_MANDATORY, 1)  # block at the high-water mark instead of dropping
    server.bind(addr)

    def serve(n_echo, n_stream):
        for _ in range(n_echo):
            ident, data = server.recv_multipart()
            server.send_multipart([ident, pack(unpack(data))])
        ident, _ = server.recv_multipart()
        for _ in range(n_stream):
            server.send_multipart([ident, msg])

    thread = threading.Thread(target=serve, args=(round_trips + 100, stream_messages), daemon=True)
    thread.start()
    client = ctx.socket(zmq.DEALER)
    client.connect(addr)
    try:
        lat = []
        for i in range(round_trips + 100):
            t = time.perf_counter()
            client.send(msg)
            unpack(client.recv())
            if i >= 100:  # warm-up
                lat.append(time.perf_counter() - t)
        client.send(msg)
        t0 = time.perf_counter()
        for _ in range(stream_messages):
            unpack(client.recv())
        dt = time.perf_counter() - t0
        thread.join()
    finally:
        client.close(linger=0)
        server.close(linger=0)
        for f in Path(tmp).iterdir():
            f.unlink()
        os.rmdir(tmp)
    lat.sort()
    return {
        "transport": "zmq ipc DEALER/ROUTER, msgpack",
        "round_trip_us_p50": lat[len(lat) // 2] * 1e6,
        "round_trip_us_p99": lat[int(len(lat) * 0.99)] * 1e6,
        "stream_msgs_per_s": stream_messages / dt,
        "stream_us_per_msg": dt / stream_messages * 1e6,
    }


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(model_dir: Path, *, smoke: bool = False) -> dict:
    small = smoke
    return {
        "disk": disk(model_dir, max_bytes=(16 if small else 1024) * MB),
        "memcpy": memcpy(nbytes=(32 if small else 512) * MB, repeats=3 if small else 5),
        "ipc": ipc_floor(round_trips=300 if small else 3000, stream_messages=3000 if small else 30000),
    }


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Measure the physical limits moed is compared against.")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    print(json.dumps(measure(args.model_dir, smoke=args.smoke), indent=2))
