"""The peers moed is measured against, in the same run, on the same model and prompts.

- ``stock``: mlx-lm in a fresh process with every weight resident
  (``mlx_lm.load`` + ``mlx_lm.stream_generate``): load time, time to first
  token, decode tok/s, peak memory. The ceiling for one stream.
- ``server``: mlx-lm's own HTTP server (``python -m mlx_lm server``) on
  loopback, with 1, 2, 4, 8 concurrent streaming clients on
  ``/v1/completions``: the shared-service peer of the moed daemon.

Greedy decoding everywhere; decode tok/s = (tokens - 1) / (last token time -
first token time), as in ``bench.daemon_bench``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.daemon_bench import median, prompt, rate, together

REPO = Path(__file__).resolve().parent.parent
# Fewer tokens than this make (n - 1) / (last - first) measure chunking, not decoding: no rate then.
MIN_RATE_TOKENS = 8


def steady_rate(n: int, first, last) -> float | None:
    return rate(n, first, last) if first and n >= MIN_RATE_TOKENS else None


# -- stock mlx-lm, in process ------------------------------------------------

def stock_one(model_dir: str, prompts: list[str], tokens: int) -> dict:
    """Runs inside the child process: load everything, warm up, time each prompt."""
    import mlx.core as mx
    import mlx_lm

    from moed.platform import process_rss_bytes

    t0 = time.perf_counter()
    model, tokenizer = mlx_lm.load(model_dir)
    load_s = time.perf_counter() - t0
    for p in prompts:  # first use of each shape compiles kernels (NVRTC on CUDA): keep it out of the clock
        mlx_lm.generate(model, tokenizer, p, max_tokens=4)
    runs = []
    for p in prompts:
        t = time.perf_counter()
        first = last = None
        n = 0
        for _ in mlx_lm.stream_generate(model, tokenizer, p, max_tokens=tokens):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
        runs.append({"tokens": n, "ttft_s": first - t, "decode_tok_s": steady_rate(n, first, last)})
    return {
        "load_s": load_s,
        "ttft_s": median(r["ttft_s"] for r in runs),
        "decode_tok_s": median(r["decode_tok_s"] for r in runs),
        "runs": runs,
        "peak_device_bytes": mx.get_peak_memory(),
        "rss_bytes": process_rss_bytes(),
        "device": str(mx.default_device()),
    }


def stock(model_dir: Path, *, prompts: list[str], tokens: int, timeout: float = 1800) -> dict:
    """``stock_one`` in a fresh process, so its memory and load time are its own."""
    spec = json.dumps({"model_dir": str(model_dir), "prompts": prompts, "tokens": tokens})
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.peers", "--stock", spec], capture_output=True, text=True,
                              cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stock mlx-lm did not finish in {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- mlx-lm's HTTP server ------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlxServer:
    """``python -m mlx_lm server`` on a loopback port, killed with its process group on close."""

    def __init__(self, model_dir: Path, max_batch: int = 8):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--decode-concurrency", str(max_batch), "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx_lm server exited with {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"mlx_lm server did not answer in {timeout} s")

    def complete(self, text: str, tokens: int, timeout: float = 600) -> dict:
        """One streaming completion; client-side times of the first and last token chunks."""
        body = json.dumps({"prompt": text, "max_tokens": tokens, "temperature": 0.0, "stream": True,
                           "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"mlx_lm server answered {resp.status}: {resp.read()[:500]!r}")
        first = last = None
        chunks = 0
        usage = {}
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices") or []):
                first = first or now
                last = now
                chunks += 1
        conn.close()
        n = usage.get("completion_tokens", chunks)
        return {"tokens": n, "ttft_s": first - t0 if first else None, "end": time.perf_counter(),
                "decode_tok_s": steady_rate(chunks, first, last)}

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
        self.proc.wait()


def _concurrent(server: MlxServer, n: int, tokens: int, offset: int) -> dict:
    results = [None] * n

    def client(i, ready):
        ready()
        results[i] = server.complete(prompt(offset + i), tokens)

    t0 = together(n, client)
    if any(r is None for r in results):
        raise RuntimeError("a client of the mlx_lm server failed")
    wall = max(r["end"] for r in results) - t0
    total = sum(r["tokens"] for r in results)
    return {"aggregate_tok_s": total / wall, "tokens": total, "ttft_s": median(r["ttft_s"] for r in results),
            "per_client_decode_tok_s": median(r["decode_tok_s"] for r in results)}


def server(model_dir: Path, *, tokens: int, repeats: int, concurrency=(1, 2, 4, 8), load_timeout: float = 1800,
           progress=print) -> dict:
    srv = MlxServer(model_dir, max_batch=max(concurrency))
    try:
        srv.wait_ready(60)
        t0 = time.perf_counter()
        srv.complete("warm up", 4, timeout=load_timeout)  # the server loads the model on the first request
        out = {"first_request_s": time.perf_counter() - t0, "runs": []}
        offset = 2000
        for n in concurrency:
            progress(f"mlx_lm server: {n} concurrent clients")
            _concurrent(srv, n, 4, offset)  # untimed: a new batch size compiles kernels on first use
            offset += n
            samples = []
            for _ in range(repeats):
                samples.append(_concurrent(srv, n, tokens, offset))
                offset += n
            out["runs"].append({"clients": n, **{k: median(s[k] for s in samples) for k in samples[0]}})
        return out
    except Exception as e:  # the peer failing is a result to report, not a reason to lose the others
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        srv.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--stock":
        print(json.dumps(stock_one(**json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m bench peers are run by `python -m bench`")
