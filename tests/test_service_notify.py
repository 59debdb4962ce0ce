"""The daemon's systemd notifications, received on a real datagram socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import pytest

from conftest import short_tmpdir

WATCHDOG_USEC = 400_000  # systemd would expect a ping every 0.2 s


class NotifyListener:
    """Binds an AF_UNIX datagram socket, as systemd does, and records (time, message) pairs."""

    def __init__(self):
        self.dir = short_tmpdir()
        self.path = str(self.dir / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        # Like systemd, learn each sender's pid (Linux): with NotifyAccess=main only the main pid counts.
        self.credentials = hasattr(socket, "SO_PASSCRED")
        if self.credentials:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[float, str]] = []
        self.senders: set[int] = set()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.closed.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            except OSError:
                return
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == getattr(socket, "SCM_CREDENTIALS", None):
                    self.senders.add(int.from_bytes(payload[:4], sys.byteorder))  # struct ucred {pid, uid, gid}
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def first(self, message: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if m == message:
                    return t
            time.sleep(0.01)
        raise AssertionError(f"no {message} within {timeout} s; got {self.messages}")

    def close(self):
        self.closed.set()
        self.thread.join(2)
        self.sock.close()
        os.unlink(self.path)
        self.dir.rmdir()


@pytest.fixture
def listener():
    lst = NotifyListener()
    try:
        yield lst
    finally:
        lst.close()


@pytest.mark.slow
def test_ready_after_the_model_loaded_and_watchdog_from_the_event_loop(daemon, tiny_model, listener):
    d = daemon(tiny_model, ready=False, env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    d.wait_socket(60)
    saw_loading_at = []  # times a status request went out whose reply said the model was not loaded yet
    with d.client(timeout=10) as c:
        deadline = time.monotonic() + 120
        while True:
            sent = time.monotonic()
            state = c.status()["state"]
            if state == "ready":
                break
            saw_loading_at.append(sent)
            assert time.monotonic() < deadline, "daemon never became ready"
            time.sleep(0.02)
        ready_at = listener.first("READY=1", timeout=10)
        assert c.status()["state"] == "ready"
        # READY=1 never came while status said the model was still loading.
        assert all(ready_at > t for t in saw_loading_at)
        assert saw_loading_at, "the daemon was ready before its socket answered: the ordering was not observed"

        time.sleep(1.5)
        pings = [t for t, m in listener.messages if m == "WATCHDOG=1" and t > ready_at]
        assert len(pings) >= 4, listener.messages  # every 0.2 s: about 7 in 1.5 s
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps  # within systemd's deadline

        c.shutdown()
    listener.first("STOPPING=1", timeout=30)
    assert d.proc.wait(timeout=30) == 0
    if listener.credentials:
        assert listener.senders == {d.pid}  # the main process, not the engine (systemd would drop those)
    assert [m for _, m in listener.messages].count("READY=1") == 1

