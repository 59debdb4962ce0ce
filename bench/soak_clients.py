"""The soak's clients: the plan each request follows, and one worker process per door.

Each worker reads request specs as JSON lines on stdin, runs them against one door of the daemon
(raw protocol v1 on ZeroMQ, the HTTP gateway, the editor socket) and prints what it saw as JSON
lines, so the driver (bench/soak.py) checks the contract from outside every client.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sys
import time

WORDS = "the quick brown fox jumps over lazy dog hello world this is moed serving a model def main return".split()
FINAL_TIMEOUT_S = 120.0  # no message for a live request in this long: it is lost


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
        body = {"max_tokens": spec["max_tokens"], "temperature": spec["temperature"], "seed": spec["seed"],
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
