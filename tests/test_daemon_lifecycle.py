"""Daemon lifecycle on fresh daemons: engine crash and restart, one daemon per
runtime dir, stale sockets, shutdown (graceful, now, SIGTERM), the busy queue."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from conftest import wait_for

from moed_client import Busy, EngineRestarted, ShuttingDown

LONG = 30000  # more tokens than any test waits for; under the default context limit


def test_engine_killed_midstream_restarts(daemon):
    d = daemon()
    old_engine = d.engine_pid()
    with d.client() as c, d.client() as other:
        streams = [c.generate("hello world", max_tokens=LONG, ignore_eos=True), other.generate("the quick brown fox", max_tokens=LONG, ignore_eos=True)]
        for s in streams:
            next(s)
        os.kill(old_engine, signal.SIGKILL)
        for s in streams:
            with pytest.raises(EngineRestarted):
                for _ in s:
                    pass
        # Same connections, no reconnect: the daemon restarts the engine and serves again.
        status = wait_for(lambda: (st := c.status())["state"] == "ready" and st)
        assert status["engine_pid"] != old_engine
        assert status["engine_restarts"] == 1
        d.engine_pids.add(status["engine_pid"])
        assert c.complete("hello world", max_tokens=4).token_ids
        assert other.complete("hello world", max_tokens=4).token_ids
    assert d.proc.poll() is None


def test_requests_during_load_wait_for_the_model(daemon):
    d = daemon(ready=False)
    d.wait_socket()
    with d.client() as c:
        first = c.status()
        assert first["state"] in ("loading", "ready")
        assert {"stage", "message", "fraction"} <= set(first["progress"])
        out = c.complete("hello world", max_tokens=3)  # queued until the engine is ready
    assert out.token_ids


def test_second_daemon_refuses(daemon, test_model):
    d = daemon()
    env = {**os.environ, "MOED_RUNTIME_DIR": str(d.runtime_dir), "MOED_LOG_DIR": str(d.log_dir)}
    second = subprocess.run(
        [sys.executable, "-m", "moed.front", "serve", "--model", str(test_model)], env=env, capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 1
    assert "already running" in second.stderr
    with d.client() as c:  # the first one is untouched
        assert c.status()["state"] == "ready"
        assert c.complete("hello", max_tokens=2).token_ids


def test_stale_socket_is_replaced(daemon, tmp_path):
    from conftest import short_tmpdir

    runtime = short_tmpdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(runtime / "moed.sock"))
    stale.close()  # a socket file nobody listens on, as a crashed daemon leaves it
    (runtime / "moed.pid").write_text("999999\n")
    d = daemon(None, env={"MOED_RUNTIME_DIR": str(runtime)}, ready=False)
    d.runtime_dir, d.socket = runtime, runtime / "moed.sock"
    d.wait_ready()
    with d.client() as c:
        assert c.complete("hello", max_tokens=2).token_ids


def test_graceful_shutdown_finishes_inflight(daemon):
    d = daemon()
    with d.client() as c, d.client() as admin:
        stream = c.generate("hello world", max_tokens=30)
        next(stream)
        assert admin.shutdown()["accepted"]
        with pytest.raises(ShuttingDown):
            admin.complete("hello", max_tokens=2)
        rest = list(stream)
        assert stream.finish_reason in ("length", "stop")
        assert rest
    assert d.proc.wait(timeout=30) == 0
    assert not d.socket.exists()
    assert not (d.runtime_dir / "moed.pid").exists()


def test_shutdown_now_cancels_inflight(daemon):
    d = daemon()
    with d.client() as c, d.client() as admin:
        stream = c.generate("hello world", max_tokens=LONG, ignore_eos=True)
        next(stream)
        admin.shutdown(now=True)
        list(stream)
        assert stream.finish_reason == "cancelled"
    assert d.proc.wait(timeout=30) == 0
    assert not d.socket.exists()


def test_sigterm_is_graceful(daemon):
    d = daemon()
    engine = d.engine_pid()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=30) == 0
    assert not d.socket.exists()
    wait_for(lambda: not _alive(engine), timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of an exited parent is reaped by init soon; count it as gone.
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except OSError:
        return True


def test_busy_when_queue_full(daemon):
    d = daemon(None, "--max-batch", "1", "--max-queue", "1")
    with d.client() as c:
        running = c.generate("hello world", max_tokens=LONG, ignore_eos=True)
        next(running)
        queued = c.generate("hello world", max_tokens=5)
        with pytest.raises(Busy):
            next(c.generate("hello world", max_tokens=5))
        assert c.status()["requests"] == {"active": 1, "queued": 1}
        running.close()
        assert queued.collect().token_ids  # the queued one runs once a slot frees


def test_front_killed_engine_exits_and_its_channel_is_cleaned_at_the_next_start(daemon):
    d = daemon()
    engine = d.engine_pid()
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(timeout=10)
    wait_for(lambda: not _alive(engine), timeout=15)
    left = sorted(p.name for p in d.runtime_dir.glob("engine-*.sock"))
    assert left == [f"engine-{d.pid}-1.sock"]  # SIGKILL runs no cleanup (issue 18 item 9)
    (d.runtime_dir / "engine-notours.sock").touch()  # only the engine channel's own names are removed
    again = daemon(None, env={"MOED_RUNTIME_DIR": str(d.runtime_dir)}, ready=False)
    again.runtime_dir, again.socket = d.runtime_dir, d.socket
    again.wait_ready()
    names = {p.name for p in d.runtime_dir.iterdir()}
    assert f"engine-{d.pid}-1.sock" not in names and "engine-notours.sock" in names
    assert f"engine-{again.pid}-1.sock" in names


def test_tcp_needs_curve_and_loopback(daemon, tmp_path):
    import zmq

    from moed_client import Client
    from moed_client import protocol as P

    env = {"MOED_CURVE_DIR": str(tmp_path / "curve")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = daemon(None, "--tcp", f"127.0.0.1:{port}", env=env)
    key_files = list((tmp_path / "curve").rglob("*.key_secret"))
    assert key_files and all(oct(f.stat().st_mode & 0o777) == "0o600" for f in key_files)
    os.environ.update(env)
    try:
        with Client(f"tcp://127.0.0.1:{port}") as c:  # this user's keys: authorized
            assert c.complete("hello", max_tokens=3).token_ids
    finally:
        del os.environ["MOED_CURVE_DIR"]
    # A plain (unauthenticated) peer gets nothing back.
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(f"tcp://127.0.0.1:{port}")
    plain.send(P.pack(P.hello()))
    assert not plain.poll(1000)
    plain.close()
    # A non-loopback bind is refused unless asked for.
    refused = subprocess.run(
        [sys.executable, "-m", "moed.front", "serve", "--model", str(d.model), "--tcp", "0.0.0.0:1"],
        env={**os.environ, **env, "MOED_RUNTIME_DIR": str(d.runtime_dir) + "-x", "MOED_LOG_DIR": str(d.log_dir)},
        capture_output=True, text=True, timeout=60,
    )
    shutil.rmtree(str(d.runtime_dir) + "-x", ignore_errors=True)
    assert refused.returncode == 1 and "loopback" in refused.stderr


def test_model_from_environment(test_model):
    """moed serve reads the settings it shares with moectl from config.toml < MOED_* < flags."""
    from conftest import DaemonProcess

    d = DaemonProcess(None, (), env={"MOED_MODEL": str(test_model), "MOED_CONFIG": "/nonexistent/config.toml"})
    try:
        assert d.wait_ready()["model"]["path"] == str(test_model)
    finally:
        d.kill()


def test_unloadable_model_exits_with_reason(tmp_path, test_model):
    """A model the engine cannot load ends moed serve with status 1 and says why."""
    from conftest import short_tmpdir

    for f in test_model.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    runtime = short_tmpdir()
    env = {**os.environ, "MOED_RUNTIME_DIR": str(runtime), "MOED_LOG_DIR": str(runtime / "logs")}
    try:
        proc = subprocess.run([sys.executable, "-m", "moed.front", "serve", "--model", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert proc.returncode == 1
    assert "cannot load model" in proc.stderr


def test_model_is_resolved_after_the_socket_answers(tmp_path):
    """The daemon binds first and resolves the model after (so status can show a download);
    a repo that cannot be had offline still ends it with status 1 and a reason."""
    from conftest import short_tmpdir

    runtime = short_tmpdir()
    env = {**os.environ, "MOED_RUNTIME_DIR": str(runtime), "MOED_LOG_DIR": str(runtime / "logs"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "moed.front", "serve", "--model", "moed-test/not-in-the-cache"],
                                env=env, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert proc.returncode == 1
    assert "not in the Hugging Face cache" in stderr and "offline" in stderr


def test_lazy_experts_are_exact_and_reported(daemon, test_model):
    """--capacity passes through to moed.experts: output stays exact and status carries the manager's stats."""
    pytest.importorskip("moed.experts")
    from moed.models import read_config

    experts = read_config(test_model).get("num_experts") or 8
    full = daemon()
    with full.client() as c:
        expected = c.complete("the quick brown fox", max_tokens=24).text
    lazy = daemon(None, "--capacity", str(max(2, experts // 2)))
    with lazy.client() as c:
        out = c.complete("the quick brown fox", max_tokens=24)
        status = c.status()
    assert out.text == expected
    assert isinstance(status["experts"], dict) and status["experts"]


def test_sd_notify_ready_watchdog_stopping(daemon):
    from conftest import short_tmpdir

    where = short_tmpdir() / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(where))
    sock.settimeout(30)
    try:
        d = daemon(None, env={"NOTIFY_SOCKET": str(where), "WATCHDOG_USEC": "200000"}, ready=False)
        seen = []
        while "READY=1" not in seen or seen.count("WATCHDOG=1") < 2:
            seen.append(sock.recv(64).decode())
        with d.client() as c:
            assert c.status()["state"] == "ready"  # READY=1 came after the model loaded
            c.shutdown()
        while "STOPPING=1" not in seen:
            seen.append(sock.recv(64).decode())
        assert d.proc.wait(timeout=30) == 0
    finally:
        sock.close()
        shutil.rmtree(where.parent, ignore_errors=True)
