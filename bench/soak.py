"""Soak: many clients, cancels and client deaths against one daemon; nothing may be lost.

    python -m bench.soak --requests 10000 --clients 16 --out soak.json
    python -m bench.soak --socket /run/user/1000/moed/moed.sock ...   # an already running daemon

Each client is a worker process of its own, on one of the daemon's doors:
most speak raw protocol v1 on the ZeroMQ socket (not ``moed_client.Client``,
which hides late messages of a request it gave up on), a fifth each use the
HTTP gateway (``/v1/completions`` and ``/v1/chat/completions``, SSE and plain
JSON) and the editor socket (msgpack-rpc, streamed and plain) when the daemon
has them open. The driver checks the contract itself: every request ends with
exactly one final (``done``/``error``, an HTTP finish or error, a ``moed_done``
or response) and nothing follows it. Client ids collide on purpose (every
ZeroMQ worker numbers its requests from 0).

The mix, drawn from ``--seed``: prompts of 1..``--max-prompt`` words as text,
chat messages or token ids; streaming clients read every chunk as it comes,
"collect" clients read lazily (a slow consumer) or ask for a non-streamed
answer; a third of the requests are cancelled (before the first token or after
a few chunks; on HTTP, and for a non-streamed editor call, by hanging up);
about one request in ``--kill-every`` has its client SIGKILL itself mid-stream,
and the client is replaced.

Reported (JSON): completed / cancelled / disconnected / errored (by code) /
killed / lost, violations of the contract, client-side time to first token
p50/p99, and the front's and the engine's RSS and open file descriptors before
the run (after one request through each door), after warm-up and at the end.
Warm-up is the first ``--warmup`` requests (default a tenth): the driver then
waits until the daemon is idle before it samples and goes on, and it samples
the end the same way, so both figures are taken with nothing in flight; each
is sampled again 4 s later (``*_rested``: the daemon at rest, after it handed
freed heap pages back to the OS) and both growths are reported. The
``series`` (every 2 s: requests finished, front RSS and descriptors, engine
RSS) and the least-squares slope of the front's RSS after warm-up show whether
memory levels off or keeps growing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

WORDS = "the quick brown fox jumps over lazy dog hello world this is moed serving a model def main return".split()
FINAL_TIMEOUT_S = 120.0  # no message for a live request in this long: it is lost
SERIES_EVERY_S = 2.0  # how often the driver records the daemon's memory and descriptors
# After the idle sample, another this much later: the daemon at rest (it returns freed heap pages
# to the OS once idle for 2 s, moed.front.sessions.IDLE_TRIM_S). Both are reported.
REST_S = 4.0


# --------------------------------------------------------------------------
# The plan: what each request does, drawn once from the seed


def make_plan(n: int, seed: int, max_prompt: int, max_tokens: int, kill_every: int, vocab: int = 256) -> list[dict]:
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        words = rng.randint(1, max_prompt)
        kind = rng.choice(["prompt", "prompt", "messages", "token_ids"])
        spec = {"n": i, "kind": kind, "words": words, "max_tokens": rng.randint(1, max_tokens),
                "mode": rng.choice(["stream", "collect"]), "seed": rng.randrange(1 << 30),
                "temperature": rng.choice([0.0, 0.0, 0.8])}
        if rng.random() < 1 / 3:
            # -1: cancel right after sending, before any token; k: after k chunks.
            spec["cancel_after"] = rng.choice([-1, 0, 1, 2, 3])
        elif kill_every and rng.random() < 1 / kill_every:
            spec["die_after"] = rng.choice([0, 1, 2])
        spec["vocab"] = vocab
        plan.append(spec)
    return plan


def request_message(rid: str, spec: dict) -> dict:
    rng = random.Random(spec["seed"])
    text = " ".join(rng.choice(WORDS) for _ in range(spec["words"]))
    msg = {"type": "generate", "id": rid, "max_tokens": spec["max_tokens"], "temperature": spec["temperature"],
           "seed": spec["seed"]}
    if spec["kind"] == "prompt":
        msg["prompt"] = text
    elif spec["kind"] == "messages":
        msg["messages"] = [{"role": "user", "content": text}]
    else:
        msg["token_ids"] = [rng.randrange(spec["vocab"]) for _ in range(spec["words"])]
    return msg


def describe(msg: dict) -> str:
    return f"{msg.get('type')}({msg.get('code') or msg.get('finish_reason') or ''})"


# --------------------------------------------------------------------------
# Worker: one client process, one request at a time, one JSON line per request


def worker(endpoint: str, final_timeout: float = FINAL_TIMEOUT_S) -> None:
    import zmq

    from moed_client import protocol as P

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    finished: set[str] = set()  # ids whose final we have seen: anything later for them is a violation
    violations: list[str] = []
    out = sys.stdout

    def receive(timeout_s: float):
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return P.unpack(sock.recv())

    for count, line in enumerate(sys.stdin):
        spec = json.loads(line)
        rid = f"q{count}"  # the same ids in every worker: collisions between clients on purpose
        t0 = time.perf_counter()
        sock.send(P.pack(request_message(rid, spec)))
        cancel_after, die_after = spec.get("cancel_after"), spec.get("die_after")
        if cancel_after == -1:
            sock.send(P.pack({"type": "cancel", "id": rid}))
        result = {"n": spec["n"], "outcome": "lost", "chunks": 0, "tokens": 0, "ttft_s": None}
        while True:
            msg = receive(final_timeout)
            if msg is None:
                break  # lost
            mid = msg.get("id")
            if mid != rid:
                violations.append(f"{describe(msg)} for {'finished' if mid in finished else 'unknown'} id {mid!r}")
                continue
            kind = msg.get("type")
            if kind == "chunk":
                if result["ttft_s"] is None:
                    result["ttft_s"] = time.perf_counter() - t0
                result["chunks"] += 1
                result["tokens"] += len(msg.get("token_ids") or [])
                if die_after is not None and result["chunks"] > die_after:
                    out.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                if cancel_after is not None and cancel_after >= 0 and result["chunks"] == cancel_after + 1:
                    sock.send(P.pack({"type": "cancel", "id": rid}))
                if spec["mode"] == "collect":
                    time.sleep(0.002)  # a slow reader
            elif kind == "done":
                result.update(outcome="done", finish_reason=msg.get("finish_reason"), usage=msg.get("usage"))
                break
            elif kind == "error":
                result.update(outcome="error", code=msg.get("code"), message=str(msg.get("message"))[:200])
                break
            else:
                violations.append(f"unexpected {kind!r} for a live request")
        if result["outcome"] != "lost":
            finished.add(rid)
        if die_after is not None and result["outcome"] != "lost":
            result["died"] = False  # it ended before the point where it meant to die
        # Anything already queued for this id after its final is a violation (counted here or later).
        while (late := receive(0)) is not None:
            violations.append(f"{describe(late)} after the final of {late.get('id')!r}")
        result["violations"] = violations
        violations = []
        result["wall_s"] = time.perf_counter() - t0
        out.write(json.dumps(result) + "\n")
        out.flush()


def prompt_fields(spec: dict) -> dict:
    """The prompt part of a request, shared by the three doors."""
    msg = request_message("x", spec)
    return {k: msg[k] for k in ("prompt", "messages", "token_ids") if k in msg}


def http_worker(base_url: str, final_timeout: float = FINAL_TIMEOUT_S) -> None:
    """One client of the OpenAI-compatible gateway: completions and chat, SSE and plain JSON.
    A cancel is a disconnect (what an HTTP client can do); the daemon must then drop the request."""
    import http.client

    from bench.launch import http_auth
    from urllib.parse import urlparse

    u = urlparse(base_url)
    for line in sys.stdin:
        spec = json.loads(line)
        fields = prompt_fields(spec)
        stream = spec["mode"] == "stream"
        body = {"model": "m", "max_tokens": spec["max_tokens"], "temperature": spec["temperature"], "seed": spec["seed"],
                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if "messages" in fields:
            path, body["messages"] = "/v1/chat/completions", fields["messages"]
        else:
            path, body["prompt"] = "/v1/completions", fields.get("prompt", fields.get("token_ids"))
        result = {"n": spec["n"], "outcome": "lost", "chunks": 0, "tokens": 0, "ttft_s": None, "violations": []}
        cancel_after, die_after = spec.get("cancel_after"), spec.get("die_after")
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=final_timeout)
        try:
            conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **http_auth()})
            if cancel_after is not None and (not stream or cancel_after == -1):
                time.sleep(random.random() * 0.05)
                result["outcome"] = "disconnected"  # hang up before the answer: the gateway cancels it
                continue
            resp = conn.getresponse()
            if not stream or resp.status != 200:
                reply = json.loads(resp.read() or b"{}")
                if resp.status == 200:
                    choice = reply["choices"][0]
                    result.update(outcome="done", finish_reason=choice["finish_reason"], tokens=reply["usage"]["completion_tokens"])
                    result["ttft_s"] = None  # not streamed: no first token to time
                else:
                    result.update(outcome="error", code=(reply.get("error") or {}).get("code"), status=resp.status)
                continue
            finals, done_marker = 0, False
            while raw := resp.readline():
                if not raw.startswith(b"data: "):
                    continue
                data = raw[6:].strip()
                if done_marker:
                    result["violations"].append("data after [DONE]")
                if data == b"[DONE]":
                    done_marker = True
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    result.update(outcome="error", code=obj["error"].get("code"))
                    finals += 1
                    continue
                if obj.get("usage"):
                    result["tokens"] = obj["usage"]["completion_tokens"]
                for choice in obj.get("choices", []):
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        result["chunks"] += 1
                        if result["ttft_s"] is None:
                            result["ttft_s"] = time.perf_counter() - t0
                        if die_after is not None and result["chunks"] > die_after:
                            os.kill(os.getpid(), signal.SIGKILL)
                        if cancel_after is not None and result["chunks"] > cancel_after:
                            break
                    if choice.get("finish_reason"):
                        finals += 1
                        result.update(outcome="done", finish_reason=choice["finish_reason"])
                if cancel_after is not None and result["chunks"] > cancel_after and result["outcome"] == "lost":
                    result["outcome"] = "disconnected"
                    break
            if finals > 1:
                result["violations"].append(f"{finals} finals in one stream")
            if result["outcome"] == "done" and not done_marker:
                result["violations"].append("stream ended without [DONE]")
        except (OSError, http.client.HTTPException, ValueError) as e:
            result["violations"].append(f"http: {type(e).__name__}: {e}"[:200])
        finally:
            conn.close()
            result["wall_s"] = time.perf_counter() - t0
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()


def editor_worker(path: str, final_timeout: float = FINAL_TIMEOUT_S) -> None:
    """One editor on the msgpack-rpc socket: plain calls and streamed ones (cancelled with ``cancel``)."""
    import socket as socketlib

    import msgpack

    def connect():
        s = socketlib.socket(socketlib.AF_UNIX)
        s.connect(path)
        s.settimeout(final_timeout)
        return s, msgpack.Unpacker(raw=False)

    sock, unpacker = connect()
    msgids = itertools.count(1)
    finished: set = set()

    def read():
        while True:
            for msg in unpacker:
                return msg
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the editor socket closed the connection")
            unpacker.feed(data)

    for line in sys.stdin:
        spec = json.loads(line)
        stream = spec["mode"] == "stream"
        params = {**prompt_fields(spec), "max_tokens": spec["max_tokens"], "temperature": spec["temperature"],
                  "seed": spec["seed"], "stream": stream}
        result = {"n": spec["n"], "outcome": "lost", "chunks": 0, "tokens": 0, "ttft_s": None, "violations": []}
        cancel_after, die_after = spec.get("cancel_after"), spec.get("die_after")
        t0 = time.perf_counter()
        msgid = next(msgids)
        try:
            sock.sendall(msgpack.packb([0, msgid, "generate", [params]]))
            if not stream and cancel_after is not None:
                time.sleep(random.random() * 0.05)
                sock.close()  # closing the connection cancels its requests
                sock, unpacker = connect()
                result["outcome"] = "disconnected"
                continue
            rid, cancel_sent = None, False
            while True:
                msg = read()
                if msg[0] == 1 and msg[1] == msgid:
                    if msg[2] is not None:
                        result.update(outcome="error", code=str(msg[2]).split(":")[0])
                        break
                    if not stream:
                        info = msg[3]
                        result.update(outcome="done", finish_reason=info["finish_reason"], tokens=(info.get("usage") or {}).get("completion_tokens", 0))
                        break
                    rid = msg[3]["id"]
                    if cancel_after == -1:
                        sock.sendall(msgpack.packb([0, next(msgids), "cancel", [{"id": rid}]]))
                        cancel_sent = True
                elif msg[0] == 1:
                    continue  # the answer to our cancel (it may race with the end: unknown_request is fine)
                elif msg[0] == 2 and msg[1] in ("moed_chunk", "moed_done"):
                    eid, data = msg[2]
                    if eid != rid:
                        result["violations"].append(f"{msg[1]} for {'finished' if eid in finished else 'unknown'} id {eid!r}")
                        continue
                    if msg[1] == "moed_chunk":
                        result["chunks"] += 1
                        if result["ttft_s"] is None:
                            result["ttft_s"] = time.perf_counter() - t0
                        if die_after is not None and result["chunks"] > die_after:
                            os.kill(os.getpid(), signal.SIGKILL)
                        if cancel_after is not None and cancel_after >= 0 and result["chunks"] > cancel_after and not cancel_sent:
                            sock.sendall(msgpack.packb([0, next(msgids), "cancel", [{"id": rid}]]))
                            cancel_sent = True
                        continue
                    if data.get("finish_reason") == "error":
                        result.update(outcome="error", code=(data.get("error") or {}).get("code"))
                    else:
                        result.update(outcome="done", finish_reason=data["finish_reason"],
                                      tokens=(data.get("usage") or {}).get("completion_tokens", 0))
                    finished.add(rid)
                    break
                else:
                    result["violations"].append(f"unexpected {msg!r}"[:200])
        except (OSError, ConnectionError, ValueError) as e:
            result["violations"].append(f"editor: {type(e).__name__}: {e}"[:200])
            sock.close()
            sock, unpacker = connect()
        finally:
            result["wall_s"] = time.perf_counter() - t0
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()


# --------------------------------------------------------------------------
# Driver


def proc_sample(pid: int | None) -> dict | None:
    import psutil

    if pid is None:
        return None
    try:
        p = psutil.Process(pid)
        return {"rss_bytes": p.memory_info().rss, "open_fds": p.num_fds()}
    except psutil.Error:
        return None


class Soak:
    def __init__(self, doors: dict[str, str], slot_doors: list[str], plan: list[dict], warmup: int, status_client,
                 final_timeout: float):
        self.doors = doors  # door -> its address (zmq endpoint, http base url, editor socket path)
        self.slot_doors = slot_doors
        clients = len(slot_doors)
        self.final_timeout = final_timeout
        self.clients = clients
        self.todo: queue.Queue = queue.Queue()
        self.plan = plan
        self.total = len(plan)
        self.warmup = min(warmup, len(plan))
        self.status_client = status_client
        self.results: list[dict] = []
        self.lock = threading.Lock()
        self.series: list[dict] = []  # (requests finished, memory and descriptors) every SERIES_EVERY_S
        self.warm_rested: dict | None = None
        self.end_rested: dict | None = None
        self.worker_deaths = 0
        self.workers_started = 0

    def sample(self) -> dict:
        status = self.status_client.status()
        return {"front": proc_sample(status.get("pid")), "engine": proc_sample(status.get("engine_pid")),
                "requests": status.get("requests"), "clients": status.get("clients"), "state": status.get("state"),
                "engine_restarts": status.get("engine_restarts")}

    def record(self, result: dict) -> None:
        with self.lock:
            self.results.append(result)

    def spawn(self, door: str) -> subprocess.Popen:
        with self.lock:
            self.workers_started += 1
        return subprocess.Popen([sys.executable, "-m", "bench.soak", "--worker", door, "--socket", self.doors[door],
                                 "--final-timeout", str(self.final_timeout)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                cwd=Path(__file__).resolve().parent.parent)

    def slot(self, door: str) -> None:
        """One client slot: a worker process fed one request at a time, replaced when it dies."""
        proc = None
        try:
            while True:
                try:
                    spec = self.todo.get_nowait()
                except queue.Empty:
                    return
                if proc is None:
                    proc = self.spawn(door)
                proc.stdin.write(json.dumps(spec) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if line:
                    self.record(json.loads(line) | {"door": door})
                    continue
                proc.wait()
                died_on_purpose = spec.get("die_after") is not None and proc.returncode == -signal.SIGKILL
                with self.lock:
                    self.worker_deaths += 1
                self.record({"n": spec["n"], "outcome": "killed" if died_on_purpose else "worker_crashed", "door": door,
                             "returncode": proc.returncode, "violations": [], "chunks": None, "ttft_s": None})
                proc = None
        finally:
            if proc is not None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def run(self, progress) -> dict:
        """Warm-up (the first ``warmup`` requests), a pause until the daemon is idle, the rest.

        The after-warm-up and end samples are both taken that way, with no request
        in flight, so the growth between them compares like with like (a sample
        taken under load would count transient per-request buffers as a baseline).
        """
        start_sample = self.sample()
        t0 = time.monotonic()
        self.phase(self.plan[:self.warmup], progress, t0)
        warm_sample = self.settled()
        time.sleep(REST_S)
        self.warm_rested = self.sample()
        self.phase(self.plan[self.warmup:], progress, t0)
        wall = time.monotonic() - t0
        end_sample = self.settled()
        time.sleep(REST_S)
        self.end_rested = self.sample()
        return self.report(start_sample, warm_sample, end_sample, wall)

    def phase(self, specs: list[dict], progress, t0: float) -> None:
        for spec in specs:
            self.todo.put(spec)
        threads = [threading.Thread(target=self.slot, args=(door,), daemon=True) for door in self.slot_doors]
        for t in threads:
            t.start()
        last = 0.0
        while any(t.is_alive() for t in threads):
            time.sleep(0.25)
            now = time.monotonic()
            if now - last >= SERIES_EVERY_S:
                last = now
                self.series.append(self.point(now - t0))
                progress(len(self.results), self.total)

    def point(self, t: float) -> dict:
        sample = self.sample()
        front = sample["front"] or {}
        return {"t_s": round(t, 2), "finished": len(self.results), "front_rss_bytes": front.get("rss_bytes"),
                "front_fds": front.get("open_fds"), "engine_rss_bytes": (sample["engine"] or {}).get("rss_bytes")}

    def settled(self) -> dict:
        """A sample once the daemon has finished what cancels and closed connections left (10 s at most)."""
        deadline = time.monotonic() + 10.0
        while True:
            sample = self.sample()
            busy = sample["requests"] and (sample["requests"].get("active") or sample["requests"].get("queued"))
            if not (busy or sample["clients"]) or time.monotonic() > deadline:
                return sample
            time.sleep(0.2)

    def report(self, start: dict, warm: dict, end: dict, wall: float) -> dict:
        res = sorted(self.results, key=lambda r: r["n"])
        outcome = lambda r: r["outcome"]  # noqa: E731
        done = [r for r in res if outcome(r) == "done"]
        errors: dict[str, int] = {}
        for r in res:
            if outcome(r) == "error":
                errors[r["code"]] = errors.get(r["code"], 0) + 1
        violations = [v for r in res for v in r.get("violations", [])]
        # A request that finished with 'length' must have streamed exactly max_tokens tokens.
        max_tokens = {s["n"]: s["max_tokens"] for s in self._plan_by_n.values()}
        short = [r["n"] for r in done if r.get("finish_reason") == "length" and r["tokens"] != max_tokens[r["n"]]]
        ttfts = sorted(r["ttft_s"] for r in res if r.get("ttft_s") is not None)

        def pct(q):
            return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None

        def growth(which, key, warm=warm, end=end):
            a, b = (warm.get(which) or {}).get(key), (end.get(which) or {}).get(key)
            return (b - a) / a if a and b is not None else None

        after = [p for p in self.series if p["finished"] >= self.warmup and p["front_rss_bytes"]]

        return {
            "requests": self.total,
            "clients": self.clients,
            "finished_records": len(res),
            "completed": sum(1 for r in done if r.get("finish_reason") in ("stop", "length")),
            "cancelled": sum(1 for r in done if r.get("finish_reason") == "cancelled"),
            "cancel_requested": sum(1 for s in self._plan_by_n.values() if "cancel_after" in s),
            "errored": sum(errors.values()),
            "errors_by_code": errors,
            "killed_clients": sum(1 for r in res if outcome(r) == "killed"),
            "disconnected": sum(1 for r in res if outcome(r) == "disconnected"),  # cancelled by hanging up (HTTP, editor)
            "by_door": {d: {o: sum(1 for r in res if r.get("door") == d and outcome(r) == o) for o in sorted({outcome(r) for r in res})}
                        for d in sorted(set(self.slot_doors))},
            "worker_crashes": sum(1 for r in res if outcome(r) == "worker_crashed"),
            "lost": sum(1 for r in res if outcome(r) == "lost") + (self.total - len(res)),
            "violations": len(violations),
            "violation_examples": violations[:10],
            "length_mismatches": short[:10],
            "tokens_streamed": sum(r["tokens"] for r in res if r.get("tokens")),
            "ttft_p50_s": pct(0.50),
            "ttft_p99_s": pct(0.99),
            "wall_s": wall,
            "requests_per_s": len(res) / wall if wall else None,
            "daemon": {"before": start, "after_warmup": warm, "end": end, "warmup_requests": self.warmup,
                       "front_rss_growth": growth("front", "rss_bytes"), "engine_rss_growth": growth("engine", "rss_bytes"),
                       "rested_s": REST_S, "after_warmup_rested": self.warm_rested, "end_rested": self.end_rested,
                       "front_rss_growth_rested": growth("front", "rss_bytes", self.warm_rested, self.end_rested),
                       # least-squares slope of the front's RSS over requests after warm-up: a leak shows as a steady slope
                       "front_rss_bytes_per_1k_requests": slope([(p["finished"], p["front_rss_bytes"]) for p in after], 1000)},
            "series": self.series,
            "fd_leak": {which: ((end.get(which) or {}).get("open_fds") or 0) - ((start.get(which) or {}).get("open_fds") or 0)
                        for which in ("front", "engine")},
            "workers_started": self.workers_started,
        }


def slope(points: list[tuple[float, float]], per: float = 1.0) -> float | None:
    """Least-squares slope of y over x, times ``per``; None with fewer than 3 points or one x."""
    if len(points) < 3:
        return None
    xs, ys = zip(*points)
    try:
        return statistics.linear_regression(xs, ys).slope * per
    except statistics.StatisticsError:  # every x the same
        return None


def warm_doors(doors: dict[str, str]) -> None:
    """One short request through each door, so the start sample of descriptors sees them all in use once."""
    for door, address in doors.items():
        spec = {"n": -1, "kind": "prompt", "words": 2, "max_tokens": 1, "mode": "collect", "seed": 1, "temperature": 0.0, "vocab": 2}
        proc = subprocess.run([sys.executable, "-m", "bench.soak", "--worker", door, "--socket", address, "--final-timeout", "60"],
                              input=json.dumps(spec) + "\n", capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parent.parent)
        result = json.loads(proc.stdout.splitlines()[-1]) if proc.stdout.strip() else {}
        if result.get("outcome") != "done":
            raise RuntimeError(f"warm-up request through the {door} door failed: {result or proc.stderr[-500:]}")


def assign_doors(clients: int, doors: dict[str, str]) -> list[str]:
    """Which door each client slot uses: a fifth each on HTTP and the editor socket when the
    daemon has them, the rest on ZeroMQ (or, without it, shared by the doors there are)."""
    if "zmq" not in doors:
        names = sorted(doors)
        return [names[i % len(names)] for i in range(clients)]
    slots = []
    for door in ("http", "editor"):
        if door in doors:
            slots += [door] * max(1, clients // 5)
    return ["zmq"] * (clients - len(slots)) + slots


def run_soak(socket: Path, *, requests: int, clients: int, seed: int = 0, max_prompt: int = 24, max_tokens: int = 24,
             kill_every: int = 200, warmup: int | None = None, final_timeout: float = FINAL_TIMEOUT_S,
             doors: tuple[str, ...] = ("zmq", "http", "editor"), progress=lambda done, total: None) -> dict:
    """Soak the daemon listening on ``socket`` through each of ``doors`` it has open; the JSON-able report."""
    from moed_client import Client

    with Client(socket, timeout=30) as c:
        vocab = (c.server.get("model") or {}).get("vocab_size") or 256
        status = c.status()
        open_doors = {"zmq": "ipc://" + str(socket), "http": status.get("http"), "editor": status.get("editor_socket")}
        open_doors = {d: a for d, a in open_doors.items() if a and d in doors}
        slot_doors = assign_doors(clients, open_doors)
        warm_doors(open_doors)  # the gateway opens its own daemon connection on first use: not a leak
        plan = make_plan(requests, seed, max_prompt, max_tokens, kill_every, vocab=vocab)
        soak = Soak(open_doors, slot_doors, plan, warmup if warmup is not None else max(clients, requests // 10), c, final_timeout)
        soak._plan_by_n = {s["n"]: s for s in plan}
        report = soak.run(progress)
    report["config"] = {"requests": requests, "clients": clients, "doors": {d: slot_doors.count(d) for d in open_doors},
                        "seed": seed, "max_prompt_words": max_prompt, "max_tokens": max_tokens, "kill_every": kill_every,
                        "vocab": vocab}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt", type=int, default=24, help="most words in a prompt")
    p.add_argument("--max-tokens", type=int, default=24, help="most tokens a request asks for")
    p.add_argument("--kill-every", type=int, default=200, help="about one request in N kills its client mid-stream (0: none)")
    p.add_argument("--socket", default=None, help="soak this running daemon instead of starting one")
    p.add_argument("--model", default=None, help="model for the daemon started here (default: the embedded model, else a tiny random one)")
    p.add_argument("--out", default=None, help="write the JSON report here (default: stdout)")
    p.add_argument("--final-timeout", type=float, default=FINAL_TIMEOUT_S, help="seconds without a message before a request counts as lost")
    p.add_argument("--doors", default="zmq,http,editor", help="doors to soak through, of those the daemon has open")
    p.add_argument("--warmup", type=int, default=None, help="requests before the after-warm-up sample (default: a tenth, at least --clients)")
    p.add_argument("--worker", choices=("zmq", "http", "editor"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        {"zmq": worker, "http": http_worker, "editor": editor_worker}[args.worker](args.socket, args.final_timeout)
        return 0

    def progress(done, total):
        print(f"\rsoak: {done}/{total} requests", end="", file=sys.stderr, flush=True)

    started = None
    try:
        if args.socket:
            socket = Path(args.socket)
        else:
            started, socket = start_daemon(args.model)
        report = run_soak(socket, requests=args.requests, clients=args.clients, seed=args.seed, max_prompt=args.max_prompt,
                          max_tokens=args.max_tokens, kill_every=args.kill_every, warmup=args.warmup,
                          final_timeout=args.final_timeout, doors=tuple(args.doors.split(",")), progress=progress)
    finally:
        print(file=sys.stderr)
        if started is not None:
            started.kill()
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0 if report["lost"] == 0 and report["violations"] == 0 and report["worker_crashes"] == 0 else 1


def start_daemon(model: str | None):
    """A daemon on a private runtime dir, launched as the test suite launches its own (bench/launch.py)."""
    from bench.launch import DaemonProcess, make_tiny_model, short_tmpdir

    from moed.models import embedded_model_path

    if model is None:
        embedded = embedded_model_path()
        if (embedded / "config.json").is_file():
            model = embedded
        else:
            model = make_tiny_model(short_tmpdir("moed-soak-model-") / "tiny")
    d = DaemonProcess(Path(model), ("--http", "127.0.0.1:0"))
    try:
        d.wait_ready(300)
    except BaseException:
        d.kill()
        raise
    return d, d.socket


if __name__ == "__main__":
    sys.exit(main())
