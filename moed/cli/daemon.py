"""moectl start, stop, logs and service: the daemon's life as a process."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from moed import config as configuration
from moed import models, platform
from moed.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, CommandError
from moed.cli.runtime import (POLL_S, READY_STATES, STATUS_TIMEOUT_S, Runtime, console_log, pid_alive, pidfile_pid, query_status,
                              remove_leftovers, wait_for_exit, wait_until_ready)
from moed.cli.status import model_name
from moed.cli.switch import check_serves
from moed.config import Config
from moed_client import Client, MoedError

TERM_GRACE_S = 10.0  # after SIGTERM, before SIGKILL
KILL_GRACE_S = 5.0
DAEMON_SETTINGS = ("model", "memory_budget", "capacity", "approximate", "prefetch", "socket", "tcp", "http", "keep_alive",
                   "allow_switching", *(s.name for s in configuration.DAEMON))


def daemon_argv(cfg: Config, sources: frozenset[str] | None = None) -> list[str]:
    """``moed serve`` with absolute paths, so it runs the same from any directory or service manager."""
    args = cfg.serve_args(sources)
    for flag in ("--model", "--socket"):
        if flag in args:
            i = args.index(flag) + 1
            path = Path(args[i]).expanduser()
            if flag == "--socket" or path.exists():  # a model that is not a local path is a hub repo id
                args[i] = str(path.absolute())
    return [sys.executable, "-m", "moed.front", "serve", *args]


def daemon_environment(cfg: Config) -> dict[str, str]:
    """Environment a service-managed daemon needs from this shell (launchd passes none of it)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MOED_")}
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE"):  # never tokens: the file is readable by other tools
        if name in os.environ:
            env[name] = os.environ[name]
    env["MOED_LOG_DIR"] = str(cfg.log_path().parent)
    env.update(import_path_env())
    return env


def import_path_env(environ: dict | None = None) -> dict[str, str]:
    """PYTHONPATH so that ``python -m moed.front`` finds this moed from any directory (a source checkout too)."""
    environ = os.environ if environ is None else environ
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the moed package
    if root in {str(Path(p).resolve()) for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages")}:
        return {}
    current = environ.get("PYTHONPATH")
    if current and root in current.split(os.pathsep):
        return {"PYTHONPATH": current}
    return {"PYTHONPATH": os.pathsep.join([root, current] if current else [root])}


def cmd_start(args, cfg: Config) -> int:
    runtime = Runtime.of(cfg)
    status = query_status(runtime)
    if status is not None:
        check_serves(cfg, status)
    if status is not None and status.get("state") in READY_STATES:
        print(f"moed is already running (pid {status.get('pid')}, model {model_name(status)})")
        return 0
    # Loading, or started a moment ago (the daemon writes its pidfile before it binds the socket).
    pid = status.get("pid") if status is not None else pidfile_pid(runtime)
    if pid is not None:
        print(f"moed (pid {pid}) is already starting; waiting for it", file=sys.stderr)
        status = wait_until_ready(runtime, cfg.start_timeout, lambda: pidfile_pid(runtime) is not None, console_log(cfg))
        check_serves(cfg, status)
        return report_ready(status, runtime)

    t0 = time.monotonic()
    if platform.is_service_installed():
        changed = [n for n in DAEMON_SETTINGS if cfg.source and cfg.source[n] == "flag"]
        if changed:
            raise CommandError(
                f"moed runs as a {platform.service_manager()} service, so `moectl start` cannot change "
                f"{', '.join(changed)} for one run: put it in {configuration.config_path()} and restart, "
                "or run `moectl service install` with those flags",
                EXIT_USAGE,
            )
        platform.start_service()
        print(f"starting moed through {platform.service_manager()}", file=sys.stderr)
        alive = service_alive_check(runtime)
    else:
        # Resolve here first: a bad or dense model fails before anything starts, and a hub download
        # shows huggingface_hub's progress bars; the daemon then finds the model in the cache.
        models.resolve_model(cfg.model)
        proc = spawn_detached(cfg)
        print(f"starting moed (pid {proc.pid}); log: {cfg.log_path()}", file=sys.stderr)
        alive = lambda: proc.poll() is None  # noqa: E731
    try:
        status = wait_until_ready(runtime, cfg.start_timeout, alive, console_log(cfg))
    except KeyboardInterrupt:
        print("\nmoed keeps starting in the background: `moectl status` shows progress, `moectl stop` stops it", file=sys.stderr)
        return EXIT_INTERRUPTED
    return report_ready(status, runtime, time.monotonic() - t0)


def service_alive_check(runtime: Runtime, grace_s: float = 60.0) -> Callable[[], bool]:
    """For a service-managed daemon, whose process we do not own: gone once its pidfile lock is gone after a grace."""
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0 < grace_s or pidfile_pid(runtime) is not None


def spawn_detached(cfg: Config) -> subprocess.Popen:
    log = console_log(cfg)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MOED_LOG_DIR=str(cfg.log_path().parent), **import_path_env())
    # 0600 like the daemon's own logs: with --debug this file holds prompts too.
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        os.chmod(log, 0o600)
        return subprocess.Popen(
            daemon_argv(cfg),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            cwd=Path.home(),
            start_new_session=True,  # its own session: no terminal signals, survives this shell
            close_fds=True,
        )


def report_ready(status: dict, runtime: Runtime, elapsed: float | None = None) -> int:
    took = f" in {elapsed:.1f} s" if elapsed is not None else ""
    print(f"moed is ready{took}: model {model_name(status)} (pid {status.get('pid')}, socket {runtime.socket})")
    return 0


def cmd_stop(args, cfg: Config) -> int:
    runtime = Runtime.of(cfg)
    timeout = args.timeout if args.timeout is not None else cfg.stop_timeout
    status = query_status(runtime)
    pid = status.get("pid") if status else pidfile_pid(runtime)
    if pid is None:
        removed = remove_leftovers(runtime)
        note = f" (removed stale {', '.join(map(str, removed))})" if removed else ""
        print(f"moed is not running{note}")
        return 0
    if status is not None:
        active = (status.get("requests") or {}).get("active", 0)
        what = "cancelling" if args.now else "letting finish"
        print(f"stopping moed (pid {pid}); {what} {active} in-flight request(s)", file=sys.stderr)
        try:
            with Client(runtime.socket, timeout=STATUS_TIMEOUT_S, name="moectl") as client:
                client.shutdown(now=args.now)
        except MoedError as e:
            print(f"moed did not accept shutdown ({e}); signalling it", file=sys.stderr)
    else:
        print(f"moed (pid {pid}) does not answer; signalling it", file=sys.stderr)
    if not wait_for_exit(pid, timeout if status is not None else 0):
        escalate(pid, timeout)
    removed = remove_leftovers(runtime)
    if pid_alive(pid):
        raise CommandError(f"moed (pid {pid}) did not exit, even after SIGKILL")
    print(f"moed stopped{' (cleaned up ' + ', '.join(map(str, removed)) + ')' if removed else ''}")
    return 0


def escalate(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL; through the service manager when there is one (it would restart a killed daemon)."""
    if platform.is_service_installed():
        print(f"moed did not exit in {timeout:.0f} s; stopping it through {platform.service_manager()}", file=sys.stderr)
        try:
            platform.stop_service()
        except platform.ServiceError as e:
            print(f"moectl: {e}", file=sys.stderr)
        if wait_for_exit(pid, TERM_GRACE_S + KILL_GRACE_S):
            return
    print(f"sending SIGTERM to moed (pid {pid})", file=sys.stderr)
    signal_daemon(pid, signal.SIGTERM)
    if wait_for_exit(pid, TERM_GRACE_S):
        return
    print(f"moed ignored SIGTERM for {TERM_GRACE_S:.0f} s; sending SIGKILL", file=sys.stderr)
    signal_daemon(pid, signal.SIGKILL)
    wait_for_exit(pid, KILL_GRACE_S)


def signal_daemon(pid: int, sig: int) -> None:
    """Signal the daemon, and with it its engine when moectl started it as a process group leader."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def cmd_logs(args, cfg: Config) -> int:
    path = cfg.log_path()
    if not path.exists() and not args.follow:
        raise CommandError(f"no log yet at {path}")
    if path.exists():
        with open(path, errors="replace") as f:
            sys.stdout.writelines(f.readlines()[-args.lines :] if args.lines > 0 else [])
        sys.stdout.flush()
    if args.follow:
        try:
            follow(path, sys.stdout)
        except KeyboardInterrupt:
            return 0
    return 0


def follow(path: Path, out: TextIO, stop: Callable[[], bool] = lambda: False) -> None:
    """Print what is appended to ``path``, across truncation and rotation, until ``stop()``."""
    f, ino = None, None
    try:
        while not stop():
            try:
                st = path.stat()
            except FileNotFoundError:
                time.sleep(POLL_S)
                continue
            if f is None or st.st_ino != ino or st.st_size < f.tell():
                if f is not None:
                    out.write(f.read())  # the rest of the rotated file
                    f.close()
                first = f is None
                f, ino = open(path, errors="replace"), st.st_ino
                if first:
                    f.seek(0, os.SEEK_END)
            data = f.read()
            if data:
                out.write(data)
                out.flush()
            else:
                time.sleep(POLL_S)
    finally:
        if f is not None:
            f.close()


def cmd_service(args, cfg: Config) -> int:
    manager = platform.service_manager()
    if manager is None:
        raise CommandError(f"no service manager moed knows on {sys.platform}; `moectl start` runs moed as a detached process")
    if args.action == "uninstall":
        runtime = Runtime.of(cfg)
        pid = pidfile_pid(runtime)
        if not platform.uninstall_service(manager=manager):
            print(f"moed is not installed as a {manager} service")
            return 0
        if pid is not None and not wait_for_exit(pid, cfg.stop_timeout + TERM_GRACE_S):
            escalate(pid, cfg.stop_timeout)
        remove_leftovers(runtime)
        print(f"removed the {manager} service (moed stopped)")
        return 0

    runtime = Runtime.of(cfg)
    running = query_status(runtime)
    if running is not None and not platform.is_service_installed(manager):
        raise CommandError(f"moed is running outside {manager} (pid {running.get('pid')}); stop it first with `moectl stop`")
    if running is not None:  # reinstalling: the old definition's daemon gives way to the new one
        cmd_stop(argparse.Namespace(now=False, timeout=None), cfg)
    spec = platform.ServiceSpec(
        # Only flags go into the definition: the daemon reads config.toml and the MOED_* variables
        # (kept in the definition's environment) at every start, so edits apply on restart.
        program=daemon_argv(cfg, sources=frozenset({"flag"})),
        log_path=console_log(cfg),
        working_directory=Path.home(),
        environment=daemon_environment(cfg),
        start_timeout_s=int(cfg.start_timeout),
        exit_timeout_s=int(cfg.stop_timeout + TERM_GRACE_S),
    )
    path = platform.install_service(spec, manager=manager)
    print(f"installed {path}; moed now starts at login", file=sys.stderr)
    if args.no_start:
        return 0
    if manager != "launchd":  # launchd started it already (RunAtLoad)
        platform.start_service(manager=manager)
    status = wait_until_ready(runtime, cfg.start_timeout, service_alive_check(runtime), console_log(cfg))
    return report_ready(status, runtime)
