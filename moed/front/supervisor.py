"""The engine process seen from the front: start it, read its messages, watch its heartbeat, restart it.

The engine (``python -m moed.engine``) is the only process that imports MLX.
The front binds a private PAIR socket for it (moed/channel.py has the
messages) and a pipe it beats on from a thread; an engine that dies or goes
quiet fails its requests (``engine_restarted``) and is started again with a
backoff. Until an engine is ready, ``state`` and ``progress`` say why not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

from moed_client import paths
from moed_client import protocol as P

from moed.channel import EngineOptions, Events, Failed, Fatal, Progress, Ready, Shutdown, Stats, decode, encode
from moed.front import job as jobs
from moed.front.runtime import DaemonError, bind_private
from moed.logs import log_dir

log = logging.getLogger("moed.daemon")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
ENGINE_FIRST_BEAT_S = 30.0
ENGINE_STALL_TIMEOUT_S = 30.0  # the engine beats every 0.5 s from a thread; a stopped one goes quiet
# A ready engine's beats say whether its loop moved on (moed/engine/loop.py, ProgressMark): a long prefill
# moves on every chunk; a loop that beats without moving on for this long is hung.
ENGINE_HANG_TIMEOUT_S = 300.0


@dataclass
class EngineHandle:
    proc: asyncio.subprocess.Process
    sock: zmq.asyncio.Socket
    endpoint_path: Path
    pid: int
    ready: bool = False
    beat_fd: int = -1  # read end of the engine's heartbeat pipe
    last_beat: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    stalled: bool = False
    hung: bool = False  # stalled by beating without progress
    beating: bool = False  # a first beat came: the interpreter is up
    watchdog: asyncio.Task | None = None
    job: bool = False  # an mlx.launch job (moed/front/job.py): pid is the launcher's, and its process group's
    beat_path: Path | None = None  # a job's heartbeat FIFO
    beat_keep: int = -1  # our own write end of it, so that it never reads as closed

    def kill(self) -> None:
        """Kill the engine; a job's whole process group (launcher and local ranks), so no rank outlives it."""
        if not self.job:
            self.proc.kill()
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Supervisor:
    """Runs one engine at a time for ``sessions`` (moed.front.sessions) and keeps the daemon's state."""

    def __init__(self, args, ctx: zmq.asyncio.Context, sessions, meters):
        self.args, self.ctx, self.sessions, self.meters = args, ctx, sessions, meters
        self.state = "loading"  # loading, ready, restarting, stopping
        self.progress = {"stage": "starting", "message": "starting the engine", "fraction": 0.0}
        self.model: dict = {"name": args.model or "embedded", "path": None}
        self.model_ready_at: float | None = None
        self.model_path: Path | None = None  # set by resolve_model() once the socket answers
        self.engine: EngineHandle | None = None
        self.engine_stats: dict = {}
        self.engine_count = 0
        self.fatal_message: str | None = None
        # Model swaps and keep-alive (moed.front.switching): set `swap` to stop this engine on purpose;
        # `between_engines(stopping)` then says whether another starts; `held` keeps requests queued.
        self.swap = asyncio.Event()
        self.held = False
        self.between_engines = None
        self.on_ready = None
        self.on_load_failed = None  # (message) -> True when another model is to be started instead

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready and not self.held and self.state != "unloading"

    def send(self, msg) -> None:
        if self.engine is not None:
            self.engine.sock.send(encode(msg))

    def stop_accepting(self) -> None:
        self.state = "stopping"
        self.progress = {"stage": "stopping", "message": "shutting down", "fraction": None}

    # -- one engine ----------------------------------------------------------

    async def start_engine(self) -> EngineHandle:
        self.engine_count += 1
        path = paths.runtime_dir() / f"engine-{os.getpid()}-{self.engine_count}.sock"  # runtime.ENGINE_SOCKET
        sock = self.ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        bind_private(sock, path)
        argv = ["--channel", paths.endpoint(path), "--model", str(self.model_path)]
        options = EngineOptions.from_args(self.args)
        argv += options.to_argv()
        if jobs.is_job(options):
            return await self.start_job(options, argv, sock, path)
        beat_read, beat_write = os.pipe()
        argv += ["--heartbeat-fd", str(beat_write)]
        try:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "moed.engine", *argv,
                                                        stdin=asyncio.subprocess.DEVNULL, pass_fds=(beat_write,))
        finally:
            os.close(beat_write)
        log.info("engine %d started (pid %d)", self.engine_count, proc.pid)
        engine = EngineHandle(proc, sock, path, proc.pid, beat_fd=beat_read)
        self.watch_engine(engine)
        return engine

    async def start_job(self, options: EngineOptions, argv: list[str], sock, path: Path) -> EngineHandle:
        """The engine as an mlx.launch job: rank 0 beats on a FIFO (the launcher passes no descriptors on)."""
        beat_path = path.with_suffix(".beat")
        try:
            cmd = await asyncio.to_thread(jobs.launch_command, options,
                                          argv + ["--heartbeat-path", str(beat_path), "--front-pid", str(os.getpid())])
        except jobs.JobError as e:
            sock.close(linger=0)
            path.unlink(missing_ok=True)
            self.progress = {"stage": "failed", "message": str(e), "fraction": None}
            self.sessions.fail_all(P.ErrorCode.ENGINE_ERROR, f"moed is exiting: {e}")
            raise DaemonError(str(e)) from None
        beat_path.unlink(missing_ok=True)
        os.mkfifo(beat_path, 0o600)
        beat_read = os.open(beat_path, os.O_RDONLY | os.O_NONBLOCK)
        keep = os.open(beat_path, os.O_WRONLY)
        # stdin a pipe we never write: mlx.launch polls its stdin, and /dev/null is always readable
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE, start_new_session=True)
        log.info("engine %d started as an mlx.launch job (launcher pid %d): %s", self.engine_count, proc.pid,
                 f"{options.ranks} local ranks" if not options.hosts else f"hosts of {options.hosts}")
        engine = EngineHandle(proc, sock, path, proc.pid, beat_fd=beat_read, job=True, beat_path=beat_path,
                              beat_keep=keep)
        self.watch_engine(engine)
        return engine

    def watch_engine(self, engine: EngineHandle) -> None:
        """Kill an engine whose heartbeat stops (SIGSTOP, a wedged process):
        supervise() then fails its requests (engine_restarted) and restarts it.

        The beats come from a thread in the engine, so a long decode step or
        load (MLX releases the GIL) does not look like a stall.
        """
        loop = asyncio.get_running_loop()
        os.set_blocking(engine.beat_fd, False)

        def on_beat() -> None:
            if not drain_beats(engine) and engine.proc.returncode is not None:
                loop.remove_reader(engine.beat_fd)

        loop.add_reader(engine.beat_fd, on_beat)
        timeout = self.args.engine_timeout
        hang = getattr(self.args, "hang_timeout", ENGINE_HANG_TIMEOUT_S)
        if (timeout and timeout > 0) or (hang and hang > 0):
            engine.watchdog = loop.create_task(self.engine_watchdog(engine, timeout or 0, hang or 0))

    async def engine_watchdog(self, engine: EngineHandle, timeout: float, hang: float = 0.0) -> None:
        while engine.proc.returncode is None:
            await asyncio.sleep(min(1.0, (timeout or hang) / 4))
            drain_beats(engine)  # beats that came while this loop was busy elsewhere
            stuck = time.monotonic() - engine.last_progress
            if hang > 0 and engine.ready and stuck > hang and engine.proc.returncode is None:
                log.error("engine pid %d hung: alive but no progress for %.1f s (--hang-timeout %g); killing it",
                          engine.pid, stuck, hang)
                engine.stalled = engine.hung = True
                engine.kill()
                return
            if not timeout > 0:
                continue
            silent = time.monotonic() - engine.last_beat
            # Until its first beat, a new engine is still starting Python: a short timeout must not kill it there.
            if silent > (timeout if engine.beating else max(timeout, ENGINE_FIRST_BEAT_S)) and engine.proc.returncode is None:
                log.error("engine pid %d stalled: no heartbeat for %.1f s (--engine-timeout %g); killing it", engine.pid, silent, timeout)
                engine.stalled = True
                engine.kill()
                return

    async def engine_loop(self, engine: EngineHandle) -> None:
        """Read one engine's messages until its socket is closed."""
        while True:
            self.on_message(engine, decode(await engine.sock.recv()))

    def on_message(self, engine: EngineHandle, msg) -> None:
        if isinstance(msg, Events):
            now = time.monotonic()
            if isinstance(msg.t, float):  # monotonic clocks are system-wide: comparable across processes
                self.meters.engine_latency.append(now - msg.t)
            self.meters.tokens(now, len(msg.events))
            self.sessions.on_events(msg.events, now)
        elif isinstance(msg, Failed):
            self.sessions.fail(msg.seq, msg.code, msg.message)
        elif isinstance(msg, Stats):
            self.engine_stats = msg.figures
        elif isinstance(msg, Progress):
            self.progress = {"stage": msg.stage, "message": msg.message, "fraction": msg.fraction}
        elif isinstance(msg, Ready):
            self.model = msg.model
            self.model_ready_at = time.time()  # wall clock, for `moectl ps` (since when this model is loaded)
            engine.ready = True
            self.state = "ready" if self.state != "stopping" else self.state
            self.progress = {"stage": "ready", "message": "model loaded", "fraction": 1.0}
            log.info("engine ready: %s", self.model.get("name"))
            from moed import platform

            platform.notify("READY=1")
            if self.on_ready is not None:
                self.on_ready()
            self.sessions.pump()
        elif isinstance(msg, Fatal):
            self.progress = {"stage": "failed", "message": msg.message, "fraction": None}
            log.error("engine: %s", msg.message)
            self.fatal_message = msg.message

    async def stop_engine(self, engine: EngineHandle, reader, waiter) -> None:
        self.send(Shutdown())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=10.0)
        except asyncio.TimeoutError:
            log.warning("engine did not stop; killing it")
            engine.kill()
            await waiter
        await asyncio.sleep(0.05)
        reader.cancel()
        self.close_engine_socket(engine)
        self.engine = None

    def close_engine_socket(self, engine: EngineHandle) -> None:
        if engine.watchdog is not None:
            engine.watchdog.cancel()
        if engine.job:
            engine.kill()  # a rank the launcher left behind
            if engine.beat_keep >= 0:
                os.close(engine.beat_keep)
                engine.beat_keep = -1
            engine.beat_path.unlink(missing_ok=True)
        if engine.beat_fd >= 0:
            asyncio.get_running_loop().remove_reader(engine.beat_fd)
            os.close(engine.beat_fd)
            engine.beat_fd = -1
        engine.sock.close(linger=0)
        try:
            engine.endpoint_path.unlink()
        except FileNotFoundError:
            pass

    # -- the daemon's life -----------------------------------------------------

    async def resolve_model(self) -> None:
        """Find (or download) the model while the socket already answers, so that
        ``status`` shows download progress however the daemon was started."""
        from moed.models import ModelError, resolve_model

        def progress(message: str, fraction: float | None) -> None:
            self.progress = {"stage": "download", "message": message, "fraction": fraction}

        self.progress = {"stage": "resolve", "message": f"finding model {self.args.model or 'embedded'}", "fraction": None}
        try:
            self.model_path = await asyncio.to_thread(resolve_model, self.args.model, progress)
        except ModelError as e:
            self.progress = {"stage": "failed", "message": str(e), "fraction": None}
            self.sessions.fail_all(P.ErrorCode.ENGINE_ERROR, f"moed is exiting: {e}")  # no request waits on a dead daemon
            raise DaemonError(str(e)) from None
        self.model = {"name": self.model_path.name, "path": str(self.model_path)}

    async def supervise(self, stopping: asyncio.Event) -> None:
        """Run engines until ``stopping`` is set, restarting one that dies."""
        failures = 0
        while True:
            engine = await self.start_engine()
            self.engine = engine
            reader = asyncio.ensure_future(self.engine_loop(engine))
            waiter = asyncio.ensure_future(engine.proc.wait())
            stopper = asyncio.ensure_future(stopping.wait())
            swapper = asyncio.ensure_future(self.swap.wait())
            await asyncio.wait({reader, waiter, stopper, swapper}, return_when=asyncio.FIRST_COMPLETED)
            swapper.cancel()
            if stopper.done():
                await self.stop_engine(engine, reader, waiter)
                return
            if swapper.done() and not waiter.done():  # a swap or an unload: this engine stops on purpose
                stopper.cancel()
                await self.stop_engine(engine, reader, waiter)
                self.swap.clear()
                if not await self.between_engines(stopping):
                    return
                continue
            stopper.cancel()
            if reader.done() and reader.exception() is not None:
                log.error("engine channel failed: %r", reader.exception())
                engine.kill()
            rc = await waiter
            await asyncio.sleep(0.05)  # let the reader deliver what the engine sent before it died
            reader.cancel()
            self.close_engine_socket(engine)
            self.engine = None
            was_ready = engine.ready
            log.error("engine pid %d exited with code %s", engine.pid, rc)
            if not was_ready and self.engine_count == 1 or self.fatal_message:
                message = self.fatal_message or f"the engine exited with code {rc} while loading the model (see the log in {log_dir()})"
                if not was_ready and self.on_load_failed is not None and self.on_load_failed(message):
                    self.fatal_message = None  # a model swapped in failed to load: the one before it comes back
                    self.state = "loading"
                    self.progress = {"stage": "loading", "message": f"loading {self.model.get('name')} again", "fraction": 0.0}
                    continue
                self.sessions.fail_all(P.ErrorCode.ENGINE_ERROR, f"moed is exiting: {message}")  # no request waits on a dead daemon
                raise DaemonError(message)
            if engine.hung:
                reason = f"the engine hung (no progress for {self.args.hang_timeout:g} s) and was killed"
            elif engine.stalled:
                reason = f"the engine stalled (no heartbeat for {self.args.engine_timeout:g} s) and was killed"
            else:
                reason = f"the engine stopped (exit code {rc})"
            self.sessions.fail_in_engine(P.ErrorCode.ENGINE_RESTARTED, f"{reason}; it is restarting; retry the request")
            if self.state == "stopping":
                return
            self.state = "restarting"
            self.progress = {"stage": "restarting", "message": f"engine exited with code {rc}; restarting", "fraction": 0.0}
            failures = failures + 1 if not was_ready else 0
            await asyncio.sleep(RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)])


def drain_beats(engine: EngineHandle) -> bool:
    """Read what the engine's heartbeat thread wrote and note it on ``engine``: any beat is
    alive, a progress beat (anything but ``,``) is progress; whether there was anything."""
    got = False
    while engine.beat_fd >= 0:
        try:
            data = os.read(engine.beat_fd, 4096)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        if not data:
            break
        got = True
        now = time.monotonic()
        engine.last_beat, engine.beating = now, True
        if data.strip(b","):
            engine.last_progress = now
    return got
