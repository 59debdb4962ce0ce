"""The editor door's msgpack-rpc framing, methods and bad input, against a scripted backend.

The backend here only replays words; tests against the real daemon are in
tests/test_editor_daemon.py. What is tested here is this door's own logic:
framing, validation, streaming, cancellation, stale-buffer cancellation, time
budgets, FIM prompt building, and that a bad client hurts no other client.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import tempfile
from pathlib import Path

import msgpack
import pytest

from moed.doors import editor, editor_connection, fim, rpc
from moed_client import protocol as P


def nested(depth: int):
    obj = 1
    for _ in range(depth):
        obj = [obj]
    return obj


class ScriptedBackend:
    """Streams ``words`` one per ``delay`` seconds; records what it was sent."""

    def __init__(self, words=("hello", " world"), delay=0.01, model_dir=None, refuse=None):
        self.words, self.delay, self._model_dir, self.refuse = list(words), delay, model_dir, refuse
        self.submitted: list[dict] = []
        self.live: dict[int, asyncio.Task] = {}
        self.cancelled: list[str] = []
        self.handles = 0

    def submit(self, msg, on_event):
        if self.refuse:
            raise P.ProtocolError(*self.refuse)
        P.parse_generate(msg)  # the daemon validates exactly like this
        self.submitted.append(msg)
        self.handles += 1
        handle = self.handles
        self.live[handle] = asyncio.get_running_loop().create_task(self._run(handle, msg, on_event))
        return handle

    async def _run(self, handle, msg, on_event):
        finish = "length"
        try:
            for w in self.words[: msg.get("max_tokens", 256)]:
                await asyncio.sleep(self.delay)
                on_event(P.chunk(msg["id"], w, [1]))
        except asyncio.CancelledError:
            finish = "cancelled"
        self.live.pop(handle, None)
        on_event(P.done(msg["id"], finish, {"completion_tokens": 1}, {}))

    def cancel(self, handle):
        task = self.live.get(handle)
        if task is not None:
            self.cancelled.append(handle)
            task.cancel()

    def status(self):
        return {"ready": True, "active": len(self.live)}

    def model_dir(self):
        return self._model_dir


class RpcClient:
    """A minimal msgpack-rpc peer, like Neovim's side of the socket."""

    def __init__(self, path):
        self.reader = self.writer = None
        self.path = path
        self.msgid = 0
        self.unpacker = msgpack.Unpacker(raw=False)
        self.notifications: list = []
        self.responses: dict = {}

    async def connect(self):
        self.reader, self.writer = await asyncio.open_unix_connection(str(self.path))
        return self

    async def send_raw(self, data: bytes):
        self.writer.write(data)
        await self.writer.drain()

    async def next_message(self, timeout=5.0):
        while True:
            for msg in self.unpacker:
                return msg
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return None
            self.unpacker.feed(data)

    async def wait_response(self, msgid, timeout=5.0):
        while msgid not in self.responses:
            msg = await self.next_message(timeout)
            assert msg is not None, "connection closed before the response"
            if msg[0] == 1:
                self.responses[msg[1]] = msg
            else:
                self.notifications.append(msg)
        return self.responses.pop(msgid)

    async def request(self, method, *args):
        self.msgid += 1
        await self.send_raw(msgpack.packb([0, self.msgid, method, list(args)]))
        _, _, err, result = await self.wait_response(self.msgid)
        return err, result

    async def wait_notification(self, method, timeout=5.0):
        while True:
            for i, n in enumerate(self.notifications):
                if n[1] == method:
                    return self.notifications.pop(i)
            msg = await self.next_message(timeout)
            assert msg is not None, f"connection closed before {method}"
            if msg[0] == 1:
                self.responses[msg[1]] = msg
            else:
                self.notifications.append(msg)

    async def close(self):
        self.writer.close()


@pytest.fixture
def sock_dir():
    d = Path(tempfile.mkdtemp(prefix="moed-", dir="/tmp"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.fixture
async def door(sock_dir):
    backend = ScriptedBackend()
    server = editor.EditorServer(backend, sock_dir / "editor.sock")
    await server.start()
    try:
        yield server, backend
    finally:
        await server.close()


async def client(server):
    return await RpcClient(server.path).connect()


# --------------------------------------------------------------------------


async def test_socket_is_private(door):
    server, _ = door
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700


async def test_generate_returns_text_and_forwards_a_protocol_map(door):
    server, backend = door
    c = await client(server)
    err, result = await c.request("generate", {"prompt": "hi", "max_tokens": 8, "temperature": 0.5, "stream": False})
    assert err is None
    assert result["text"] == "hello world" and result["finish_reason"] == "length"
    sent = backend.submitted[0]
    assert sent["type"] == "generate" and sent["prompt"] == "hi" and sent["temperature"] == 0.5
    assert "stream" not in sent


async def test_streaming_sends_id_then_chunks_then_done(door):
    server, _ = door
    c = await client(server)
    err, result = await c.request("generate", {"prompt": "hi", "stream": True})
    assert err is None and set(result) == {"id"}
    rid = result["id"]
    chunks, info = await collect_stream(c)
    assert chunks == [[rid, "hello"], [rid, " world"]]
    assert info[0] == rid and info[1]["finish_reason"] == "length"


async def collect_stream(c):
    """(moed_chunk params, moed_done params) of one streamed request."""
    chunks = []
    while True:
        msg = await c.next_message()
        assert msg is not None
        if msg[:2] == [2, "moed_chunk"]:
            chunks.append(msg[2])
        elif msg[:2] == [2, "moed_done"]:
            return chunks, msg[2]


async def test_callback_routes_events_through_nvim_call_function(door):
    server, _ = door
    c = await client(server)
    err, result = await c.request("generate", {"prompt": "hi", "stream": True, "callback": "MoedEvent"})
    assert err is None
    n = await c.wait_notification("nvim_call_function")
    assert n[2] == ["MoedEvent", ["moed_chunk", result["id"], "hello"]]
    err, _ = await c.request("generate", {"prompt": "hi", "stream": True, "callback": "x'); call system('rm"})
    assert err.startswith("invalid_request: 'callback'")


async def test_cancel_ends_a_stream_with_cancelled(door):
    server, backend = door
    backend.words, backend.delay = ["w"] * 1000, 0.01
    c = await client(server)
    _, result = await c.request("generate", {"prompt": "hi", "stream": True})
    await c.wait_notification("moed_chunk")
    err, res = await c.request("cancel", {"id": result["id"]})
    assert err is None and res["cancelled"] is True
    done = await c.wait_notification("moed_done")
    assert done[2][1]["finish_reason"] == "cancelled"
    err, _ = await c.request("cancel", {"id": result["id"]})
    assert err.startswith("unknown_request:")


async def test_time_budget_reports_length_and_timed_out(door):
    server, backend = door
    backend.words, backend.delay = ["w"] * 1000, 0.01
    c = await client(server)
    err, result = await c.request("generate", {"prompt": "hi", "t_max_ms": 100})
    assert err is None
    assert result["finish_reason"] == "length" and result["timed_out"] is True
    assert 0 < len(result["text"]) < 1000


async def test_newer_infill_for_the_same_buffer_cancels_the_stale_one(door):
    server, backend = door
    backend.words, backend.delay = ["w"] * 1000, 0.01
    c = await client(server)
    _, first = await c.request("infill", {"prefix": "a", "suffix": "b", "buffer": 3, "stream": True})
    _, other = await c.request("infill", {"prefix": "a", "suffix": "b", "buffer": 4, "stream": True})
    _, second = await c.request("infill", {"prefix": "ab", "suffix": "b", "buffer": 3, "stream": True})
    done = await c.wait_notification("moed_done")
    assert done[2][0] == first["id"] and done[2][1]["finish_reason"] == "cancelled"
    assert len(backend.live) == 2  # buffer 4 and the newer request for buffer 3 go on
    await c.request("cancel", {"id": other["id"]})
    await c.request("cancel", {"id": second["id"]})


async def test_closing_the_connection_cancels_its_requests(door):
    server, backend = door
    backend.words = ["w"] * 1000
    c = await client(server)
    await c.request("generate", {"prompt": "hi", "stream": True})
    await c.close()
    for _ in range(100):
        if not backend.live:
            break
        await asyncio.sleep(0.01)
    assert not backend.live and backend.cancelled


async def test_daemon_refusals_come_back_as_rpc_errors(door):
    server, backend = door
    backend.refuse = (P.ErrorCode.BUSY, "the queue is full")
    c = await client(server)
    err, result = await c.request("generate", {"prompt": "hi"})
    assert err == "busy: the queue is full" and result is None


async def test_status(door):
    server, _ = door
    c = await client(server)
    assert await c.request("status") == (None, {"ready": True, "active": 0})
    assert await c.request("status", {}) == (None, {"ready": True, "active": 0})


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "message, code",
    [
        ([0, 1, "nosuch", [{}]], "unknown_type"),
        ([0, 1, "generate", []], "invalid_request"),
        ([0, 1, "generate", [{"prompt": "a"}, {"prompt": "b"}]], "invalid_request"),
        ([0, 1, "generate", ["hi"]], "invalid_request"),
        ([0, 1, "generate", {"prompt": "hi"}], "bad_message"),
        ([0, 1, "generate"], "bad_message"),
        ([0, 1, 7, [{}]], "bad_message"),
        ([0, 1, "generate", [{"prompt": 5}]], "invalid_request"),
        ([0, 1, "generate", [{"prompt": "x", "max_tokens": "many"}]], "invalid_request"),
        ([0, 1, "generate", [{"prompt": "x", "stream": "yes"}]], "invalid_request"),
        ([0, 1, "generate", [{"prompt": "x", "t_max_ms": -1}]], "invalid_request"),
        ([0, 1, "infill", [{"suffix": "x"}]], "invalid_request"),
        ([0, 1, "infill", [{"prefix": "", "suffix": ""}]], "invalid_request"),
        ([0, 1, "infill", [{"prefix": "a", "prompt": "b"}]], "invalid_request"),
        ([0, 1, "infill", [{"prefix": "a", "buffer": [1]}]], "invalid_request"),
        ([0, 1, "infill", [{"prefix": "a", "context": [1]}]], "invalid_request"),
        ([0, 1, "cancel", [{"id": "nope"}]], "unknown_request"),
    ],
)
async def test_bad_requests_get_an_error_and_the_connection_goes_on(door, message, code):
    server, _ = door
    c = await client(server)
    await c.send_raw(msgpack.packb(message))
    reply = await c.wait_response(1)
    assert reply[2].startswith(code + ": "), reply
    assert reply[3] is None
    err, result = await c.request("generate", {"prompt": "hi"})
    assert err is None and result["text"] == "hello world"


@pytest.mark.parametrize("message", [{"a": 1}, "hello", 5, 2.5, None, True, [9, 1, 2], [0, "x", "generate", [{}]], [0, -1, "generate", [{}]], [2, "whatever", []]])
async def test_messages_without_a_valid_msgid_get_an_error_notification(door, message):
    server, _ = door
    c = await client(server)
    await c.send_raw(msgpack.packb(message))
    n = await c.wait_notification("moed_error")
    assert n[2][0] in ("bad_message", "unknown_type")
    err, _ = await c.request("generate", {"prompt": "hi"})
    assert err is None


async def test_neovims_error_events_are_ignored(door):
    server, _ = door
    c = await client(server)
    await c.send_raw(msgpack.packb([2, "nvim_error_event", [0, "Invalid method: moed_chunk"]]))
    err, _ = await c.request("generate", {"prompt": "hi"})
    assert err is None and not c.notifications


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1" * 8,  # never-used msgpack byte
        msgpack.packb([0, 1, "generate", [{"prompt": "x" * (P.MAX_MESSAGE_BYTES + 10)}]]),  # over the size limit
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion elements
        b"\x91" * 5000 + b"\x00",  # nested deeper than msgpack's stack
        msgpack.packb([0, 1, "generate", [{"prompt": "x", "junk": nested(P.MAX_DEPTH + 1)}]]),  # deeper than MAX_DEPTH
    ],
)
async def test_an_undecodable_stream_drops_only_that_client(door, garbage):
    server, _ = door
    bystander = await client(server)
    c = await client(server)
    c.writer.write(garbage)
    try:
        await c.writer.drain()
    except ConnectionError:
        pass
    n = await c.next_message()
    assert n is not None and n[1] == "moed_error" and n[2][0] == "bad_message"
    assert await c.next_message() is None  # then closed
    err, result = await bystander.request("generate", {"prompt": "hi"})
    assert err is None and result["text"] == "hello world"


async def test_messages_split_across_reads_and_pipelined_requests(door):
    server, _ = door
    c = await client(server)
    data = b"".join(msgpack.packb([0, i, "generate", [{"prompt": "p"}]]) for i in (1, 2, 3))
    for i in range(0, len(data), 3):
        await c.send_raw(data[i : i + 3])
        await asyncio.sleep(0)
    for i in (1, 2, 3):
        assert (await c.wait_response(i))[3]["text"] == "hello world"


def test_decoder_limits_containers():
    d = rpc.RpcDecoder()
    ok = msgpack.packb([0, 1, "status", [[]] * 100])
    bomb = msgpack.packb([[]] * (P.MAX_CONTAINERS + 1))
    messages, error = d.feed(ok + bomb)
    assert len(messages) == 1 and error.code == "bad_message"


def test_invalid_utf8_from_an_editor_is_replaced_not_fatal():
    d = rpc.RpcDecoder()
    raw = b"\x94\x00\x01\xa8generate\x91\x81\xa6prompt\xa3a\xffb"
    assert d.feed(raw) == ([[0, 1, "generate", [{"prompt": "a\ufffdb"}]]], None)


async def test_too_many_live_requests_on_one_connection(door):
    server, backend = door
    backend.words = ["w"] * 1000
    c = await client(server)
    for _ in range(editor_connection.MAX_LIVE_PER_CONNECTION):
        err, _ = await c.request("generate", {"prompt": "p", "stream": True})
        assert err is None
    err, _ = await c.request("generate", {"prompt": "p", "stream": True})
    assert err.startswith("busy: ")
    await c.close()


async def test_requests_in_flight_are_capped_over_all_connections(sock_dir):
    backend = ScriptedBackend(words=["w"] * 1000)
    server = editor.EditorServer(backend, sock_dir / "editor.sock", max_in_flight=2)
    await server.start()
    try:
        first, second = await client(server), await client(server)
        for c in (first, second):
            err, _ = await c.request("generate", {"prompt": "p", "stream": True})
            assert err is None
        err, _ = await first.request("generate", {"prompt": "p", "stream": True})
        assert err.startswith("busy: too many editor requests in flight")
        await second.close()  # its request is cancelled, and its slot freed
        for _ in range(200):
            if server.in_flight() < 2:
                break
            await asyncio.sleep(0.01)
        err, _ = await first.request("generate", {"prompt": "p", "stream": True})
        assert err is None
        await first.close()
    finally:
        await server.close()


async def test_a_stale_non_socket_file_is_not_replaced(sock_dir):
    path = sock_dir / "editor.sock"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await editor.EditorServer(ScriptedBackend(), path).start()


# -- fill-in-the-middle --------------------------------------------------------


def _tokenizer_dir(d: Path, added: list[str]) -> Path:
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(added)]}))
    return d


def test_fim_detection_reads_added_tokens(tmp_path):
    fim.added_tokens.cache_clear()
    qwen = _tokenizer_dir(tmp_path / "q", ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"])
    deepseek = _tokenizer_dir(tmp_path / "d", ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"])
    plain = _tokenizer_dir(tmp_path / "p", ["<|endoftext|>", "<|fim_prefix|>"])
    assert fim.detect(qwen).name == "qwen"
    assert fim.detect(deepseek).name == "deepseek"
    assert fim.detect(plain) is None
    assert fim.detect(tmp_path / "missing") is None
    assert fim.detect(None) is None
    assert fim.build_prompt(fim.detect(qwen), "def f(", "):\n", ["# a.py\nx = 1"]) == "<|fim_prefix|># a.py\nx = 1\ndef f(<|fim_suffix|>):\n<|fim_middle|>"
    assert fim.build_prompt(None, "def f(", "):\n", ["ctx"]) == "ctx\ndef f("
    assert "<|fim_pad|>" in fim.stop_strings(fim.detect(qwen), qwen)
    # User text with braces is not a format string.
    assert fim.build_prompt(fim.detect(qwen), "{suffix}", "{prefix}", []) == "<|fim_prefix|>{suffix}<|fim_suffix|>{prefix}<|fim_middle|>"


async def test_infill_uses_fim_tokens_when_the_model_has_them(sock_dir):
    fim.added_tokens.cache_clear()
    model = _tokenizer_dir(sock_dir / "model", ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endoftext|>"])
    backend = ScriptedBackend(model_dir=model)
    server = editor.EditorServer(backend, sock_dir / "e.sock")
    await server.start()
    try:
        c = await client(server)
        err, result = await c.request("infill", {"prefix": "a = ", "suffix": "\nb = 2", "max_tokens": 4, "stop": ["\n\n"]})
        assert err is None and result["fim"] is True and result["fim_format"] == "qwen"
        sent = backend.submitted[-1]
        assert sent["prompt"] == "<|fim_prefix|>a = <|fim_suffix|>\nb = 2<|fim_middle|>"
        assert sent["stop"][0] == "\n\n" and "<|endoftext|>" in sent["stop"]
        err, result = await c.request("infill", {"prefix": "a", "stop": "\n"})
        assert err is None and backend.submitted[-1]["stop"][0] == "\n" and "<|fim_middle|>" in backend.submitted[-1]["stop"]
        backend._model_dir = None
        err, result = await c.request("infill", {"prefix": "a = ", "suffix": "\nb = 2"})
        assert err is None and result["fim"] is False
        assert backend.submitted[-1]["prompt"] == "a = "
    finally:
        await server.close()
        for p in model.iterdir():
            p.unlink()
        model.rmdir()


async def test_bad_bytes_drop_the_connection_without_starting_its_requests(door):
    server, backend = door
    c = await client(server)
    await c.send_raw(msgpack.packb([0, 1, "generate", [{"prompt": "hi"}]]) + b"\xc1")
    note = await c.next_message()
    assert note[:2] == [2, "moed_error"] and note[2][0] == "bad_message"
    assert await c.next_message() is None
    assert backend.submitted == []


# -- hostile input, generated ----------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20), st.binary(max_size=20))
_values = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_never_raises_on_random_bytes(data):
    messages, error = rpc.RpcDecoder().feed(data)
    assert error is None or error.code == "bad_message"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["generate", "infill", "cancel", "status", "x"]), params=st.lists(_values, max_size=3))
def test_random_params_get_an_answer_and_the_server_lives(sock_dir, method, params):
    async def go():
        backend = ScriptedBackend(words=["w"], delay=0)
        server = editor.EditorServer(backend, sock_dir / "h.sock")
        await server.start()
        try:
            c = await client(server)
            await c.send_raw(msgpack.packb([0, 1, method, params]))
            reply = await c.wait_response(1)
            assert reply[2] is None or (isinstance(reply[2], str) and ": " in reply[2])
            err, result = await c.request("generate", {"prompt": "p"})
            assert err is None and result["text"] == "w"
            await c.close()
        finally:
            await server.close()

    asyncio.run(go())


def test_marker_text_in_a_buffer_is_not_read_as_the_marker():
    """A file that merely contains FIM or chat marker text (fim.py itself, a
    tokenizer config) must not move the hole: in the prompt, exactly the three
    markers moed put there encode to special ids, and the buffer's text
    survives with only an invisible word joiner inside each marker string."""
    from tokenizers import Tokenizer

    from moed.models import embedded_model_path

    fim.added_tokens.cache_clear()
    model = embedded_model_path()
    fmt = fim.detect(model)
    special = fim.added_tokens(model)
    prefix = 'MARK = "<|fim_suffix|>"\nEND = "<|im_end|><|endoftext|>"\n'
    suffix = "\n# <|fim_middle|> ends the prompt\n"
    prompt = fim.build_prompt(fmt, prefix, suffix, ["# other.py: <|fim_prefix|>"], special)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tok.encode(prompt, add_special_tokens=False).ids
    special_ids = {tok.token_to_id(t): t for t in special}
    assert [special_ids[i] for i in ids if i in special_ids] == ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    assert prompt.replace(fim.WORD_JOINER, "") == fim.build_prompt(fmt, prefix, suffix, ["# other.py: <|fim_prefix|>"])
    # without the defusing the buffer's marker text would be read as markers: the test can fail
    raw = tok.encode(fim.build_prompt(fmt, prefix, suffix, ["# other.py: <|fim_prefix|>"]), add_special_tokens=False).ids
    assert len([i for i in raw if i in special_ids]) > 3
