"""Hostile input against a live daemon: random msgpack of every type, bombs,
id collisions between clients, prompts at the size limit. Each bad message
gets one error to its sender; nobody else notices; the daemon stays up, does
not restart its engine and ends with no requests or sessions left over.
(tests/test_protocol.py has the daemon's own wire tests; these add the
property-based and the cross-client ones.)"""

from __future__ import annotations

import struct
import threading
import time

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moed_client import protocol as P

LIVE = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
FINALS = (P.DONE, P.ERROR)


class Peer:
    """A bare DEALER: sends frames, collects replies."""

    def __init__(self, socket_path):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{socket_path}")

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, timeout: float) -> dict | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return P.unpack(self.sock.recv())

    def until(self, predicate, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while (msg := self.recv(max(0.0, deadline - time.monotonic()))) is not None:
            if predicate(msg):
                return msg
        raise AssertionError("no matching reply in time")

    def stream(self, rid: str, timeout: float = 30.0) -> tuple[list[dict], dict]:
        """Chunks and the final of one request; fails on anything after the final."""
        chunks = []
        while True:
            msg = self.until(lambda m: m.get("id") == rid, timeout)
            if msg["type"] in FINALS:
                return chunks, msg
            chunks.append(msg)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def live(shared_daemon):
    return shared_daemon


@pytest.fixture
def peer(live):
    p = Peer(live.socket)
    yield p
    p.close()


def assert_healthy(d) -> dict:
    """The daemon answers, has not restarted its engine, and holds no leftover requests."""
    with d.client(timeout=10) as c:
        deadline = time.monotonic() + 10
        while (status := c.status())["requests"] != {"active": 0, "queued": 0} and time.monotonic() < deadline:
            time.sleep(0.05)
    assert d.proc.poll() is None
    assert status["state"] == "ready"
    assert status["engine_restarts"] == 0
    assert status["requests"] == {"active": 0, "queued": 0}
    return status


# --------------------------------------------------------------------------
# Random msgpack, one reply each

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text(max_size=30) | st.binary(max_size=30)
)
values = st.recursive(scalars, lambda v: st.lists(v, max_size=4) | st.dictionaries(st.text(max_size=8), v, max_size=4), max_leaves=20)
# load, like shutdown, changes the daemon for everyone: only its hostile (non-string) models are sent, below.
SAFE_TYPES = sorted(P.CLIENT_TYPES - {P.SHUTDOWN, P.GENERATE, P.CANCEL, P.LOAD})
bad_loads = st.builds(lambda v: {"type": P.LOAD, "model": v}, values.filter(lambda v: v is not None and not isinstance(v, str)))
generate_fields = st.fixed_dictionaries(
    {"type": st.just(P.GENERATE), "id": st.just("h")},
    optional={
        "prompt": st.text(max_size=20) | values,
        "messages": values | st.lists(st.fixed_dictionaries({"role": st.text(max_size=5), "content": st.text(max_size=20)}), max_size=3),
        "token_ids": values | st.lists(st.integers(min_value=-5, max_value=2**64 - 1), max_size=6),
        "max_tokens": values | st.integers(min_value=-(2**63), max_value=2**64 - 1),
        "temperature": values, "top_p": values, "top_k": values, "min_p": values, "seed": values, "stop": values,
        "logit_bias": values, "n": values, "stream": values,
    },
)
messages = (
    values
    | st.dictionaries(st.text(max_size=8), values, max_size=5).map(lambda d: d | {"type": "x" + d.get("type", "") if isinstance(d.get("type"), str) else 3})
    | st.builds(lambda t, d: d | {"type": t}, st.sampled_from(SAFE_TYPES), st.dictionaries(st.text(max_size=8), values, max_size=4))
    | generate_fields
    | bad_loads
)


@LIVE
@given(msg=messages)
def test_random_messages_get_one_answer_each(live, msg):
    peer = Peer(live.socket)
    try:
        try:
            frame = P.pack(msg)
        except (OverflowError, ValueError):
            return
        peer.send(frame)
        is_generate = isinstance(msg, dict) and msg.get("type") == P.GENERATE
        reply = peer.until(lambda m: True)
        if is_generate and reply["type"] == P.CHUNK or reply["type"] == P.DONE:
            # An accepted request: cancel it, then it must end with one final.
            peer.send(P.pack({"type": P.CANCEL, "id": "h"}))
            final = reply if reply["type"] == P.DONE else peer.until(lambda m: m["type"] in FINALS, 30)
            assert final["id"] == "h"
        elif reply["type"] == P.ERROR:
            assert reply["code"] in vars(P.ErrorCode).values() and reply["message"]
            if is_generate and isinstance(reply.get("id"), str):
                assert reply["id"] == "h"
        else:
            assert isinstance(msg, dict) and msg.get("type") in SAFE_TYPES
            assert reply["type"] == (P.PONG if msg["type"] == P.PING else msg["type"])
        assert peer.recv(0.05) is None  # exactly one answer (plus a stream for an accepted generate)
    finally:
        peer.close()


@LIVE
@given(frame=st.binary(min_size=0, max_size=64))
def test_random_bytes_get_bad_message(live, frame):
    peer = Peer(live.socket)
    try:
        peer.send(frame)
        reply = peer.until(lambda m: True)
        if reply["type"] == P.ERROR:
            assert reply["code"] in vars(P.ErrorCode).values()
        assert peer.recv(0.02) is None or reply["type"] in (P.CHUNK, P.DONE)
    finally:
        peer.close()


def test_after_random_input_the_daemon_is_clean(live):
    # Runs after the property tests in this module (pytest keeps file order).
    status = assert_healthy(live)
    assert status["clients"] == 0


# --------------------------------------------------------------------------
# Bombs: nesting, container floods, invalid UTF-8


@pytest.mark.parametrize(
    "frame",
    [
        b"\x82\xa4type\xa4ping\xa1v" + b"\x81\xa1k" * 40 + b"\x00",  # maps nested 42 deep
        b"\x82\xa4type\xa4ping\xa1v" + b"\x91" * 100_000 + b"\x00",  # arrays nested 100k deep
        b"\x85\xa4type\xa4ping" + b"".join(b"\xa1" + k + b"\xdd" + struct.pack(">I", 250_000) + b"\x90" * 250_000 for k in (b"a", b"b", b"c", b"d")),  # a million empty arrays
        b"\x82\xa4type\xa8generate\xa6prompt\xa4\xff\xfe\xfd\xfc",  # invalid UTF-8 prompt
        b"\x83\xa4type\xa8generate\xa2id\xa1z\xa9token_ids\xdd\xff\xff\xff\xff",  # an array claiming 4G ids
    ],
    ids=["deep-maps", "deep-arrays", "container-flood", "invalid-utf8", "huge-array-header"],
)
def test_bombs_get_bad_message_and_others_keep_streaming(live, peer, frame):
    with live.client(timeout=30) as other:
        with live.client() as ref:
            expected = ref.complete("the quick brown fox", max_tokens=12).token_ids
        stream = other.generate("the quick brown fox", max_tokens=12)
        first = next(stream)
        t0 = time.monotonic()
        peer.send(frame)
        reply = peer.until(lambda m: True)
        answered_in = time.monotonic() - t0
        assert reply["type"] == P.ERROR and reply["code"] == P.ErrorCode.BAD_MESSAGE, reply
        assert first.token_ids + [t for c in stream for t in c.token_ids] == expected
        assert other.ping() < 5
    assert answered_in < 10, f"a hostile frame held the front for {answered_in:.1f} s"
    assert_healthy(live)


# --------------------------------------------------------------------------
# Request ids


def test_same_id_on_two_clients_are_independent(live):
    with live.client() as ref:
        want_a = ref.complete("hello world", max_tokens=16).token_ids
        want_b = ref.complete("the quick brown fox", max_tokens=16).token_ids
    a, b = Peer(live.socket), Peer(live.socket)
    try:
        a.send(P.pack({"type": P.GENERATE, "id": "same", "prompt": "hello world", "max_tokens": 16}))
        b.send(P.pack({"type": P.GENERATE, "id": "same", "prompt": "the quick brown fox", "max_tokens": 16}))
        c = Peer(live.socket)  # a third client cancelling "same" touches neither
        c.send(P.pack({"type": P.CANCEL, "id": "same"}))
        got = {}
        for name, peer in (("a", a), ("b", b)):
            chunks, final = peer.stream("same")
            assert final["type"] == P.DONE and final["finish_reason"] == "length", final
            got[name] = [t for ch in chunks for t in ch["token_ids"]]
        assert c.recv(0.2) is None
        c.close()
        assert got == {"a": want_a, "b": want_b}
    finally:
        a.close()
        b.close()


def test_an_id_can_be_reused_once_finished(live, peer):
    for _ in range(3):
        peer.send(P.pack({"type": P.GENERATE, "id": "again", "prompt": "hello", "max_tokens": 2}))
        _, final = peer.stream("again")
        assert final["type"] == P.DONE
    assert peer.recv(0.1) is None


def test_close_racing_with_done_leaves_no_stray_error(live):
    """A cancel that arrives after the request ended is ignored: no error that a
    later call (here status) would take for its own reply."""
    with live.client(timeout=10) as c:
        stream = c.generate("hello world", max_tokens=1)
        time.sleep(0.5)  # the whole request is done, unread, when we cancel it
        stream.close()
        assert c.status()["state"] == "ready"
        assert c.ping() < 5


# --------------------------------------------------------------------------
# Prompts: out of the vocabulary, at the message size limit


def test_token_ids_at_the_vocabulary_edge(live, peer):
    vocab = assert_healthy(live)["model"]["vocab_size"]
    for rid, ids, ok in (("in", [vocab - 1], True), ("edge", [vocab], False), ("huge", [2**64 - 1], False), ("neg", [-1], False)):
        peer.send(P.pack({"type": P.GENERATE, "id": rid, "token_ids": ids, "max_tokens": 2}))
        _, final = peer.stream(rid)
        if ok:
            assert final["type"] == P.DONE, final
        else:
            assert final["type"] == P.ERROR and final["code"] == P.ErrorCode.INVALID_REQUEST, final
    assert_healthy(live)


def test_prompt_at_the_size_limit_fails_only_itself(live, peer):
    """A frame just under MAX_MESSAGE_BYTES is legal on the wire; it must be
    refused (too many tokens) without touching the engine other clients use."""
    base = len(P.pack({"type": P.GENERATE, "id": "big", "prompt": "", "max_tokens": 1}))
    prompt = "a " * ((P.MAX_MESSAGE_BYTES - base - 16) // 2)
    with live.client(timeout=60) as other:
        stream = other.generate("hello world", max_tokens=40)
        next(stream)
        peer.send(P.pack({"type": P.GENERATE, "id": "big", "prompt": prompt, "max_tokens": 1}))
        _, final = peer.stream("big", timeout=60)
        assert final["type"] == P.ERROR and final["code"] == P.ErrorCode.LIMIT_EXCEEDED, final
        rest = list(stream)
        assert stream.finish_reason == "length" and rest
    assert_healthy(live)


def test_many_clients_flooding_do_not_stall_a_stream(live):
    """Eight clients send junk and abandoned requests as fast as they can; a
    ninth streams; its tokens keep coming and the daemon ends clean."""
    stop = threading.Event()
    errors: list[str] = []

    def flood(i):
        p = Peer(live.socket)
        n = 0
        try:
            while not stop.is_set():
                p.send([b"\xc1", P.pack({"type": P.GENERATE, "id": f"f{n}", "prompt": "hi", "max_tokens": 50}),
                        P.pack({"type": P.CANCEL, "id": f"f{n}"}), P.pack([1, 2])][n % 4])
                n += 1
                while p.recv(0) is not None:
                    pass
                time.sleep(0.002)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            p.close()

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        with live.client(timeout=30) as c:
            out = c.complete("the quick brown fox", max_tokens=30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert out.finish_reason == "length" and len(out.token_ids) == 30
    status = assert_healthy(live)
    assert status["clients"] == 0


# --------------------------------------------------------------------------
# The editor door (msgpack-rpc on a Unix socket)

rpc_params = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(max_size=20) | values, "prefix": st.text(max_size=20) | values, "suffix": st.text(max_size=20) | values,
        "messages": values, "token_ids": values | st.lists(st.integers(-3, 2**64 - 1), max_size=4),
        "max_tokens": values | st.integers(-5, 8), "temperature": values, "stop": values, "stream": values,
        "callback": values | st.text(max_size=12), "t_max_ms": values, "buffer": values, "context": values, "id": values,
    },
)
rpc_messages = (
    values
    | st.tuples(st.just(0), st.integers(-(2**40), 2**40) | values, st.sampled_from(["generate", "infill", "cancel", "status", "nope"]) | values,
                st.lists(rpc_params, max_size=2) | values).map(list)
    | st.tuples(st.just(2), st.text(max_size=10) | values, values).map(list)
)


def is_request(msg) -> bool:
    """A well-formed msgpack-rpc request: the door owes it a response."""
    return (isinstance(msg, list) and len(msg) == 4 and msg[0] == 0 and type(msg[1]) is int and 0 <= msg[1] < 2**32
            and isinstance(msg[2], str) and isinstance(msg[3], list))


@LIVE
@given(msg=rpc_messages)
def test_editor_door_random_rpc(live, msg):
    """Each message gets a response (a well-formed request), a ``moed_error``
    notification, or silence (a response or notification sent to the server);
    never a crash; a stream it cannot decode is closed."""
    import socket as socketlib

    import msgpack

    if isinstance(msg, list) and len(msg) == 4 and msg[0] == 0 and isinstance(msg[3], list):
        for p in msg[3]:
            if isinstance(p, dict):  # accepted generations stay short
                p["max_tokens"] = min(p["max_tokens"], 8) if isinstance(p.get("max_tokens"), int) else 4
    try:
        frame = msgpack.packb(msg, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    s = socketlib.socket(socketlib.AF_UNIX)
    s.connect(str(live.runtime_dir / "editor.sock"))
    s.settimeout(30 if is_request(msg) else 0.3)
    unpacker, replies = msgpack.Unpacker(raw=False), []
    try:
        s.sendall(frame)
        while not any(r[0] == 1 or r[1] == "moed_error" for r in replies):
            data = s.recv(65536)
            if not data:
                break  # closed: only for a stream it cannot decode
            unpacker.feed(data)
            replies.extend(unpacker)
    except socketlib.timeout:
        assert not is_request(msg), f"no response to a request in 30 s: {msg!r}"
    finally:
        s.close()
    for r in replies:
        assert isinstance(r, list) and r[0] in (1, 2), r
        error = r[2] if r[0] == 1 else (r[2][0] if r[1] == "moed_error" else None)
        if error is not None:
            assert isinstance(error, str) and error.split(":")[0] in vars(P.ErrorCode).values(), r
    if is_request(msg):
        assert any(r[0] == 1 and r[1] == msg[1] for r in replies), (msg, replies)


def test_after_random_editor_input_the_daemon_is_clean(live):
    status = assert_healthy(live)
    assert status["clients"] == 0
