"""The daemon's runtime files: the pidfile lock (one daemon per runtime dir) and private sockets."""

from __future__ import annotations

import fcntl
import logging
import os
import re
from pathlib import Path

from moed_client import paths

log = logging.getLogger("moed.daemon")

# The engine channel's name (moed/front/supervisor.py): engine-<front pid>-<engine number>.sock
ENGINE_SOCKET = re.compile(r"engine-\d+-\d+\.sock")


class DaemonError(Exception):
    """A reason the daemon cannot start, with a message meant for a person."""


def bind_private(sock, path: Path) -> None:
    """Bind a ZeroMQ socket to an ipc path that is born 0600: no window where others could connect."""
    with paths.born_private():
        sock.bind(paths.endpoint(path))
    os.chmod(path, 0o600)  # says so twice, as the editor door does


class RuntimeFiles:
    """The pidfile lock and the socket path of one daemon.

    An flock on the pidfile decides who owns the runtime dir: libzmq would
    silently take over a live daemon's ipc path, so a second daemon must find
    out before it binds. The lock dies with its process, so a socket left by
    a crashed daemon is stale and is removed.
    """

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self.pidfile = paths.pidfile()
        self._fd = None

    def acquire(self) -> None:
        self._lock()
        if self.socket_path.exists() or self.socket_path.is_symlink():
            log.info("removing stale socket %s", self.socket_path)
            self.socket_path.unlink()
        self.remove_stale_engine_sockets()

    def remove_stale_engine_sockets(self) -> None:
        """Engine channels a killed daemon left (SIGKILL runs no cleanup). Under our lock on the
        pidfile no other daemon uses this dir, so every one of them is stale."""
        for path in self.pidfile.parent.iterdir():
            if ENGINE_SOCKET.fullmatch(path.name):
                log.info("removing stale engine socket %s", path)
                path.unlink(missing_ok=True)

    def _lock(self) -> None:
        paths.ensure_private_dir(self.pidfile.parent)
        fd = os.open(self.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonError(f"moed is already running (pid {other}, socket {self.socket_path}); stop it first with `moectl stop`") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def pidfile_held(self) -> bool:
        """Whether the pidfile on disk is still the one this daemon locked (not deleted or replaced)."""
        try:
            st = os.stat(self.pidfile)
        except FileNotFoundError:
            return False
        own = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def relock(self) -> None:
        """Lock a new pidfile after ours was deleted: without it a second daemon would start beside
        this one, and moectl would not find this one. DaemonError if another daemon got there first."""
        old, self._fd = self._fd, None
        try:
            self._lock()
        except BaseException:
            self._fd = old
            raise
        os.close(old)

    def release(self) -> None:
        for path in (self.socket_path, self.pidfile):
            if path == self.pidfile and self._fd is not None and not self.pidfile_held():
                continue  # another daemon's now (ours was deleted under us)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
