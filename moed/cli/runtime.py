"""Finding the daemon (its socket, pidfile and console log) and waiting, with progress, until it is ready."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from moed import platform
from moed.cli.common import CommandError
from moed.config import Config
from moed_client import Client, DaemonNotRunning, Timeout, paths

POLL_S = 0.2  # how often start/stop look at the daemon (5 Hz)
READY_STATES = ("ready", "unloaded")  # unloaded (keep-alive): the next request loads the model again
STATUS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Runtime:
    """Where one daemon's socket and pidfile are, following the daemon's own rules (moed serve --socket)."""

    socket: Path
    pidfile: Path

    @classmethod
    def of(cls, cfg: Config) -> "Runtime":
        if not cfg.socket:
            return cls(paths.daemon_socket(), paths.pidfile())
        socket_path = Path(cfg.socket).expanduser().absolute()
        if os.environ.get("MOED_RUNTIME_DIR"):
            return cls(socket_path, paths.pidfile())
        return cls(socket_path, socket_path.parent / paths.pidfile().name)


def query_status(runtime: Runtime, timeout: float | None = None) -> dict | None:
    """The daemon's status reply, or None when no daemon answers."""
    timeout = STATUS_TIMEOUT_S if timeout is None else timeout
    if runtime.socket.exists() and pidfile_pid(runtime) is None:
        return None  # a socket left by a daemon that died: nobody would answer, do not wait for it
    try:
        with Client(runtime.socket, timeout=timeout, connect_timeout=timeout, name="moectl") as client:
            return client.status()
    except (DaemonNotRunning, Timeout):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child, so it does not linger as a zombie
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An exited process that another parent has not reaped yet (a daemon killed under a
    # shell or test runner) still answers kill(pid, 0), but it is no longer moed.
    return not platform.process_is_zombie(pid)


def pidfile_pid(runtime: Runtime) -> int | None:
    """The pid in the pidfile if that process is alive and is moed (pids get reused)."""
    try:
        pid = int(runtime.pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 0 or not pid_alive(pid):
        return None
    command = platform.process_command(pid)
    if command is not None and "moed" not in command:
        return None
    return pid


def remove_leftovers(runtime: Runtime) -> list[Path]:
    """Delete the sockets and pidfile of a daemon that is gone (a killed one cannot remove its own)."""
    if pidfile_pid(runtime) is not None:
        return []
    files = [runtime.socket, runtime.socket.with_name(paths.editor_socket().name)]
    try:
        dead = int(runtime.pidfile.read_text().split()[0])
        files += sorted(runtime.pidfile.parent.glob(f"engine-{dead}-*.sock"))  # named so by moed.front
    except (OSError, ValueError, IndexError):
        pass
    removed = []
    for path in files + [runtime.pidfile]:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S / 2)
    return True


class ProgressLine:
    """Shows the daemon's progress: one rewritten line on a terminal, a line per change elsewhere."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = out.isatty()
        self.last = None

    def show(self, progress: dict | None, elapsed: float) -> None:
        progress = progress or {}
        stage = progress.get("stage") or "starting"
        message = progress.get("message") or ""
        fraction = progress.get("fraction")
        pct = f" {100 * fraction:3.0f}%" if isinstance(fraction, (int, float)) else ""
        text = f"[{stage}] {message}{pct}"
        if self.tty:
            self.out.write(f"\r\033[K{text} ({elapsed:.0f} s)")
            self.out.flush()
        elif (stage, message) != self.last:
            print(text, file=self.out, flush=True)
        self.last = (stage, message)

    def done(self) -> None:
        if self.tty and self.last is not None:
            self.out.write("\r\033[K")
            self.out.flush()


def wait_until_ready(runtime: Runtime, timeout: float, alive: Callable[[], bool], log_hint: Path, out: TextIO = sys.stderr) -> dict:
    """Poll status (5 Hz) and render progress until the model is ready; the final status.

    ``alive`` says whether the daemon process may still come up; when it turns
    False the start failed.
    """
    start = time.monotonic()
    line = ProgressLine(out)
    try:
        while True:
            elapsed = time.monotonic() - start
            status = query_status(runtime, timeout=2.0)
            if status is not None:
                if status.get("state") in READY_STATES:
                    return status
                if status.get("state") == "stopping":
                    raise CommandError("moed is stopping; run `moectl start` again once it has exited")
                line.show(status.get("progress"), elapsed)
            elif not alive():
                raise CommandError(f"moed exited while starting.\n{log_tail(log_hint)}")
            else:
                line.show({"stage": "starting", "message": "waiting for the daemon"}, elapsed)
            if elapsed > timeout:
                raise CommandError(
                    f"moed is not ready after {timeout:.0f} s; it keeps loading in the background "
                    f"(`moectl status` shows progress, `moectl logs` the log, `moectl stop` stops it)"
                )
            time.sleep(POLL_S)
    finally:
        line.done()


def console_log(cfg: Config) -> Path:
    """Where the daemon's stdout and stderr go (crashes before logging starts end up only here)."""
    return cfg.log_path().with_name("moed.stderr.log")


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"last lines of {path}:\n" + "\n".join("  " + t for t in text)
