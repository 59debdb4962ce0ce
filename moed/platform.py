"""Everything that differs between macOS and Linux lives here and only here:
service managers (launchd vs systemd), readiness notification, memory probing.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Callable
from xml.sax.saxutils import escape as xml_escape


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


def evict_file_cache(fd: int, offset: int = 0, length: int = 0) -> bool:
    """Drop a file's clean cached pages (Linux posix_fadvise DONTNEED), all of
    them or ``length`` bytes from ``offset``; False where the OS has no such call."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    return True


# --------------------------------------------------------------------------
# Service managers: a LaunchAgent on macOS, a systemd user unit on Linux.

LAUNCHD_LABEL = "com.moed.daemon"
SYSTEMD_UNIT = "moed.service"
_TEMPLATES = Path(__file__).parent / "templates"

Runner = Callable[[list], subprocess.CompletedProcess]


class ServiceError(Exception):
    """A service manager refused an operation; the message says which command and why."""


@dataclass(frozen=True)
class ServiceSpec:
    """What a service definition needs: the daemon's argv (absolute paths) and where it logs."""

    program: list[str]
    log_path: Path
    working_directory: Path
    environment: dict[str, str] = field(default_factory=dict)
    start_timeout_s: int = 1800
    exit_timeout_s: int = 60
    watchdog_s: int = 30


def service_manager() -> str | None:
    """``"launchd"``, ``"systemd"``, or None where moed knows no service manager."""
    if sys.platform == "darwin":
        return "launchd"
    if sys.platform.startswith("linux") and shutil.which("systemctl") and os.path.isdir("/run/systemd/system"):
        return "systemd"  # /run/systemd/system exists only when systemd is the running init (sd_booted)
    return None


def service_file(manager: str | None = None, home: Path | None = None) -> Path:
    manager = manager or service_manager()
    home = Path.home() if home is None else home
    if manager == "launchd":
        return home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    if manager == "systemd":
        config_home = os.environ.get("XDG_CONFIG_HOME") if home == Path.home() else None
        return Path(config_home or home / ".config") / "systemd" / "user" / SYSTEMD_UNIT
    raise ServiceError(f"no supported service manager on {sys.platform}: use `moectl start` to run moed as a detached process")


def is_service_installed(manager: str | None = None, home: Path | None = None) -> bool:
    manager = manager or service_manager()
    return manager is not None and service_file(manager, home).is_file()


def render_plist(spec: ServiceSpec) -> str:
    def string(value: str, indent: str) -> str:
        return f"{indent}<string>{xml_escape(str(value))}</string>"

    environment = "\n".join(
        f"\t\t<key>{xml_escape(k)}</key>\n{string(v, chr(9) * 2)}" for k, v in sorted(spec.environment.items())
    )
    return Template((_TEMPLATES / "com.moed.daemon.plist.in").read_text()).substitute(
        label=LAUNCHD_LABEL,
        program_arguments="\n".join(string(a, "\t\t") for a in spec.program),
        environment=environment,
        working_directory=xml_escape(str(spec.working_directory)),
        exit_timeout=int(spec.exit_timeout_s),
        log_path=xml_escape(str(spec.log_path)),
    )


def _systemd_quote(value: str, command: bool = True) -> str:
    """One quoted word of a unit: specifiers (%) escaped, and $ too in commands, where systemd expands variables."""
    value = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if command:
        value = value.replace("$", "$$")
    if "\n" in value:
        raise ServiceError(f"a newline cannot go into a systemd unit: {value!r}")
    return f'"{value}"'


def render_systemd_unit(spec: ServiceSpec) -> str:
    environment = "\n".join(f"Environment={_systemd_quote(f'{k}={v}', command=False)}" for k, v in sorted(spec.environment.items()))
    for path in (spec.log_path, spec.working_directory):
        if any(c.isspace() for c in str(path)) or "%" in str(path):
            raise ServiceError(f"systemd cannot take this path in a unit (spaces or %): {path}")
    return Template((_TEMPLATES / "moed.service.in").read_text()).substitute(
        exec_start=" ".join(_systemd_quote(a) for a in spec.program),
        environment=environment,
        working_directory=spec.working_directory,
        watchdog_sec=int(spec.watchdog_s),
        start_timeout=int(spec.start_timeout_s),
        exit_timeout=int(spec.exit_timeout_s),
        log_path=spec.log_path,
    )


def _run(argv: list) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: command not found")


def _checked(run: Runner, argv: list) -> subprocess.CompletedProcess:
    result = run(argv)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip()
        raise ServiceError(f"`{' '.join(map(str, argv))}` failed ({result.returncode}): {detail}")
    return result


def _launchd_domain() -> str:
    return f"gui/{os.getuid()}"


def _launchd_target() -> str:
    return f"{_launchd_domain()}/{LAUNCHD_LABEL}"


def _systemctl(*args: str) -> list[str]:
    return ["systemctl", "--user", *args]


def install_service(spec: ServiceSpec, *, manager: str | None = None, run: Runner = _run, home: Path | None = None) -> Path:
    """Write the service definition and register it; launchd starts it at once (RunAtLoad)."""
    manager = manager or service_manager()
    path = service_file(manager, home)
    text = render_plist(spec) if manager == "launchd" else render_systemd_unit(spec)
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if manager == "launchd" and run(["launchctl", "print", _launchd_target()]).returncode == 0:
        run(["launchctl", "bootout", _launchd_target()])  # a loaded old definition would shadow the new file
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    if manager == "launchd":
        _checked(run, ["launchctl", "bootstrap", _launchd_domain(), str(path)])
    else:
        _checked(run, _systemctl("daemon-reload"))
        _checked(run, _systemctl("enable", SYSTEMD_UNIT))
    return path


def uninstall_service(*, manager: str | None = None, run: Runner = _run, home: Path | None = None) -> bool:
    """Stop and unregister the service and delete its file; False if none was installed."""
    manager = manager or service_manager()
    path = service_file(manager, home)
    if not path.exists():
        return False
    if manager == "launchd":
        run(["launchctl", "bootout", _launchd_target()])  # fails harmlessly when it is not loaded
        path.unlink()
    else:
        run(_systemctl("disable", "--now", SYSTEMD_UNIT))
        path.unlink()
        _checked(run, _systemctl("daemon-reload"))
    return True


def start_service(*, manager: str | None = None, run: Runner = _run) -> None:
    """Ask the service manager to start the daemon and return at once (readiness is polled by the caller)."""
    manager = manager or service_manager()
    if manager == "launchd":
        if run(["launchctl", "print", _launchd_target()]).returncode == 0:
            _checked(run, ["launchctl", "kickstart", _launchd_target()])
        else:  # booted out by `moectl stop`: load it again, which starts it (RunAtLoad)
            _checked(run, ["launchctl", "bootstrap", _launchd_domain(), str(service_file(manager))])
    else:
        _checked(run, _systemctl("start", "--no-block", SYSTEMD_UNIT))


def stop_service(*, manager: str | None = None, run: Runner = _run) -> None:
    """Have the service manager stop the daemon: SIGTERM, then SIGKILL after the definition's exit timeout.

    launchd would restart a job killed by a signal (KeepAlive), so the job is booted out instead;
    ``start_service`` bootstraps it again.
    """
    manager = manager or service_manager()
    if manager == "launchd":
        run(["launchctl", "bootout", _launchd_target()])
    else:
        _checked(run, _systemctl("stop", SYSTEMD_UNIT))


# --------------------------------------------------------------------------
# Processes and memory


def total_memory_bytes() -> int | None:
    """Physical memory of this machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"]).stdout.strip()
        return int(out) if out.isdigit() else None
    return None


def process_rss_bytes(pid: int | None = None) -> int | None:
    """Resident memory (now, not the peak) of a process (default: this one), or None if it is gone."""
    pid = os.getpid() if pid is None else pid
    statm = Path(f"/proc/{pid}/statm")
    if statm.exists():
        try:
            return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None
    out = _run(["ps", "-o", "rss=", "-p", str(pid)]).stdout.strip()  # KiB on macOS and BSDs
    return int(out) * 1024 if out.isdigit() else None


def rss_probe_blocks() -> bool:
    """Whether ``process_rss_bytes`` runs a program (``ps``, where there is no /proc: macOS)
    instead of reading a file; an event loop must then call it from a thread."""
    return not Path("/proc/self/statm").exists()


def process_is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but its parent has not reaped it yet: it still
    answers ``kill(pid, 0)`` yet runs nothing and holds no sockets or locks."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.joinpath("self").exists():
        try:
            # "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ')'
            return stat.read_text().rpartition(")")[2].split()[0] in ("Z", "X")
        except (OSError, IndexError):
            return False  # gone meanwhile: not a zombie (the caller's kill(pid, 0) tells it is gone)
    return _run(["ps", "-o", "stat=", "-p", str(pid)]).stdout.strip().startswith("Z")


def release_free_memory() -> bool:
    """Hand the pages of heap memory that was freed back to the OS (glibc's ``malloc_trim``).

    glibc keeps what a burst of requests freed inside its arenas, resident, for
    later reuse; a long-running service that then sits idle should give it
    back. Returns False, doing nothing, where there is no such call (macOS,
    whose allocator returns free pages by itself; musl).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def process_command(pid: int) -> str | None:
    """The command line of a process (to tell a stale pidfile from a live daemon), or None."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            # empty for a zombie, or for a moment while the process execs: unknown, not "no command"
            return cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip() or None
        except OSError:
            return None
    out = _run(["ps", "-o", "command=", "-p", str(pid)]).stdout.strip()
    return out or None


def drop_file_cache(path) -> bool:
    """Ask the OS to forget cached pages of ``path`` so the next reads hit the disk.

    Linux: posix_fadvise(DONTNEED). macOS has no per-file eviction; there the
    caller should read through ``open_uncached`` instead. Returns whether the
    cache was dropped.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def open_uncached(path) -> int:
    """A read-only fd whose reads bypass the page cache where the OS allows it."""
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    else:
        import fcntl

        if hasattr(fcntl, "F_NOCACHE"):  # macOS
            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
    return fd
