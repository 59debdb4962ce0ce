"""Every limit in docs/limits.md: the table matches the code, and each limit,
when hit, gives its stable error code and leaves nothing behind."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
import zmq

from bench.launch import http_auth
from conftest import find_long_generation
from moed import config
from moed.front import main as moed_daemon
from moed.doors import editor, editor_connection, http
from moed_client import Busy, RequestError
from moed_client import protocol as P

DOC = Path(__file__).resolve().parent.parent / "docs" / "limits.md"
MODULES = {"protocol": P, "editor_connection": editor_connection, "http": http}


def table_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| limit") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def doc_number(text: str) -> int:
    m = re.fullmatch(r"(\d+)( MiB)?", text)
    assert m, f"not a number in docs/limits.md: {text!r}"
    return int(m.group(1)) * (1 << 20 if m.group(2) else 1)


def test_the_limits_table_matches_the_code():
    defaults = vars(moed_daemon.build_parser().parse_args(["serve"]))
    checked = 0
    for limit, value, where, outcome in table_rows():
        if not outcome.startswith("none") and "closed" not in outcome:
            assert re.search(r"`[a-z_]+`", outcome), f"{limit}: no error code named in {outcome!r}"
        if m := re.fullmatch(r"`(protocol|editor_connection|http)\.([A-Z_]+)`", where):
            assert getattr(MODULES[m.group(1)], m.group(2)) == doc_number(value), limit
            checked += 1
        elif m := re.fullmatch(r"`--([a-z-]+)`", where):
            name = m.group(1).replace("-", "_")
            default = defaults[name] if defaults[name] is not None else config.BY_NAME[name].default  # set in config.py
            assert default == doc_number(value), limit
            checked += 1
    assert checked >= 16
    for code in re.findall(r"`([a-z_]+)`", DOC.read_text()):
        if code in ("bad_message", "invalid_request", "limit_exceeded", "busy"):
            assert code in vars(P.ErrorCode).values()


@pytest.fixture(scope="module")
def tight(test_model):
    """A daemon with small limits: a batch of one, two waiting, two clients, 2000 tokens, a 2048-token context."""
    from conftest import DaemonProcess

    d = DaemonProcess(test_model, ("--max-batch", "1", "--max-queue", "2", "--max-clients", "2", "--max-tokens", "2000", "--max-context", "2048"))
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


def idle(d) -> dict:
    with d.client(timeout=10) as c:
        deadline = time.monotonic() + 10
        while (s := c.status())["requests"] != {"active": 0, "queued": 0} and time.monotonic() < deadline:
            time.sleep(0.05)
    assert s["requests"] == {"active": 0, "queued": 0} and s["clients"] == 0, s
    return s


def test_max_tokens(tight):
    with tight.client() as c:
        with pytest.raises(RequestError) as e:
            c.complete("hello", max_tokens=2001)
        assert e.value.code == P.ErrorCode.LIMIT_EXCEEDED and "2000" in e.value.message
        assert len(c.complete("hello", max_tokens=3).token_ids) == 3
    idle(tight)


def test_prompt_tokens_and_context(tight):
    with tight.client() as c:
        assert c.complete(token_ids=[1] * 2044, max_tokens=4).finish_reason in ("length", "stop")
        for ids, n in (([1] * 2045, 4), ([1] * 10_000, 1), ([1] * P.MAX_ARRAY_LEN, 1)):
            with pytest.raises(RequestError) as e:
                c.complete(token_ids=ids, max_tokens=n)
            assert e.value.code == P.ErrorCode.CONTEXT_LENGTH_EXCEEDED, (len(ids), e.value)
    assert idle(tight)["engine_restarts"] == 0


def test_multi_mib_prompt_is_refused_quickly_by_bytes(tight):
    """Over the context by its bytes alone: refused by the front before any tokenizing."""
    with tight.client(timeout=30) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestError) as e:
            c.complete("lorem ipsum " * ((3 << 20) // 12), max_tokens=1)  # 3 MiB
        took = time.monotonic() - t0
        assert e.value.code == P.ErrorCode.CONTEXT_LENGTH_EXCEEDED and "at least" in e.value.message, e.value
        assert took < 2.0, took  # tokenizing it took seconds
        assert c.complete("hello", max_tokens=1).token_ids
    idle(tight)


def test_queue_and_clients_per_door(tight):
    clients = [tight.client(timeout=30) for _ in range(3)]
    try:
        a, b, c = clients
        running = a.generate("hello world", max_tokens=2000, ignore_eos=True)  # a trained model may stop early
        next(running)  # the batch of one
        queued_b = b.generate("hello", max_tokens=2)  # queue 1; two clients hold requests
        with pytest.raises(Busy) as e:
            next(c.generate("hello", max_tokens=2))  # a third client on this door
        assert "clients" in e.value.message
        queued_a = a.generate("hello", max_tokens=2)  # a client that holds requests may add one: queue 2
        with pytest.raises(Busy) as e:
            next(b.generate("hello", max_tokens=2))  # the queue is full
        assert "queue" in e.value.message
        assert c.status()["clients"] == 2  # the refused client left no session
        running.close()
        assert queued_b.collect().token_ids and queued_a.collect().token_ids
        assert c.complete("hello", max_tokens=2).token_ids  # a slot freed: the third client is served
    finally:
        for cl in clients:
            cl.close()
    idle(tight)


def test_message_size(tight):
    with tight.client(timeout=10) as c:
        with pytest.raises(RequestError) as e:
            c.complete("x" * P.MAX_MESSAGE_BYTES, max_tokens=1)
        assert e.value.code == P.ErrorCode.LIMIT_EXCEEDED  # refused by the client, not a silent disconnect
        assert c.complete("hello", max_tokens=1).token_ids  # the connection is fine
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"ipc://{tight.socket}")
    try:
        raw.send(b"\x81\xa4type\xa4ping" + b"\x00" * P.MAX_MESSAGE_BYTES)  # a raw peer that sends one anyway
        assert not raw.poll(1000)  # is disconnected by ZeroMQ, unanswered
    finally:
        raw.close()
    idle(tight)


def test_clients_per_door_on_the_editor_socket_and_the_http_gateway(daemon):
    """--max-clients caps editor connections and HTTP requests in flight; the one over it gets 'busy'."""
    import msgpack
    from conftest import wait_for

    d = daemon(None, "--http", "127.0.0.1:0", "--max-clients", "1")
    with d.client(timeout=10) as c:
        status = c.status()
    url, editor_path = status["http"], status["editor_socket"]

    def editor_connection():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(editor_path)
        return s

    def first_message(s):
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            for msg in unpacker:
                return msg
            data = s.recv(65536)
            if not data:
                return None
            unpacker.feed(data)

    def served_editor():
        """A connection whose status request is answered, or None if it was turned away."""
        s = editor_connection()
        try:
            s.sendall(msgpack.packb([0, 1, "status", []]))
            reply = first_message(s)
        except OSError:
            reply = None
        if reply is not None and reply[0] == 1 and reply[2] is None:
            return s
        s.close()
        return None

    first = served_editor()  # served, and so counted
    assert first is not None
    with first:
        with editor_connection() as second:
            told = first_message(second)
            assert told[:2] == [2, "moed_error"] and told[2][0] == P.ErrorCode.BUSY and "editor connections" in told[2][1]
            assert second.recv(65536) == b""  # and dropped
    with wait_for(served_editor, timeout=10):  # the slot freed when the first editor left
        pass

    host, port = url.removeprefix("http://").split(":")
    auth = f"Authorization: {http_auth()['Authorization']}\r\n"
    body = json.dumps({"model": "embedded", "prompt": "hello", "max_tokens": 1}).encode()
    hanging = socket.create_connection((host, int(port)), timeout=30)  # its body is not in yet: it holds no slot
    with hanging:
        hanging.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:5])
        time.sleep(0.3)
        assert http_get(url, "/health")[0] == 200
        with d.client(timeout=120) as c:
            prompt, max_tokens, _ = find_long_generation(c, seconds=2.0)
        long_body = json.dumps({"model": "embedded", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
        streaming = socket.create_connection((host, int(port)), timeout=30)  # a generation in flight holds the one slot
        with streaming:
            streaming.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
                              f"Content-Length: {len(long_body)}\r\nConnection: close\r\n\r\n".encode() + long_body)
            # its answer has begun, so it holds the slot (polling /health before then could take the slot from it)
            assert streaming.recv(300).startswith(b"HTTP/1.1 200")
            refused = wait_for(lambda: (r := http_get(url, "/health"))[0] == 429 and r, timeout=10)
            assert refused[1]["error"]["code"] == P.ErrorCode.BUSY and "in flight" in refused[1]["error"]["message"]
        wait_for(lambda: http_get(url, "/health")[0] == 200, timeout=30)  # the slot freed when the stream's client left
        hanging.sendall(body[5:])
        reply = b""
        while chunk := hanging.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert http_get(url, "/health")[0] == 200


def http_get(url: str, path: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=http_auth()), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_max_clients_comes_from_the_config_file_the_environment_or_the_flag(monkeypatch, tmp_path):
    def served(*flags) -> int:
        args = moed_daemon.build_parser().parse_args(["serve", *flags])
        moed_daemon.apply_config(args)
        return args.max_clients

    monkeypatch.setenv("MOED_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("MOED_MAX_CLIENTS", raising=False)
    assert served() == 64
    (tmp_path / "config.toml").write_text("max_clients = 5\n")
    assert served() == 5
    monkeypatch.setenv("MOED_MAX_CLIENTS", "7")
    assert served() == 7
    assert served("--max-clients", "9") == 9
    monkeypatch.setenv("MOED_MAX_CLIENTS", "0")
    with pytest.raises(config.ConfigError, match="max_clients"):
        served()
