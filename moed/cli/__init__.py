"""moectl: start, stop and watch the moed daemon, and talk to its model.

Every command reads the configuration (config.toml < MOED_* < flags, see
moed.config) and talks protocol v1 through moed_client. Exit codes: 0 success,
1 failure, 2 usage error, 3 ``status``: not running, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from moed_client import Client, DaemonNotRunning, MoedError, Timeout, paths

from moed import config as configuration
from moed import models, platform
from moed.config import Config, ConfigError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_INTERRUPTED = 130

POLL_S = 0.2  # how often start/stop look at the daemon (5 Hz)
TERM_GRACE_S = 10.0  # after SIGTERM, before SIGKILL
KILL_GRACE_S = 5.0
STATUS_TIMEOUT_S = 5.0
# Daemon settings: a service-managed daemon takes them from its definition and config.toml, not from `moectl start`.
DAEMON_SETTINGS = ("model", "memory_budget", "capacity", "approximate", "prefetch", "socket", "tcp", "http")


class CommandError(Exception):
    """A failure to report to the person in one line (exit code ``code``)."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------
# Finding the daemon


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


# --------------------------------------------------------------------------
# Progress while the model loads


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
                if status.get("state") == "ready":
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


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"last lines of {path}:\n" + "\n".join("  " + t for t in text)


# --------------------------------------------------------------------------
# start / stop


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


def console_log(cfg: Config) -> Path:
    """Where the daemon's stdout and stderr go (crashes before logging starts end up only here)."""
    return cfg.log_path().with_name("moed.stderr.log")


def cmd_start(args, cfg: Config) -> int:
    runtime = Runtime.of(cfg)
    status = query_status(runtime)
    if status is not None and status.get("state") == "ready":
        print(f"moed is already running (pid {status.get('pid')}, model {model_name(status)})")
        return 0
    # Loading, or started a moment ago (the daemon writes its pidfile before it binds the socket).
    pid = status.get("pid") if status is not None else pidfile_pid(runtime)
    if pid is not None:
        print(f"moed (pid {pid}) is already starting; waiting for it", file=sys.stderr)
        status = wait_until_ready(runtime, cfg.start_timeout, lambda: pidfile_pid(runtime) is not None, console_log(cfg))
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


# --------------------------------------------------------------------------
# status


def model_name(status: dict) -> str:
    model = status.get("model")
    if isinstance(model, dict):
        return str(model.get("name") or model.get("path") or "?")
    return str(model or "?")


def status_object(cfg: Config) -> dict:
    """``moectl status --json``: the daemon's status reply plus running, socket, pidfile, log and service."""
    runtime = Runtime.of(cfg)
    status = query_status(runtime)
    manager = platform.service_manager()
    extra = {
        "socket": str(runtime.socket),
        "pidfile": str(runtime.pidfile),
        "log": str(cfg.log_path()),
        "service": {"manager": manager, "installed": platform.is_service_installed(manager) if manager else False},
    }
    if status is not None:
        status.pop("type", None)
        return {"running": True, **status, **extra}
    pid = pidfile_pid(runtime)
    return {"running": False, "state": "unresponsive" if pid else "stopped", "pid": pid, **extra}


def cmd_status(args, cfg: Config) -> int:
    obj = status_object(cfg)
    if args.json:
        print(json.dumps(obj, sort_keys=True))
    else:
        print(format_status(obj))
    if obj["running"]:
        return 0
    return EXIT_FAILURE if obj["state"] == "unresponsive" else EXIT_NOT_RUNNING


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}d {h}h {m:02d}m" if d else f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def format_status(obj: dict) -> str:
    size = configuration.format_size
    if not obj["running"]:
        if obj["state"] == "unresponsive":
            return f"moed (pid {obj['pid']}) holds {obj['pidfile']} but does not answer on {obj['socket']}; `moectl stop` stops it"
        return "moed is not running (start it with `moectl start`)"
    rows = []
    state = obj.get("state")
    head = f"moed is running ({state})"
    if state != "ready":
        p = obj.get("progress") or {}
        fraction = p.get("fraction")
        head += f": [{p.get('stage')}] {p.get('message')}" + (f" {100 * fraction:.0f}%" if isinstance(fraction, (int, float)) else "")
    engine = f" (engine {obj['engine_pid']})" if obj.get("engine_pid") else ""
    rows.append(("pid", f"{obj.get('pid')}{engine}, up {format_duration(obj.get('uptime_s') or 0)}"))
    model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
    rows.append(("model", f"{model_name(obj)}" + (f" ({model['path']})" if model.get("path") else "")))
    memory = obj.get("memory") or {}
    budget = memory.get("budget_bytes")
    experts = obj.get("experts")
    unbounded = "none" if experts else "none (whole model in memory)"
    rows.append(("memory", f"{size(memory.get('rss_bytes'))} resident, budget {size(budget) if budget else unbounded}"))
    requests = obj.get("requests") or {}
    rows.append(("requests", f"{requests.get('active', 0)} active, {requests.get('queued', 0)} queued; {obj.get('clients', 0)} client(s)"))
    rows.append(("speed", f"{obj.get('recent_tok_s') or 0:.1f} tok/s (recent)"))
    if isinstance(experts, dict) and experts:
        rows.append(("experts", format_experts(experts)))
    rows.append(("socket", obj["socket"]))
    if obj.get("editor_socket"):
        rows.append(("editor", obj["editor_socket"]))
    rows.append(("log", obj["log"]))
    service = obj.get("service") or {}
    if service.get("installed"):
        rows.append(("service", f"{service['manager']} (installed)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


def format_experts(experts: dict) -> str:
    """The expert-cache figures a person looks at; `status --json` has them all."""

    def pct(value) -> str:
        return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"

    prefetch = experts.get("prefetch") if isinstance(experts.get("prefetch"), dict) else {}
    parts = [f"hit rate {pct(experts.get('hit_rate'))}"]
    if prefetch:
        parts.append(f"prefetch recall {pct(prefetch.get('recall'))}, precision {pct(prefetch.get('precision'))}")
    parts.append(f"{configuration.format_size(experts.get('bytes_read'))} read from disk")
    if experts.get("decode_steps"):  # redone: an expert was missing, the exact pass ran again
        parts.append(f"{experts.get('redos', 0)}/{experts['decode_steps']} decode forwards redone")
    if experts.get("slots"):
        parts.append(f"{experts.get('resident', 0)}/{experts['slots']} slots filled ({experts.get('capacity')} per layer)")
    if experts.get("approximate"):
        parts.append("approximate")
    return ", ".join(parts)


# --------------------------------------------------------------------------
# run / chat


def connect_ready(cfg: Config) -> Client:
    """A connected client to a ready daemon, waiting (with progress) while the model loads."""
    runtime = Runtime.of(cfg)
    status = query_status(runtime)
    if status is None:
        raise CommandError("moed is not running; start it with `moectl start`")
    if status.get("state") != "ready":
        wait_until_ready(runtime, cfg.start_timeout, lambda: pidfile_pid(runtime) is not None, console_log(cfg))
    client = Client(runtime.socket, name="moectl")
    client.connect()
    return client


def sampling(args, cfg: Config) -> dict:
    params = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    if getattr(args, "seed", None) is not None:
        params["seed"] = args.seed
    if getattr(args, "stop", None):
        params["stop"] = args.stop
    return params


def stream(client: Client, out: TextIO, as_json: bool, **request) -> str:
    """Stream one answer to ``out`` (text, or one JSON event per line); the whole text."""
    with client.generate(**request) as s:
        for chunk in s:
            if as_json:
                out.write(json.dumps({"type": "chunk", "text": chunk.text, "token_ids": chunk.token_ids}) + "\n")
            else:
                out.write(chunk.text)
            out.flush()
        if as_json:
            out.write(json.dumps({"type": "done", "finish_reason": s.finish_reason, "usage": s.usage, "timings": s.timings}) + "\n")
        return s.text


def cmd_run(args, cfg: Config) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end with Ctrl-D)", file=sys.stderr)
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CommandError("the prompt is empty", EXIT_USAGE)
    client = connect_ready(cfg)
    try:
        text = stream(client, sys.stdout, args.json, prompt=prompt, **sampling(args, cfg))
    except MoedError as e:
        if args.json:
            print(json.dumps({"type": "error", "code": e.code, "message": e.message}), flush=True)
        raise
    finally:
        client.close()
    if not args.json and sys.stdout.isatty() and not text.endswith("\n"):
        print()
    return 0


CHAT_HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer."


def read_turn() -> str:
    """The next user message: with line editing and a prompt on a terminal, a plain line from a pipe."""
    if sys.stdin.isatty():
        return input("> ")
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def cmd_chat(args, cfg: Config) -> int:
    client = connect_ready(cfg)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"moed chat with {model_name(client.status())}. {CHAT_HELP}", file=sys.stderr)
    try:
        while True:
            try:
                line = read_turn()
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return 0
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                messages = messages[:1] if args.system else []
                print("(conversation reset)", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            try:
                answer = stream(client, sys.stdout, False, messages=messages, **sampling(args, cfg))
            except KeyboardInterrupt:
                print("\n(answer stopped)", file=sys.stderr)
                messages.pop()
                continue
            except MoedError as e:
                print(f"\nmoectl: {e}", file=sys.stderr)
                messages.pop()
                continue
            print()
            messages.append({"role": "assistant", "content": answer})
    finally:
        client.close()


# --------------------------------------------------------------------------
# logs / pull / service / profile


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


def cmd_pull(args, cfg: Config) -> int:
    path = models.download(args.repo)  # huggingface_hub draws its own progress bars
    models.check_moe(path)
    print(path)
    return 0


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


def cmd_profile(args, cfg: Config) -> int:
    try:
        from moed.experts.profile import profile_name, run_profile, user_profiles_dir
    except ImportError:
        raise CommandError("expert profiling is not available in this build of moed") from None

    model = models.resolve_model(cfg.model)
    out = Path(args.out) if args.out else user_profiles_dir() / profile_name(model)
    prompts = None
    if args.prompts:
        try:
            prompts = [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
        except OSError as e:
            raise CommandError(f"cannot read prompts from {args.prompts}: {e.strerror}", EXIT_USAGE) from None
        if not prompts:
            raise CommandError(f"{args.prompts} holds no prompts", EXIT_USAGE)
    line = ProgressLine(sys.stderr)
    t0 = time.monotonic()
    try:
        run_profile(
            model, prompts, out,
            progress=lambda stage, message, fraction=None: line.show({"stage": stage, "message": message, "fraction": fraction}, time.monotonic() - t0),
            capacity=cfg.capacity, memory_budget=cfg.memory_budget,
        )
    finally:
        line.done()
    print(out)
    return 0


# --------------------------------------------------------------------------
# Arguments


def add_daemon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local model directory or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--memory-budget", metavar="SIZE", help="memory for expert caches, e.g. 8G (default: whole model in memory)")
    p.add_argument("--capacity", type=int, metavar="N", help="expert slots per layer")
    p.add_argument("--approximate", action="store_true", default=None, help="allow approximate output")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false", default=None, help="do not prefetch experts")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also listen for protocol v1 on TCP")
    p.add_argument("--http", metavar="HOST:PORT", help="serve the OpenAI-compatible gateway")
    p.add_argument("--timeout", dest="start_timeout", type=float, metavar="S", help="seconds to wait for the model to be ready")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, metavar="N", help="most tokens per answer")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moectl", description="Control the moed daemon and talk to its model.")
    p.add_argument("--socket", metavar="PATH", help="daemon socket (default: moed.sock in the runtime dir)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("start", help="start the daemon and wait until the model is ready")
    add_daemon_flags(s)
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("stop", help="stop the daemon (in-flight requests finish unless --now)")
    s.add_argument("--now", action="store_true", help="cancel in-flight requests")
    s.add_argument("--timeout", type=float, metavar="S", help="seconds before SIGTERM, then SIGKILL")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("status", help="is the daemon running, and how is it doing (exit 3: not running)")
    s.add_argument("--json", action="store_true", help="one JSON object (keys in the README)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("run", help="stream the answer to a prompt (stdin when none is given)")
    s.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    s.add_argument("--json", action="store_true", help="print events as JSON lines")
    add_sampling_flags(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("chat", help="interactive multi-turn chat")
    s.add_argument("--system", help="system message")
    add_sampling_flags(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("logs", help="print the daemon's log")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    s.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="last N lines (default 50)")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("pull", help="download a model from the Hugging Face hub")
    s.add_argument("repo", help="repo id, e.g. mlx-community/Qwen3-30B-A3B-4bit")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("service", help="install or remove moed as a launchd/systemd user service")
    s.add_argument("action", choices=("install", "uninstall"))
    add_daemon_flags(s)
    s.add_argument("--no-start", action="store_true", help="install only; do not start it now")
    s.set_defaults(func=cmd_service)

    s = sub.add_parser("profile", help="record which experts a set of prompts routes to (for prefetch)")
    s.add_argument("--model", help="model (default: the configured one)")
    s.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: the built-in set)")
    s.add_argument("--out", metavar="FILE", help="where to write the profile (default: the user profile dir, where moed looks)")
    s.set_defaults(func=cmd_profile)
    return p


def flags_of(args) -> dict:
    """The settings given as flags (None: not given)."""
    return {name: getattr(args, name, None) for name in configuration.BY_NAME}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = configuration.load(flags_of(args))
        return args.func(args, cfg)
    except CommandError as e:
        print(f"moectl: {e}", file=sys.stderr)
        return e.code
    except ConfigError as e:
        print(f"moectl: configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (MoedError, models.ModelError, platform.ServiceError) as e:
        print(f"moectl: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `moectl run ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
