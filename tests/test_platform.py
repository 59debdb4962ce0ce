"""Platform helpers: sd_notify datagrams, watchdog interval, memory and process probes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from moed import platform


@pytest.fixture
def notify_socket(monkeypatch):
    path = os.path.join(tempfile.mkdtemp(prefix="moed-", dir="/tmp"), "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield sock
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


def test_notify_sends_a_datagram(notify_socket):
    assert platform.notify("READY=1") is True
    assert notify_socket.recv(4096) == b"READY=1"


def test_notify_is_a_no_op_without_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert platform.notify("READY=1") is False


def test_notify_to_a_dead_socket_is_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert platform.notify("WATCHDOG=1") is False


def test_watchdog_interval_is_half_the_deadline_and_only_for_this_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert platform.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert platform.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert platform.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert platform.watchdog_interval() is None


def test_total_memory_is_plausible():
    total = platform.total_memory_bytes()
    assert total is not None and 256 << 20 < total < 1 << 50


def test_process_rss_follows_allocations():
    code = "import sys; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); sys.stdin.read()"
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        try:
            assert p.stdout.readline().strip() == b"ok"
            rss = platform.process_rss_bytes(p.pid)
            assert rss is not None and 200 << 20 <= rss < 1 << 30
        finally:
            p.kill()
    assert platform.process_rss_bytes(p.pid) is None


def test_process_command_names_the_program():
    assert "python" in platform.process_command(os.getpid()).lower()
    with subprocess.Popen([sys.executable, "-c", "pass"]) as p:
        pass
    assert platform.process_command(p.pid) is None


def test_process_is_zombie_only_between_exit_and_reaping():
    assert not platform.process_is_zombie(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while not platform.process_is_zombie(p.pid):  # exited, not yet waited for
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        p.wait()
    assert not platform.process_is_zombie(p.pid)  # reaped: gone, not a zombie


async def test_where_the_rss_probe_blocks_status_never_runs_it_on_the_event_loop(monkeypatch, tmp_path):
    """macOS has no /proc: the probe runs `ps`. The front's status must then read figures a thread took."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from moed.front import server as moed_daemon

    callers = []

    def probe(pid):
        callers.append(threading.current_thread())
        return 4096

    monkeypatch.setattr(platform, "rss_probe_blocks", lambda: True)
    monkeypatch.setattr(platform, "process_rss_bytes", probe)
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(tmp_path))
    d = moed_daemon.Daemon(SimpleNamespace(model=None, memory_budget=None), moed_daemon.RuntimeFiles(tmp_path / "moed.sock"))
    try:
        assert d.status()["memory"]["front_rss_bytes"] is None and not callers  # not probed yet: unknown, not blocking
        refresher = asyncio.ensure_future(d.meters.refresh_rss(d.pids))
        for _ in range(200):
            if d.status()["memory"]["front_rss_bytes"] == 4096:
                break
            await asyncio.sleep(0.01)
        refresher.cancel()
        assert d.status()["memory"]["front_rss_bytes"] == 4096
        assert callers and threading.main_thread() not in callers
    finally:
        d.ctx.term()


def test_on_linux_the_rss_probe_reads_proc():
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    assert platform.rss_probe_blocks() is False


def test_release_free_memory_gives_freed_heap_pages_back():
    """Freed malloc memory pinned by a few live blocks stays resident until trimmed (glibc); a no-op elsewhere."""
    code = """
import sys
from moed import platform
blocks = [bytearray(b"x" * 60000) for _ in range(3000)]  # ~180 MB below the mmap threshold: the heap
keep = blocks[::100]  # a few live blocks keep the heap from shrinking by itself
del blocks
before = platform.process_rss_bytes()
released = platform.release_free_memory()
print(released, before, platform.process_rss_bytes())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    released, before, after = out[0] == "True", int(out[1]), int(out[2])
    if not sys.platform.startswith("linux"):
        assert not released and abs(after - before) < 50 << 20
        return
    assert released and before - after > 100 << 20, (before, after)
