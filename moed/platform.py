"""Everything that differs between macOS and Linux lives here and only here:
service managers (launchd vs systemd), readiness notification, memory probing.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send an sd_notify datagram (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``...).

    Does nothing (returns False) unless systemd set ``NOTIFY_SOCKET``; launchd
    has no readiness protocol, so on macOS this is always a no-op.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket (Linux)
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half its deadline), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def open_uncached(path) -> int:
    """A read-only fd whose reads do not fill the page cache where the OS offers that (macOS F_NOCACHE).

    Pair it with ``evict_file_cache`` so reads measure the disk, not memory.
    """
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    if hasattr(fcntl, "F_NOCACHE"):
        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
    return fd


def evict_file_cache(fd: int) -> bool:
    """Drop a file's clean cached pages (Linux posix_fadvise DONTNEED); False where the OS has no such call."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True
