"""Protocol v1 on the wire against a live daemon: bad input gets a clear error
to its sender (or the sender is dropped), and every other client keeps
streaming; the front's memory does not grow under a stream of junk."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import pytest
import zmq

from moed_client import protocol as P


class Raw:
    """A bare DEALER speaking bytes to the daemon."""

    def __init__(self, socket_path):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(P and f"ipc://{socket_path}")

    def send(self, *frames: bytes):
        self.sock.send_multipart(list(frames))

    def send_msg(self, msg: dict):
        self.send(P.pack(msg))

    def recv(self, timeout=5.0) -> dict | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return P.unpack(self.sock.recv())

    def until(self, predicate, timeout=10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if msg is not None and predicate(msg):
                return msg
        raise AssertionError("no matching message")

    def close(self):
        self.sock.close()


@pytest.fixture
def raw(shared_daemon):
    r = Raw(shared_daemon.socket)
    yield r
    r.close()


def error_code(raw: Raw) -> str:
    msg = raw.until(lambda m: True)
    assert msg["type"] == P.ERROR, msg
    assert msg["message"]
    return msg["code"]


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1garbage",  # 0xc1 is never valid msgpack
        b"",
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({"no": "type"}),
        msgpack.packb({"type": 7}),
        msgpack.packb({"type": "hello"}) + b"trailing",
        msgpack.packb({1: "int key", "type": "ping"}),
    ],
)
def test_garbage_gets_bad_message(raw, frame):
    raw.send(frame)
    assert error_code(raw) == P.ErrorCode.BAD_MESSAGE
    raw.send_msg({"type": P.PING})  # and the connection still works
    assert raw.until(lambda m: True)["type"] == P.PONG


def test_multipart_message_is_refused(raw):
    raw.send(P.pack({"type": P.PING}), P.pack({"type": P.PING}))
    assert error_code(raw) == P.ErrorCode.BAD_MESSAGE


def test_unknown_type(raw):
    raw.send_msg({"type": "make_coffee"})
    assert error_code(raw) == P.ErrorCode.UNKNOWN_TYPE


def test_unknown_fields_are_ignored(raw):
    raw.send_msg({"type": P.PING, "flavour": "vanilla", "nested": {"a": [1, 2]}})
    assert raw.until(lambda m: True)["type"] == P.PONG


def test_version_mismatch(raw):
    raw.send_msg({"type": P.HELLO, "version": [P.PROTOCOL_VERSION[0] + 1, 0]})
    msg = raw.until(lambda m: True)
    assert msg["code"] == P.ErrorCode.VERSION_MISMATCH
    assert "version" in msg["message"]
    raw.send_msg({"type": P.HELLO, "version": [P.PROTOCOL_VERSION[0], 99]})  # a newer minor is fine
    assert raw.until(lambda m: True)["type"] == P.HELLO


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": 42},
        {"prompt": "hi", "max_tokens": "many"},
        {"prompt": "hi", "temperature": -1},
        {"prompt": "hi", "top_p": 2.0},
        {"prompt": "hi", "stop": [1, 2]},
        {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]},
        {"token_ids": [-1]},
        {"token_ids": [10**9]},  # outside the vocabulary: the engine refuses it
        {"messages": [{"role": "user"}]},
    ],
)
def test_wrong_generate_fields(raw, fields):
    raw.send_msg({"type": P.GENERATE, "id": "r1", **fields})
    msg = raw.until(lambda m: m["type"] in (P.ERROR, P.DONE))
    assert msg["type"] == P.ERROR and msg["id"] == "r1", msg
    assert msg["code"] == P.ErrorCode.INVALID_REQUEST


def test_limits(raw):
    raw.send_msg({"type": P.GENERATE, "id": "big", "prompt": "hi", "max_tokens": 10**7})
    msg = raw.until(lambda m: True)
    assert msg["code"] == P.ErrorCode.LIMIT_EXCEEDED and msg["id"] == "big"
    raw.send_msg({"type": P.GENERATE, "id": "", "prompt": "hi"})
    assert error_code(raw) == P.ErrorCode.INVALID_REQUEST


def test_duplicate_and_unknown_ids(raw):
    raw.send_msg({"type": P.GENERATE, "id": "same", "prompt": "hello", "max_tokens": 30000, "ignore_eos": True})
    raw.send_msg({"type": P.GENERATE, "id": "same", "prompt": "hello", "max_tokens": 5})
    msg = raw.until(lambda m: m["type"] == P.ERROR)
    assert msg["code"] == P.ErrorCode.DUPLICATE_ID and msg["id"] == "same"
    raw.send_msg({"type": P.CANCEL, "id": "nope"})  # not live: ignored, no reply (cancel races with done)
    raw.send_msg({"type": P.CANCEL, "id": "same"})
    done = raw.until(lambda m: m["type"] in (P.DONE, P.ERROR))
    assert done["type"] == P.DONE and done["id"] == "same" and done["finish_reason"] == "cancelled"


def test_oversized_message_drops_only_its_sender(shared_daemon):
    """A frame over MAXMSGSIZE never reaches Python; the sender is disconnected, a streaming client is not."""
    with shared_daemon.client() as good:
        stream = good.generate("hello world", max_tokens=40)
        next(stream)
        bad = Raw(shared_daemon.socket)
        bad.send(b"\x00" * (P.MAX_MESSAGE_BYTES + 1024))
        assert bad.recv(timeout=1.0) is None  # dropped, nothing crashed
        bad.close()
        rest = list(stream)
        assert stream.finish_reason in ("length", "stop") and rest
        assert good.ping() < 5


def test_hostile_clients_do_not_disturb_a_stream(shared_daemon):
    """While one client streams, others send junk; the stream is complete and exact."""
    with shared_daemon.client() as ref_client:
        expected = ref_client.complete("the quick brown fox", max_tokens=40).text
    stop = threading.Event()

    def junk():
        r = Raw(shared_daemon.socket)
        payloads = [b"\xc1", msgpack.packb([1]), P.pack({"type": "nope"}), P.pack({"type": P.GENERATE, "id": 5, "prompt": 1})]
        i = 0
        while not stop.is_set():
            r.send(payloads[i % len(payloads)])
            r.recv(timeout=0.05)
            i += 1
        r.close()

    threads = [threading.Thread(target=junk) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with shared_daemon.client() as c:
            out = c.complete("the quick brown fox", max_tokens=40)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert out.text == expected


VANISHING_CLIENT = textwrap.dedent(
    """
    import sys
    from moed_client import Client
    c = Client(sys.argv[1])
    stream = c.generate("hello world", max_tokens=30000, ignore_eos=True)
    next(stream)
    print("streaming", flush=True)
    sys.stdin.read()
    """
)


def test_vanished_client_is_dropped(shared_daemon):
    """A client killed mid-stream (no cancel sent) has its request removed by the daemon."""
    proc = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, str(shared_daemon.socket)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"streaming"
        with shared_daemon.client() as c:
            assert c.status()["requests"]["active"] == 1
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 10
            while c.status()["requests"]["active"] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.status()["requests"]["active"] == 0
            assert c.status()["clients"] == 0  # clients with requests in flight
    finally:
        proc.kill()
        proc.wait()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_front_memory_does_not_grow_under_junk(shared_daemon):
    def round_of_junk(n):
        for _ in range(n):
            r = Raw(shared_daemon.socket)
            r.send(b"\xc1")
            r.send_msg({"type": P.GENERATE, "id": "x", "prompt": "hello", "max_tokens": 30000, "ignore_eos": True})
            r.until(lambda m: m["type"] == P.CHUNK)
            r.close()  # vanish mid-stream

    def settled():
        with shared_daemon.client() as c:
            deadline = time.monotonic() + 10
            while c.status()["requests"]["active"] and time.monotonic() < deadline:
                time.sleep(0.05)
            return c.status()

    engine = shared_daemon.engine_pid()
    round_of_junk(20)  # warm up allocator pools and caches (the prompt-cache LRU fills up here too)
    engine_growth = []
    for _ in range(2):  # a leak grows in both rounds; the allocator's pools settle in one of them
        before, engine_before = _rss(shared_daemon.pid), _rss(engine)
        round_of_junk(100)
        status = settled()
        growth = _rss(shared_daemon.pid) - before
        engine_growth.append(_rss(engine) - engine_before)
        assert status["requests"]["active"] == 0 and status["clients"] == 0
        assert growth < 4 * 1024 * 1024, f"front grew by {growth} bytes over 100 vanished clients"
    assert min(engine_growth) < 16 * 1024 * 1024, f"engine grew by {engine_growth} bytes in two rounds of 100 vanished clients"


def test_dropped_client_frees_batch_slots_for_the_queue(daemon):
    """Requests waiting in the queue start when a vanished client's requests leave the batch."""
    d = daemon(None, "--max-batch", "2")
    two_streams = VANISHING_CLIENT.replace("next(stream)", 'other = c.generate("hello", max_tokens=30000, ignore_eos=True)\nnext(stream)')
    vanishing = subprocess.Popen([sys.executable, "-c", two_streams, str(d.socket)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert vanishing.stdout.readline().strip() == b"streaming"
        with d.client(timeout=30) as c:
            waiting = c.generate("the quick brown fox", max_tokens=5)
            deadline = time.monotonic() + 10
            while c.status()["requests"] != {"active": 2, "queued": 1} and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.status()["requests"] == {"active": 2, "queued": 1}
            vanishing.kill()
            vanishing.wait()
            assert waiting.collect().token_ids
    finally:
        vanishing.kill()
        vanishing.wait()
