"""Front-door benchmark: what the editor socket and the HTTP gateway add over protocol v1 on ZeroMQ.

    python -m bench.doors_bench --out doors.json [--model DIR] [--repeats 50] [--tokens 128]

One daemon (``--http 127.0.0.1:0``), greedy requests, client-side clocks, medians; the
doors take turns, so all see the same load on a shared machine:
- ``round_trip_us``: a request that does not touch the engine: ZeroMQ ``status``, editor
  ``status``, HTTP ``GET /v1/models`` (keep-alive connection);
- ``one_token_ms``: a whole ``max_tokens=1`` generation of a short prompt through each door
  (ZeroMQ ``Client.complete``, editor ``generate``, HTTP ``/v1/completions``);
- ``stream_decode_tok_s``: tokens per second between the first and the last streamed chunk of a
  ``tokens``-token answer through each door (ZeroMQ stream, editor ``moed_chunk``, HTTP SSE);
- ``infill_ms``: an editor ``infill`` of 16 tokens, the ghost-text request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform as pyplatform
import socket
import statistics
import sys
import time
from pathlib import Path
from bench import emit, log

import msgpack

PROMPT = "def main():"


def median(values):
    return statistics.median(values) if values else None


class Editor:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.msgid = 0

    def read(self):
        while True:
            for msg in self.unpacker:
                return msg
            self.unpacker.feed(self.sock.recv(1 << 16))

    def call(self, method: str, params: dict):
        self.msgid += 1
        self.sock.sendall(msgpack.packb([0, self.msgid, method, [params]]))
        while True:
            msg = self.read()
            if msg[0] == 1 and msg[1] == self.msgid:
                assert msg[2] is None, msg[2]
                return msg[3]

    def stream(self, params: dict) -> tuple[int, float | None, float | None]:
        rid = self.call("generate", {**params, "stream": True})["id"]
        n, first, last = 0, None, None
        while True:
            msg = self.read()
            if msg[:2] == [2, "moed_chunk"] and msg[2][0] == rid:
                last = time.perf_counter()
                first = first or last
                n += 1
            elif msg[:2] == [2, "moed_done"] and msg[2][0] == rid:
                return msg[2][1]["usage"]["completion_tokens"], first, last


class Http:
    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        from bench.launch import http_auth

        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.auth = http_auth()

    def get(self, path: str):
        self.conn.request("GET", path, headers=self.auth)
        r = self.conn.getresponse()
        return json.loads(r.read())

    def post(self, path: str, body: dict):
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **self.auth})
        r = self.conn.getresponse()
        if not body.get("stream"):
            return json.loads(r.read())
        n, first, last = 0, None, None
        for line in r:
            if line.startswith(b"data: {") and b'"text": ""' not in line:
                last = time.perf_counter()
                first = first or last
                n += 1
        return n, first, last


def timed(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, the callables taking turns so all see the same load."""
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: median(v) for name, v in samples.items()}


def rate(n: int, first, last):
    return (n - 1) / (last - first) if n > 1 and first and last and last > first else None


def run(model: Path | None = None, *, repeats: int = 50, tokens: int = 128, progress=print) -> dict:
    from bench.launch import DaemonProcess, make_tiny_model, short_tmpdir

    from moed.models import embedded_model_path

    if model is None:
        embedded = embedded_model_path()
        model = embedded if (embedded / "config.json").is_file() else make_tiny_model(short_tmpdir("moed-bench-model-") / "tiny")
    model = Path(model)
    result = {
        "benchmark": "doors",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": pyplatform.platform(), "cpus": os.cpu_count()},
        "model": str(model),
        "repeats": repeats,
        "tokens": tokens,
    }
    progress("starting moed --http")
    d = DaemonProcess(model, ("--http", "127.0.0.1:0"))
    try:
        status = d.wait_ready(600)
        editor, web = Editor(status["editor_socket"]), Http(status["http"])
        with d.client() as c:
            c.complete("warm up", max_tokens=8)
            progress("round trips")
            trips = timed({"zeromq_status": c.status, "editor_status": lambda: editor.call("status", {}),
                           "http_models": lambda: web.get("/v1/models")}, repeats)
            result["round_trip_us"] = {k: v * 1e6 for k, v in trips.items()}
            progress("one-token generations")
            one = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}
            ones = timed({"zeromq": lambda: c.complete(PROMPT, max_tokens=1), "editor": lambda: editor.call("generate", one),
                          "http": lambda: web.post("/v1/completions", one)}, repeats)
            result["one_token_ms"] = {k: v * 1e3 for k, v in ones.items()}
            progress(f"streams of {tokens} tokens")
            runs = {"zeromq": [], "editor": [], "http": []}
            for _ in range(max(3, repeats // 10)):  # the doors alternate, so all see the same load
                s = c.generate(PROMPT, max_tokens=tokens)
                n, first, last = 0, None, None
                for ch in s:
                    last = time.perf_counter()
                    first = first or last
                    n += 1
                runs["zeromq"].append(rate(n, first, last))
                runs["editor"].append(rate(*editor.stream({"prompt": PROMPT, "max_tokens": tokens})))
                runs["http"].append(rate(*web.post("/v1/completions", {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True})))
            result["stream_decode_tok_s"] = {k: median([r for r in v if r]) for k, v in runs.items()}
            progress("infill")
            fill = {"prefix": "def add(a, b):\n    return ", "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 16}
            infill = editor.call("infill", fill)
            result["infill"] = {"fim": infill["fim"], "ms": timed({"infill": lambda: editor.call("infill", fill)}, repeats)["infill"] * 1e3}
    finally:
        d.kill()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    ap.add_argument("--model", type=Path, help="model directory (default: the embedded model, else a tiny random one)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args(argv)
    result = run(args.model, repeats=args.repeats, tokens=args.tokens, progress=log)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
