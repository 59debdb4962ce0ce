"""Faults, one test each: the engine killed mid-batch or stalled, a model that
cannot be read, an expert read failing under a running daemon, the socket
deleted, two daemons started at once, ``moectl stop`` mid-generation.

Each checks that the affected requests get a clear error (never silence),
that a bystander client is not affected, that the daemon recovers or exits
cleanly, and that nothing is left half-written in the runtime dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from conftest import wait_for

from moed_client import Client, EngineRestarted, MoedError
from moed_client import protocol as P

LONG = 30000


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as gone
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except OSError:
        return True


def status_of(d) -> dict:
    with d.client(timeout=5) as c:
        return c.status()


def runtime_leftovers(d) -> set[str]:
    """Files in the runtime dir other than the live daemon's own."""
    status = status_of(d)
    own = {"logs", "moed.sock", "moed.pid", "editor.sock", f"engine-{d.pid}-{status['engine_restarts'] + 1}.sock"}
    return {p.name for p in d.runtime_dir.iterdir()} - own


class Bystander(threading.Thread):
    """A client that pings the daemon every 50 ms; records any failure or stall."""

    def __init__(self, d):
        super().__init__(daemon=True)
        self.d, self.stop, self.failures, self.worst = d, threading.Event(), [], 0.0

    def run(self):
        with self.d.client(timeout=10) as c:
            while not self.stop.is_set():
                try:
                    self.worst = max(self.worst, c.ping())
                except MoedError as e:
                    self.failures.append(repr(e))
                time.sleep(0.05)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(15)


def copy_model(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------
# The engine


def test_engine_killed_mid_batch_queued_requests_survive(daemon):
    d = daemon(None, "--max-batch", "1")
    with d.client() as ref:
        expected = ref.complete("the quick brown fox", max_tokens=8).token_ids
    old = d.engine_pid()
    with Bystander(d) as bystander, d.client() as a, d.client() as b:
        running = a.generate("hello world", max_tokens=LONG)
        next(running)
        waiting = b.generate("the quick brown fox", max_tokens=8)  # queued behind the batch of one
        wait_for(lambda: a.status()["requests"] == {"active": 1, "queued": 1})
        os.kill(old, signal.SIGKILL)
        with pytest.raises(EngineRestarted):
            list(running)
        assert waiting.collect().token_ids == expected  # never reached the dead engine: served by the new one
    assert not bystander.failures
    status = wait_for(lambda: (s := status_of(d))["state"] == "ready" and s)
    d.engine_pids.add(status["engine_pid"])
    assert status["engine_restarts"] == 1 and not alive(old)
    assert runtime_leftovers(d) == set()  # the dead engine's channel socket is gone


def test_engine_stalled_past_the_watchdog_is_replaced(daemon):
    d = daemon(None, "--engine-timeout", "2")
    old = d.engine_pid()
    with Bystander(d) as bystander, d.client(timeout=30) as c:
        stream = c.generate("hello world", max_tokens=LONG)
        next(stream)
        os.kill(old, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            with pytest.raises(EngineRestarted) as e:
                list(stream)
            detected = time.monotonic() - t0
        finally:
            try:
                os.kill(old, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert "stalled" in str(e.value) or "answer" in str(e.value)
        wait_for(lambda: c.status()["state"] == "ready")
        d.engine_pids.add(c.status()["engine_pid"])
        assert c.complete("hello world", max_tokens=3).token_ids
    assert detected < 20
    assert not bystander.failures
    wait_for(lambda: not alive(old), timeout=10)


# --------------------------------------------------------------------------
# The disk


def test_unreadable_model_fails_the_load_cleanly(daemon, test_model, tmp_path):
    model = copy_model(test_model, tmp_path)
    for shard in model.glob("*.safetensors"):
        with open(shard, "r+b") as f:
            f.truncate(64)  # the header promises tensors the file no longer holds
    d = daemon(model, ready=False)
    d.wait_socket()
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(f"ipc://{d.socket}")
    try:
        peer.send(P.pack({"type": P.GENERATE, "id": "early", "prompt": "hello", "max_tokens": 2}))  # queued during the load
        assert peer.poll(30_000), "a request queued during a failed load got no answer"
        reply = P.unpack(peer.recv())
    finally:
        peer.close()
    assert reply["type"] == P.ERROR and reply["id"] == "early", reply
    assert reply["code"] in (P.ErrorCode.ENGINE_ERROR, P.ErrorCode.SHUTTING_DOWN), reply
    assert d.proc.wait(timeout=30) == 1
    out = d.output()
    assert "cannot load" in out and str(model) in out, out
    assert not any(d.runtime_dir.glob("*.sock")) and not (d.runtime_dir / "moed.pid").exists()


def test_model_unreadable_when_the_engine_reloads(daemon, test_model, tmp_path):
    """The engine dies, and the restart finds the model files broken: the
    streaming client gets engine_restarted, a request sent during the reload
    gets engine_error, and the daemon exits 1 leaving nothing behind."""
    model = copy_model(test_model, tmp_path)
    d = daemon(model)
    engine = d.engine_pid()
    with d.client(timeout=30) as a, d.client(timeout=30) as b:
        stream = a.generate("hello world", max_tokens=LONG)
        next(stream)
        for shard in model.glob("*.safetensors"):
            with open(shard, "r+b") as f:
                f.truncate(64)
        os.kill(engine, signal.SIGKILL)
        with pytest.raises(EngineRestarted):
            list(stream)
        with pytest.raises(MoedError) as e:
            b.complete("hello", max_tokens=2)
        assert e.value.code == P.ErrorCode.ENGINE_ERROR and "cannot load" in e.value.message, e.value
    assert d.proc.wait(timeout=30) == 1
    assert "cannot load" in d.output()
    assert not any(d.runtime_dir.glob("*.sock")) and not (d.runtime_dir / "moed.pid").exists()


def test_expert_read_error_fails_its_requests_and_the_daemon_recovers(daemon, test_model, tmp_path):
    model = copy_model(test_model, tmp_path)
    shards = sorted(model.glob("*.safetensors"))
    d = daemon(model, "--capacity", "2", "--no-prefetch")  # top-2 of 8 experts in 2 slots: decoding reads experts all the time
    with d.client(timeout=30) as c:
        expected = c.complete("the quick brown fox", max_tokens=12).token_ids
        saved = {s: s.read_bytes() for s in shards}
        header = {s: 8 + int.from_bytes(saved[s][:8], "little") for s in shards}
        with Bystander(d) as bystander:
            for s in shards:
                with open(s, "r+b") as f:  # same inode: the engine's open descriptor now reads past the end
                    f.truncate(header[s])
            errors = []

            def one(prompt):
                with d.client(timeout=30) as other:
                    try:
                        other.complete(prompt, max_tokens=40)
                    except MoedError as err:
                        errors.append(err)

            try:
                # two at once, so they share a batch (or one joins the other's): both fail, nothing else does
                threads = [threading.Thread(target=one, args=(p,)) for p in ("def main():", "the the the the")]
                for t in threads:
                    t.start()
                with pytest.raises(MoedError) as e:
                    c.complete("hello world, this is moed", max_tokens=40)
                for t in threads:
                    t.join(60)
            finally:
                for s in shards:
                    with open(s, "r+b") as f:
                        f.write(saved[s])
        assert [err.code for err in errors] == [P.ErrorCode.ENGINE_ERROR] * 2, errors
        assert e.value.code == P.ErrorCode.ENGINE_ERROR, e.value
        assert "StoreError" in str(e.value) and ".safetensors" in str(e.value), e.value  # says which file
        assert not bystander.failures
        # The engine drops that batch and goes on (a failed read frees its slot): no restart, and the
        # restored files serve the next request with the same output.
        status = c.status()
        assert status["state"] == "ready" and status["engine_restarts"] == 0, status
        assert c.complete("the quick brown fox", max_tokens=12).token_ids == expected
        assert c.status()["engine_restarts"] == 0
    assert d.proc.poll() is None


# --------------------------------------------------------------------------
# The runtime dir


def test_socket_deleted_under_a_running_daemon_is_bound_again(daemon):
    d = daemon()
    with d.client(timeout=10) as c:
        stream = c.generate("hello world", max_tokens=40)
        next(stream)
        os.unlink(d.socket)
        assert list(stream) and stream.finish_reason == "length"  # connected clients never notice
        wait_for(lambda: d.socket.exists(), timeout=10)
        assert (d.socket.stat().st_mode & 0o777) == 0o600
        with Client(d.socket, timeout=10) as fresh:  # and new ones can connect again
            assert fresh.complete("hello", max_tokens=2).token_ids
        assert c.ping() < 5
    assert d.proc.poll() is None


def editor_call(sock, msgid: int, method: str, params: dict):
    """One msgpack-rpc request on a connected editor socket; its response's (error, result)."""
    import msgpack

    sock.sendall(msgpack.packb([0, msgid, method, [params]]))
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        for msg in unpacker:
            if msg[0] == 1 and msg[1] == msgid:
                return msg[2], msg[3]
        data = sock.recv(65536)
        assert data, "the editor socket closed the connection"
        unpacker.feed(data)


def editor_connect(path):
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    return s


def test_every_runtime_file_deleted_under_a_running_daemon_is_made_again(daemon):
    """A tmp cleaner empties the runtime dir: pidfile, ZeroMQ socket and editor socket come back,
    connected clients of both doors go on, and a second daemon still finds this one running."""
    d = daemon()
    editor_path, pidfile = d.runtime_dir / "editor.sock", d.runtime_dir / "moed.pid"
    old_editor = editor_path.stat().st_ino
    connected = editor_connect(editor_path)
    try:
        assert editor_call(connected, 1, "status", {})[0] is None
        for path in (d.socket, editor_path, pidfile):
            os.unlink(path)
        wait_for(lambda: d.socket.exists() and editor_path.exists() and pidfile.exists(), timeout=10)
        assert editor_path.stat().st_ino != old_editor
        for path in (d.socket, editor_path, pidfile):
            assert (path.stat().st_mode & 0o777) == 0o600, path
        assert pidfile.read_text().strip() == str(d.pid)
        err, result = editor_call(connected, 2, "generate", {"prompt": "hello", "max_tokens": 2})  # connected: goes on
        assert err is None and result["finish_reason"] in ("length", "stop")
        fresh = editor_connect(editor_path)  # new editors can connect again
        try:
            err, result = editor_call(fresh, 1, "generate", {"prompt": "hello", "max_tokens": 2})
            assert err is None and result["usage"]["completion_tokens"] >= 1
        finally:
            fresh.close()
        with Client(d.socket, timeout=10) as c:
            assert c.complete("hello", max_tokens=2).token_ids
            assert c.status()["editor_socket"] == str(editor_path)
    finally:
        connected.close()
    second = daemon(None, env={"MOED_RUNTIME_DIR": str(d.runtime_dir), "MOED_LOG_DIR": str(d.log_dir)}, ready=False)
    assert second.proc.wait(timeout=60) == 1 and "already running" in second.output()
    assert d.proc.poll() is None and pidfile.read_text().strip() == str(d.pid)  # the loser left ours be


def test_two_daemons_started_at_once(daemon, test_model):
    from conftest import short_tmpdir

    runtime = short_tmpdir()
    env = {"MOED_RUNTIME_DIR": str(runtime), "MOED_LOG_DIR": str(runtime / "logs")}
    both = [daemon(None, env=env, ready=False) for _ in range(2)]
    for d in both:
        shutil.rmtree(d.runtime_dir, ignore_errors=True)  # the fixture's own dir, unused here
        d.runtime_dir, d.socket, d.log_dir = runtime, runtime / "moed.sock", runtime / "logs"
    loser = wait_for(lambda: next((d for d in both if d.proc.poll() is not None), None), timeout=60)
    winner = both[1 - both.index(loser)]
    assert loser.proc.returncode == 1
    assert "already running" in loser.output()
    winner.wait_ready()
    assert (runtime / "moed.pid").read_text().strip() == str(winner.pid)
    with winner.client() as c:
        assert c.complete("hello", max_tokens=2).token_ids


def test_moectl_stop_during_a_long_generation(daemon):
    d = daemon(None, "--shutdown-timeout", "1")
    engine = d.engine_pid()
    with d.client(timeout=30) as c:
        stream = c.generate("hello world", max_tokens=LONG)
        next(stream)
        reading = threading.Thread(target=lambda: list(stream))  # the client keeps reading, as a real one does
        reading.start()
        # moed's parent (here this test, normally launchd/systemd) reaps it as moectl waits for it to go.
        reaper = threading.Thread(target=d.proc.wait, daemon=True)
        reaper.start()
        stop = subprocess.run([sys.executable, "-m", "moed.cli", "stop"], env=d.env, capture_output=True, text=True, timeout=60)
        reading.join(30)
        assert not reading.is_alive()
        assert stream.finish_reason == "cancelled"  # a final, not a hang or a dropped connection
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert d.proc.wait(timeout=30) == 0
    wait_for(lambda: not alive(engine), timeout=10)
    assert {p.name for p in d.runtime_dir.iterdir()} <= {"logs"}


async def test_a_send_to_a_dead_client_leaves_no_garbage_cycle(monkeypatch, tmp_path):
    """A killed client's failed send used to leave pyzmq's frames, the future and its traceback in a
    reference cycle that waited for a full garbage collection; the front frees them at once."""
    import gc
    from types import SimpleNamespace

    from moed.front import server as moed_daemon

    monkeypatch.setenv("MOED_RUNTIME_DIR", str(tmp_path))
    d = moed_daemon.Daemon(SimpleNamespace(model=None, memory_budget=None), moed_daemon.RuntimeFiles(tmp_path / "moed.sock"))
    d.router = d.router_socket()
    d.router.bind("inproc://dead-client")
    gc.collect()
    gc.disable()
    try:
        frames = lambda: sum(1 for o in gc.get_objects() if type(o).__name__ in ("frame", "traceback"))  # noqa: E731
        before = frames()
        for i in range(20):
            assert d.send(b"gone-%d" % i, P.chunk("r", "x", [1])) is False  # EHOSTUNREACH: dropped
        assert frames() - before < 5
    finally:
        gc.enable()
        d.router.close(linger=0)
        d.ctx.term()
