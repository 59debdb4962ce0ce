"""Where the daemon's sockets live. Shared by the daemon and every client.

Sockets go in the user's runtime dir (platformdirs), in a 0700 directory.
``MOED_RUNTIME_DIR`` overrides it (tests and side-by-side daemons use that).
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import platformdirs

APP = "moed"


def runtime_dir() -> Path:
    override = os.environ.get("MOED_RUNTIME_DIR")
    if override:
        return Path(override)
    return Path(platformdirs.user_runtime_dir(APP, ensure_exists=False))


def daemon_socket() -> Path:
    return runtime_dir() / "moed.sock"


def editor_socket() -> Path:
    return runtime_dir() / "editor.sock"


def pidfile() -> Path:
    return runtime_dir() / "moed.pid"


def endpoint(socket_path: Path | str | None = None) -> str:
    """The ZeroMQ endpoint for a socket path (or an explicit tcp:// endpoint)."""
    if socket_path is None:
        socket_path = daemon_socket()
    s = str(socket_path)
    if s.startswith(("ipc://", "tcp://")):
        return s
    return "ipc://" + s


@contextmanager
def born_private():
    """Files and sockets made inside are born 0600 (umask 177: a socket is made 0777 less the umask), so
    none is ever open to others between its creation and a chmod. Not for making directories (they
    would lack x). The umask is the process's: other threads' files made meanwhile are only more private."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def ensure_private_dir(path: Path, what: str = "sockets") -> Path:
    """Create ``path`` 0700, or refuse one that other users could write into (``what``: what goes there)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a plain directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path} is writable by other users (mode {oct(st.st_mode & 0o777)}); refusing to put {what} there")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
