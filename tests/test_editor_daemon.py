"""The editor socket on a real daemon: the same sessions, queue and engine as the ZeroMQ door."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path

import msgpack
import pytest
from tokenizers import Tokenizer

from conftest import LONG_PROMPTS, DaemonProcess, find_long_generation, make_tiny_model, short_tmpdir
from moed_client import Busy, EngineRestarted

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")


class RpcPeer:
    """A blocking msgpack-rpc peer (what an editor is)."""

    def __init__(self, path, timeout: float = 60.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.unpacker = msgpack.Unpacker(raw=False)
        self.msgid = 0
        self.responses: dict = {}
        self.notes: list = []

    def close(self):
        self.sock.close()

    def send(self, obj) -> int:
        self.msgid += 1
        self.sock.sendall(msgpack.packb(obj(self.msgid) if callable(obj) else obj))
        return self.msgid

    def read(self):
        """The next message, or None once the server has closed the connection."""
        while True:
            for msg in self.unpacker:
                return msg
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:  # closed with our unread bytes still in its buffer
                return None
            if not data:
                return None
            self.unpacker.feed(data)

    def _pump(self):
        msg = self.read()
        assert msg is not None, "the server closed the connection"
        if msg[0] == 1:
            self.responses[msg[1]] = msg
        else:
            self.notes.append(msg)

    def wait(self, msgid):
        while msgid not in self.responses:
            self._pump()
        _, _, error, result = self.responses.pop(msgid)
        return error, result

    def call(self, method, params=None):
        return self.wait(self.send(lambda i: [0, i, method, [params or {}]]))

    def result(self, method, params=None):
        error, result = self.call(method, params)
        assert error is None, error
        return result

    def done(self, rid):
        """(text, info) of a streamed request, from its notifications."""
        text = []
        while True:
            for i, n in enumerate(self.notes):
                if n[2][0] != rid:
                    continue
                del self.notes[i]
                if n[1] == "moed_chunk":
                    text.append(n[2][1])
                    break
                if n[1] == "moed_done":
                    return "".join(text), n[2][1]
            else:
                self._pump()


def wait_idle(d: DaemonProcess, timeout: float = 20.0) -> float:
    t0 = time.monotonic()
    with d.client(timeout=10) as c:
        while True:
            r = c.status()["requests"]
            if r["active"] + r["queued"] == 0:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, f"requests still live after {timeout} s: {r}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def editor_path(shared_daemon):
    return shared_daemon.wait_ready()["editor_socket"]


@pytest.fixture(scope="module")
def long(shared_daemon):
    """(prompt, max_tokens, seconds) of a request that keeps the engine busy for a few seconds."""
    with shared_daemon.client(timeout=120) as c:
        return find_long_generation(c, seconds=2.0)


def long_infill(peer: "RpcPeer", max_tokens: int) -> str:
    """A prefix whose infill (empty suffix) runs to max_tokens on the test model, FIM or not."""
    for prefix in LONG_PROMPTS:
        if peer.result("infill", {"prefix": prefix, "max_tokens": max_tokens})["finish_reason"] == "length":
            return prefix
    raise AssertionError("no infill of LONG_PROMPTS runs long on this model")


def wait_active(d: DaemonProcess, n: int = 1) -> None:
    deadline = time.monotonic() + 30
    with d.client() as c:
        while c.status()["requests"]["active"] < n:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.01)


# --------------------------------------------------------------------------


def test_socket_sits_next_to_the_daemons_and_is_private(shared_daemon, editor_path):
    path = Path(editor_path)
    assert path.parent == shared_daemon.socket.parent
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_generate_equals_the_protocol_client(shared_daemon, editor_path):
    peer = RpcPeer(editor_path)
    got = peer.result("generate", {"prompt": "the quick brown", "max_tokens": 16, "temperature": 0.7, "seed": 11})
    msgs = [{"role": "user", "content": "hi"}]
    chat = peer.result("generate", {"messages": msgs, "max_tokens": 8})
    rid = peer.result("generate", {"prompt": "the quick brown", "max_tokens": 16, "temperature": 0.7, "seed": 11, "stream": True})["id"]
    streamed, info = peer.done(rid)
    with shared_daemon.client() as c:
        want = c.complete("the quick brown", max_tokens=16, temperature=0.7, seed=11)
        want_chat = c.complete(messages=msgs, max_tokens=8)
    assert got["text"] == want.text == streamed
    assert got["finish_reason"] == want.finish_reason == info["finish_reason"]
    for key in ("prompt_tokens", "completion_tokens"):  # cached_tokens differ: the second run reuses the first's prompt cache
        assert got["usage"][key] == want.usage[key]
    assert chat["text"] == want_chat.text


def test_cancel_and_disconnect_free_the_daemon(shared_daemon, editor_path, long):
    prompt, max_tokens, seconds = long
    peer = RpcPeer(editor_path)
    rid = peer.result("generate", {"prompt": prompt, "max_tokens": max_tokens, "stream": True})["id"]
    while not any(n[1] == "moed_chunk" for n in peer.notes):
        peer._pump()
    assert peer.result("cancel", {"id": rid}) == {"id": rid, "cancelled": True}
    _, info = peer.done(rid)
    assert info["finish_reason"] == "cancelled"
    wait_idle(shared_daemon, 5)

    peer.send(lambda i: [0, i, "generate", [{"prompt": prompt, "max_tokens": max_tokens}]])
    wait_active(shared_daemon)
    peer.close()
    assert wait_idle(shared_daemon, seconds) < seconds / 2


def test_time_budget(shared_daemon, editor_path, long):
    prompt, max_tokens, seconds = long
    peer = RpcPeer(editor_path)
    t0 = time.monotonic()
    got = peer.result("generate", {"prompt": prompt, "max_tokens": max_tokens, "t_max_ms": 300})
    elapsed = time.monotonic() - t0
    assert got["finish_reason"] == "length" and got["timed_out"] is True
    assert 0 < got["usage"]["completion_tokens"] < max_tokens
    assert elapsed < seconds / 2


def test_newer_infill_from_the_same_buffer_cancels_the_stale_one(shared_daemon, editor_path, long):
    _, max_tokens, _ = long
    peer = RpcPeer(editor_path)
    prefix = long_infill(peer, max_tokens)
    stale = peer.send(lambda i: [0, i, "infill", [{"prefix": prefix, "max_tokens": max_tokens, "buffer": 1}]])
    wait_active(shared_daemon)
    fresh = peer.result("infill", {"prefix": "hello world", "suffix": "", "max_tokens": 6, "buffer": 1})
    error, old = peer.wait(stale)
    assert error is None and old["finish_reason"] == "cancelled"
    assert fresh["finish_reason"] in ("length", "stop") and fresh["usage"]["completion_tokens"] <= 6


def test_bad_input_errors_that_client_only(shared_daemon, editor_path):
    bystander = RpcPeer(editor_path)
    rid = bystander.result("generate", {"prompt": "the quick brown", "max_tokens": 24, "stream": True})["id"]
    peer = RpcPeer(editor_path)
    for msg, code in [
        ([0, 1, "generate", []], "invalid_request"),
        ([0, 2, "generate", [{"prompt": "a"}, {}]], "invalid_request"),
        ([0, 3, "frobnicate", [{}]], "unknown_type"),
        ([0, 4, "generate", [{"prompt": "a", "max_tokens": 10**9}]], "limit_exceeded"),
        ([0, 5, "generate", [{"prompt": ""}]], "invalid_request"),
        ([0, 6, "generate", [{"token_ids": [10**9]}]], "invalid_request"),
        ([0, 7, "cancel", [{"id": "12345"}]], "unknown_request"),
    ]:
        peer.sock.sendall(msgpack.packb(msg))
        error, result = peer.wait(msg[1])
        assert error.split(":")[0] == code, (msg, error)
    assert peer.result("generate", {"prompt": "hello world", "max_tokens": 2})["usage"]["completion_tokens"] <= 2
    # A stream that is not msgpack, then one over the size limit: each drops only its own connection.
    for garbage in (b"\xc1\xc1\xc1\xc1", msgpack.packb([0, 9, "generate", [{"prompt": "x" * (5 << 20)}]])):
        bad = RpcPeer(editor_path)
        try:
            bad.sock.sendall(garbage)
        except (BrokenPipeError, ConnectionResetError):
            pass
        note = bad.read()
        assert note[:2] == [2, "moed_error"] and note[2][0] == "bad_message"
        assert bad.read() is None
    text, info = bystander.done(rid)
    with shared_daemon.client() as c:
        assert text == c.complete("the quick brown", max_tokens=24).text
    assert info["finish_reason"] in ("length", "stop")


def test_status_names_the_socket(editor_path):
    status = RpcPeer(editor_path).result("status")
    assert status["editor_socket"] == editor_path and status["state"] == "ready"


def test_no_editor_flag(daemon):
    d = daemon(None, "--no-editor")
    with d.client() as c:
        assert c.status()["editor_socket"] is None
    assert not (d.runtime_dir / "editor.sock").exists()


@pytest.mark.slow
def test_queue_limit_and_engine_restart_behave_as_on_zeromq(daemon):
    d = daemon(None, "--max-batch", "1", "--max-queue", "1")
    path = d.wait_ready()["editor_socket"]
    with d.client(timeout=120) as c:
        prompt, max_tokens, _ = find_long_generation(c, seconds=2.0)
    peer = RpcPeer(path)
    first = peer.result("generate", {"prompt": prompt, "max_tokens": max_tokens, "stream": True})["id"]
    queued = peer.result("generate", {"prompt": prompt, "max_tokens": max_tokens, "stream": True})["id"]
    error, _ = peer.call("generate", {"prompt": "hello world", "max_tokens": 4})
    with d.client() as c:
        with pytest.raises(Busy) as zmq_error:
            c.complete("hello world", max_tokens=4)
    assert error == f"busy: {zmq_error.value.message}"
    # Kill the engine under the running request: the editor gets the daemon's engine_restarted, as ZeroMQ clients do.
    engine = d.engine_pid()
    os.kill(engine, signal.SIGKILL)
    _, info = peer.done(first)
    assert info["finish_reason"] == "error" and info["error"]["code"] == "engine_restarted"
    # The queued request was not in the engine: it survives the restart, and is cancelled here.
    assert peer.result("cancel", {"id": queued}) == {"id": queued, "cancelled": True}
    assert peer.done(queued)[1]["finish_reason"] == "cancelled"
    d.wait_ready()
    d.engine_pid()
    got = peer.result("generate", {"prompt": "hello world", "max_tokens": 4})
    assert got["usage"]["completion_tokens"] <= 4
    with d.client() as c:
        assert got["text"] == c.complete("hello world", max_tokens=4).text


# --------------------------------------------------------------------------
# Fill-in-the-middle with a model that has FIM tokens


@pytest.fixture(scope="module")
def fim_daemon():
    root = short_tmpdir("moed-fim-")
    model = make_tiny_model(root / "fim", seed=1, extra_special_tokens=FIM_TOKENS)
    d = DaemonProcess(model, ())
    try:
        d.wait_ready()
        yield d, model
    finally:
        d.kill()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def test_infill_uses_the_models_fim_tokens(fim_daemon):
    d, model = fim_daemon
    peer = RpcPeer(d.wait_ready()["editor_socket"])
    prefix, suffix, context = "def main():\n    return ", "\n\nmain()\n", ["# helper.py\nx = 42"]
    got = peer.result("infill", {"prefix": prefix, "suffix": suffix, "context": context, "max_tokens": 8})
    assert got["fim"] is True and got["fim_format"] == "qwen"
    # Each marker reached the engine as one special token, not as text.
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    lead = context[0] + "\n" + prefix
    assert got["usage"]["prompt_tokens"] == 3 + len(tok.encode(lead).ids) + len(tok.encode(suffix).ids)
    with d.client() as c:
        want = c.complete(f"<|fim_prefix|>{lead}<|fim_suffix|>{suffix}<|fim_middle|>", max_tokens=8,
                          stop=["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|endoftext|>"])
    assert got["text"] == want.text and got["finish_reason"] == want.finish_reason


def test_infill_without_fim_tokens_continues_the_prefix(shared_daemon, editor_path, test_model):
    from moed.doors import fim

    if fim.detect(test_model) is not None:
        pytest.skip("the test model has FIM tokens; the fallback is covered by tests/test_editor.py")
    peer = RpcPeer(editor_path)
    got = peer.result("infill", {"prefix": "the quick brown", "suffix": " over the lazy dog", "max_tokens": 8})
    assert got["fim"] is False and "fim_format" not in got
    with shared_daemon.client() as c:
        assert got["text"] == c.complete("the quick brown", max_tokens=8).text


def test_moectl_status_json_prints_the_editor_socket(shared_daemon, editor_path):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "moed.cli", "status", "--json"], env=shared_daemon.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["editor_socket"] == editor_path
