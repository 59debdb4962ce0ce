"""Log files: one per process in the platform log dir (or ``MOED_LOG_DIR``), for their owner only.

Both the front and the engine process log through here, so neither imports the other for it.
The log dir gets the runtime dir's checks (moed_client.paths.ensure_private_dir: ours, 0700,
not a link, refused when others can write to it), and a log file is opened without following
a link: otherwise another user could plant ``moed.log -> <a file of ours>`` and have the daemon
chmod and append to it. Each file rotates at MAX_LOG_BYTES by renaming (``moed.log`` ->
``moed.log.1`` ...), which ``moectl logs -f`` follows, since it notices the new inode.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys
from pathlib import Path

import platformdirs
from moed_client.paths import ensure_private_dir

MAX_LOG_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3  # moed.log.1 .. moed.log.3


class LogDirError(PermissionError):
    """A log dir or log file moed will not write to; the message names it and why."""


def log_dir() -> Path:
    override = os.environ.get("MOED_LOG_DIR")
    return Path(override) if override else Path(platformdirs.user_log_dir("moed", ensure_exists=False))


def private_log_dir(directory: Path | None = None) -> Path:
    """``directory`` (default: log_dir()) made 0700, or LogDirError when it is not safe to log into."""
    directory = Path(directory) if directory is not None else log_dir()
    try:
        return ensure_private_dir(directory, what="logs")
    except PermissionError as e:
        raise LogDirError(f"log dir: {e}") from None


def open_private(path: Path) -> int:
    """An O_APPEND descriptor on ``path``, created 0600; LogDirError for a link or another user's file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if os.path.islink(path):
            raise LogDirError(f"{path} is a symbolic link; refusing to follow it (remove it if it is yours)") from None
        raise LogDirError(f"cannot open the log {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink != 1:
        os.close(fd)
        raise LogDirError(f"{path} is not a plain file of yours with one link; refusing to log into it")
    os.fchmod(fd, 0o600)  # logs name models and paths, and with --debug hold prompts: for their owner only
    return fd


class PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose every (re)open goes through open_private."""

    def __init__(self, path: Path, max_bytes: int = MAX_LOG_BYTES, backups: int = LOG_BACKUPS):
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self.stream = self._open()  # at once, so a refused file fails the start, not the first line

    def _open(self):
        return open(open_private(Path(self.baseFilename)), "a", encoding="utf-8", errors="backslashreplace")


def rotate_if_large(path: Path, max_bytes: int = MAX_LOG_BYTES, backups: int = LOG_BACKUPS) -> None:
    """Rotate a file another process writes through a plain descriptor (the console log moectl
    hands the daemon as stderr) before it is opened again: such a file cannot rotate while open."""
    try:
        if os.lstat(path).st_size <= max_bytes:
            return
    except FileNotFoundError:
        return
    for i in range(backups - 1, 0, -1):
        older = Path(f"{path}.{i}")
        if older.exists():
            os.replace(older, f"{path}.{i + 1}")
    os.replace(path, f"{path}.1")


def setup_logging(name: str, debug: bool = False) -> Path:
    """Log to ``<log dir>/<name>.log`` and stderr; returns the file's path. LogDirError if unsafe."""
    path = private_log_dir() / f"{name}.log"
    file_handler = PrivateRotatingHandler(path)
    fmt = logging.Formatter(f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in (file_handler, logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    return path
