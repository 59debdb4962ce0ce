"""``moed serve``: the front process.

It owns the sockets, the sessions and the queue, and supervises the engine
process (moed/engine/loop.py), the only process that imports MLX. Clients speak
protocol v1 (moed_client.protocol) to a ZeroMQ ROUTER; the front forwards
admitted requests to the engine over a private PAIR socket and fans the
engine's token events back out. ``status``, ``ping`` and ``cancel`` never wait
for the engine, so they are answered while it decodes or loads.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import fcntl
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

from moed_client import paths
from moed_client import protocol as P

from moed.logs import log_dir, setup_logging
from moed.net import is_loopback

log = logging.getLogger("moed.daemon")

VERSION = "0.1.0"
ENGINE_START_TIMEOUT_S = 600.0
GRACEFUL_SHUTDOWN_S = 30.0
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# ZMTP heartbeats let the ROUTER notice peers that vanish without closing
# their connection (a dead TCP peer); ipc peers are noticed at once.
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000
# A client that stops reading is dropped rather than allowed to stall the others.
CLIENT_SNDHWM = 100_000
TOK_RATE_WINDOW_S = 5.0
ENGINE_FIRST_BEAT_S = 30.0
ENGINE_STALL_TIMEOUT_S = 30.0  # the engine beats every 0.5 s from a thread; a stopped one goes quiet
SOCKET_CHECK_S = 1.0  # how often the front checks that its socket file is still there
# Where reading a process's RSS runs `ps` (macOS), a thread refreshes the figures status shows this often.
RSS_REFRESH_S = 2.0
# Once no request has been in flight for this long, freed heap pages go back to the OS (platform.release_free_memory).
IDLE_TRIM_S = 2.0
# On exit, how long libzmq may keep delivering queued replies to a client that
# reads slowly: its final 'done' sits behind its unread chunks.
EXIT_FLUSH_MS = 2000


class DaemonError(Exception):
    """A reason the daemon cannot start, with a message meant for a person."""


# --------------------------------------------------------------------------
# Runtime files: one daemon per runtime dir


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


# --------------------------------------------------------------------------
# Sessions and requests


@dataclass
class Request:
    seq: int
    client: bytes
    id: str
    submit: dict  # the engine's submit message
    received: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    completion_tokens: int = 0
    in_engine: bool = False

    def timings(self) -> dict:
        now = time.monotonic()
        ttft = (self.first_token - self.received) if self.first_token else None
        decode = None
        if self.first_token and self.last_token and self.completion_tokens > 1 and self.last_token > self.first_token:
            decode = (self.completion_tokens - 1) / (self.last_token - self.first_token)
        return {"ttft_s": ttft, "decode_tok_s": decode, "total_s": now - self.received}


@dataclass
class EngineHandle:
    proc: asyncio.subprocess.Process
    sock: zmq.asyncio.Socket
    endpoint_path: Path
    pid: int
    ready: bool = False
    beat_fd: int = -1  # read end of the engine's heartbeat pipe
    last_beat: float = field(default_factory=time.monotonic)
    stalled: bool = False
    beating: bool = False  # a first beat came: the interpreter is up
    watchdog: asyncio.Task | None = None


class Daemon:
    def __init__(self, args, runtime: RuntimeFiles):
        self.args = args
        self.model_path: Path | None = None  # set by resolve_model() once the socket answers
        self.runtime = runtime
        self.instance_id = uuid.uuid4().hex
        self.started = time.monotonic()
        self.ctx = zmq.asyncio.Context()
        self.state = "loading"
        self.progress = {"stage": "starting", "message": "starting the engine", "fraction": 0.0}
        self.model: dict = {"name": args.model or "embedded", "path": None}
        self.engine: EngineHandle | None = None
        self.engine_stats: dict = {}
        self.requests: dict[int, Request] = {}  # seq -> request
        self.by_client: dict[bytes, dict[str, int]] = collections.defaultdict(dict)  # client -> {id: seq}
        self.queue: collections.deque[int] = collections.deque()  # admitted, not yet sent to the engine
        self.next_seq = 0
        self.engine_count = 0
        self.tok_window: collections.deque = collections.deque()
        self.engine_latency: collections.deque = collections.deque(maxlen=1024)  # seconds, engine send -> front receive
        self.rss_seen: dict[int, int | None] = {}  # pid -> RSS, from refresh_rss() where the probe blocks
        self.idle_trim: asyncio.TimerHandle | None = None
        self.stopping = asyncio.Event()
        self.drain_deadline: float | None = None
        self.exit_code = 0
        self.fatal_message: str | None = None
        # In-process doors (moed/doors/editor.py): client id -> callable taking that client's messages.
        self.local_sinks: dict = {}
        self.editor = None
        self.http = None  # the OpenAI-compatible gateway (moed/doors/http.py), a protocol v1 client of this daemon

    # -- sockets ---------------------------------------------------------

    def router_socket(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        return sock

    def bind_client_socket(self) -> None:
        sock = self.router_socket()
        self.bind_ipc(sock)
        self.router = sock
        self.tcp_router = None
        if self.args.tcp:
            self.bind_tcp(self.args.tcp)

    def bind_ipc(self, sock) -> None:
        old_umask = os.umask(0o077)  # the socket file is born 0600: no window where others could connect
        try:
            sock.bind(paths.endpoint(self.runtime.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.runtime.socket_path, 0o600)

    async def watch_socket(self) -> None:
        """Re-create the runtime files that disappear under a running daemon (a tmp
        cleaner, a stray rm): the pidfile, the ZeroMQ socket and the editor socket.

        Otherwise the daemon runs on unreachable (and, without its pidfile, a
        second one could start beside it). Connected clients keep their
        connections: a second bind on the same ROUTER, or a new editor
        listener, leaves the first listener's connections be.
        """
        path = self.runtime.socket_path
        while True:
            await asyncio.sleep(SOCKET_CHECK_S)
            if self.state == "stopping":
                continue
            try:
                if not self.runtime.pidfile_held():
                    log.warning("pidfile %s disappeared; writing it again", self.runtime.pidfile)
                    self.runtime.relock()
                if not path.exists():
                    log.warning("socket %s disappeared; binding it again", path)
                    paths.ensure_private_dir(path.parent)
                    self.bind_ipc(self.router)
            except (OSError, zmq.ZMQError, DaemonError) as e:
                log.error("cannot restore the runtime files in %s (%s); shutting down", path.parent, e)
                self.begin_shutdown(False)
                return
            if self.editor is not None and not self.editor.bound():
                log.warning("editor socket %s disappeared; listening on it again", self.editor.path)
                try:
                    await self.editor.rebind()
                except OSError as e:  # as at start: the daemon goes on without the editor door
                    log.error("cannot open the editor socket %s again: %s", self.editor.path, e)
                    editor, self.editor = self.editor, None
                    await editor.close()

    def bind_tcp(self, address: str) -> None:
        """A second ROUTER on TCP that only CURVE clients with an authorized key can use."""
        import zmq.auth.asyncio

        from moed_client import curve

        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise DaemonError(f"--tcp wants HOST:PORT, got {address!r}")
        if not is_loopback(host) and not self.args.tcp_allow_remote:
            raise DaemonError(f"--tcp {address}: {host} is not a loopback address; add --tcp-allow-remote to listen on the network")
        public, secret = curve.server_keys()
        self.authenticator = zmq.auth.asyncio.AsyncioAuthenticator(self.ctx)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=str(curve.authorized_dir()))
        sock = self.router_socket()
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.bind(f"tcp://{host}:{port}")
        self.tcp_router = sock
        log.info("also listening on tcp://%s:%s (CURVE; authorized keys in %s)", host, port, curve.authorized_dir())

    def send(self, client: bytes, msg: dict) -> bool:
        """Send to one client now; False (and the client's requests dropped) if it is gone or stuck."""
        sink = self.local_sinks.get(client)
        if sink is not None:
            sink(msg)
            return True
        if isinstance(client, tuple):  # ("tcp", identity): the two ROUTERs' peer ids may collide
            router, frames = self.tcp_router, [client[1], P.pack(msg)]
        else:
            router, frames = self.router, [client, P.pack(msg)]
        # With NOBLOCK, pyzmq's asyncio socket sends at once and returns a finished future
        # (failed with EHOSTUNREACH or EAGAIN). Sending through pyzmq's own socket, not a
        # sync shadow, matters: it re-arms the edge-triggered ZMQ_FD for waiting receivers.
        error = send_error(router.send_multipart(frames, flags=zmq.NOBLOCK))
        if error is None:
            return True
        if not isinstance(error, zmq.ZMQError):
            raise error
        reason = "gone" if error.errno == errno.EHOSTUNREACH else f"not reading ({error.strerror})"
        log.info("client %s is %s; dropping its requests", client_name(client), reason)
        self.drop_client(client)
        return False

    # -- client messages ---------------------------------------------------

    async def client_loop(self, router, tcp: bool = False) -> None:
        while True:
            frames = await router.recv_multipart()
            client = ("tcp", frames[0]) if tcp else frames[0]
            if len(frames) != 2:
                self.send(client, P.error(P.ErrorCode.BAD_MESSAGE, f"expected one frame per message, got {len(frames) - 1}"))
                continue
            msg = None
            try:
                msg = P.unpack(frames[1])
                self.handle(client, msg)
            except P.ProtocolError as e:
                self.send(client, P.error(e.code, e.message, reply_id(msg)))
            except Exception as e:  # a bug must not take the daemon down for everyone
                log.exception("handling a message failed")
                self.send(client, P.error(P.ErrorCode.INTERNAL, f"internal error: {type(e).__name__}", reply_id(msg)))

    def handle(self, client: bytes, msg: dict) -> None:
        kind = msg["type"]
        if "version" in msg:
            P.check_version(msg)
        if kind == P.HELLO:
            if "version" not in msg:
                P.check_version(msg)
            self.send(client, P.hello_reply(self.instance_id, self.model, self.state == "ready") | {"state": self.state})
        elif kind == P.PING:
            reply = {"type": P.PONG, "instance_id": self.instance_id, "state": self.state}
            if "nonce" in msg:
                reply["nonce"] = msg["nonce"]
            self.send(client, reply)
        elif kind == P.STATUS:
            self.send(client, {"type": P.STATUS, **self.status()})
        elif kind == P.GENERATE:
            self.admit(client, msg)
        elif kind == P.CANCEL:
            rid = P.request_id(msg)
            seq = self.by_client.get(client, {}).get(rid)
            # Cancel is idempotent and unanswered when the id is not live: it
            # races with the request's own end, and an error carrying that id
            # after its 'done' would read as a second final (or as the final
            # of a new request reusing the id).
            if seq is not None:
                self.cancel(seq)
        elif kind == P.SHUTDOWN:
            now = bool(msg.get("now"))
            log.info("shutdown requested by a client (now=%s)", now)
            self.send(client, {"type": P.SHUTDOWN, "accepted": True, "now": now})
            self.begin_shutdown(now)
        else:
            raise P.ProtocolError(P.ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}; this daemon knows {sorted(P.CLIENT_TYPES)}")

    def admit(self, client: bytes, msg: dict) -> None:
        req = P.parse_generate(msg, max_tokens_limit=self.args.max_tokens)
        if self.state == "stopping":
            raise P.ProtocolError(P.ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        owned = self.by_client.get(client, {})  # a refused first request must leave no empty session behind
        if req.id in owned:
            raise P.ProtocolError(P.ErrorCode.DUPLICATE_ID, f"request {req.id!r} is still running")
        if len(self.queue) >= self.args.max_queue:
            raise P.ProtocolError(P.ErrorCode.BUSY, f"the queue is full ({self.args.max_queue} waiting); retry later")
        if not owned and self.clients_at(door(client)) >= self.args.max_clients:
            raise P.ProtocolError(P.ErrorCode.BUSY, f"too many clients with requests in flight on this door ({self.args.max_clients}); retry later")
        owned = self.by_client[client]
        seq = self.next_seq
        self.next_seq += 1
        submit = {"type": "submit", "seq": seq, **req.to_dict()}
        submit.pop("id")
        self.requests[seq] = Request(seq, client, req.id, submit)
        owned[req.id] = seq
        self.queue.append(seq)
        if self.args.debug:
            log.debug("request %s/%s: %r", client_name(client), req.id, submit)
        self.pump()

    def clients_at(self, which: str) -> int:
        return sum(1 for c, owned in self.by_client.items() if owned and door(c) == which)

    def pump(self) -> None:
        """Move queued requests into the engine while it has batch slots."""
        engine = self.engine
        if engine is None or not engine.ready:
            return
        in_engine = sum(1 for r in self.requests.values() if r.in_engine)
        while self.queue and in_engine < self.args.max_batch:
            req = self.requests[self.queue.popleft()]
            req.in_engine = True
            in_engine += 1
            self.engine_send({**req.submit})

    def cancel(self, seq: int) -> None:
        req = self.requests.get(seq)
        if req is None:
            return
        if req.in_engine:
            self.engine_send({"type": "cancel", "seq": seq})  # the engine answers with a 'cancelled' final event
        else:
            self.queue.remove(seq)
            self.finish(req, P.done(req.id, "cancelled", {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}, req.timings()))

    def drop_client(self, client: bytes) -> None:
        for seq in list(self.by_client.pop(client, {}).values()):
            req = self.requests.pop(seq, None)
            if req is None:
                continue
            if req.in_engine:
                self.engine_send({"type": "cancel", "seq": seq})
            else:
                self.queue.remove(seq)
        self.pump()  # the dropped requests' batch slots are free now
        self.when_idle()

    def finish(self, req: Request, final: dict | None) -> None:
        self.requests.pop(req.seq, None)
        owned = self.by_client.get(req.client)
        if owned is not None:
            owned.pop(req.id, None)
            if not owned:
                del self.by_client[req.client]
        if final is not None:
            self.send(req.client, final)
        self.pump()
        self.when_idle()

    def when_idle(self) -> None:
        """After a burst, once nothing has been in flight for IDLE_TRIM_S, give freed heap pages back."""
        if self.requests or self.idle_trim is not None:
            return

        def trim() -> None:
            from moed import platform

            self.idle_trim = None
            if not self.requests:  # busy again: the next idle moment does it
                platform.release_free_memory()

        self.idle_trim = asyncio.get_running_loop().call_later(IDLE_TRIM_S, trim)

    # -- engine ------------------------------------------------------------

    def engine_send(self, msg: dict) -> None:
        if self.engine is not None:
            self.engine.sock.send(P.pack(msg))

    async def start_engine(self) -> EngineHandle:
        self.engine_count += 1
        path = paths.runtime_dir() / f"engine-{os.getpid()}-{self.engine_count}.sock"
        sock = self.ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        old_umask = os.umask(0o077)
        try:
            sock.bind(paths.endpoint(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)  # as the client socket (the umask left it 0700)
        cmd = [sys.executable, "-m", "moed.engine", "--channel", paths.endpoint(path), "--model", str(self.model_path)]
        a = self.args
        for flag, value in (
            ("--capacity", a.capacity),
            ("--memory-budget", a.memory_budget),
            ("--max-batch", a.max_batch),
            ("--prefill-step", a.prefill_step),
            ("--stream-interval", a.stream_interval),
            ("--max-context", a.max_context),
            ("--prompt-cache-size", a.prompt_cache_size),
            ("--prompt-cache-bytes", a.prompt_cache_bytes),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        cmd += ["--approximate"] * a.approximate + ["--no-prefetch"] * a.no_prefetch + ["--debug"] * a.debug
        beat_read, beat_write = os.pipe()
        cmd += ["--heartbeat-fd", str(beat_write)]
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL, pass_fds=(beat_write,))
        finally:
            os.close(beat_write)
        log.info("engine %d started (pid %d)", self.engine_count, proc.pid)
        engine = EngineHandle(proc, sock, path, proc.pid, beat_fd=beat_read)
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
            if drain_beats(engine):
                engine.last_beat, engine.beating = time.monotonic(), True
            elif engine.proc.returncode is not None:
                loop.remove_reader(engine.beat_fd)

        loop.add_reader(engine.beat_fd, on_beat)
        timeout = self.args.engine_timeout
        if timeout and timeout > 0:
            engine.watchdog = loop.create_task(self.engine_watchdog(engine, timeout))

    async def engine_watchdog(self, engine: EngineHandle, timeout: float) -> None:
        while engine.proc.returncode is None:
            await asyncio.sleep(min(1.0, timeout / 4))
            if drain_beats(engine):  # beats that came while this loop was busy elsewhere
                engine.last_beat, engine.beating = time.monotonic(), True
            silent = time.monotonic() - engine.last_beat
            # Until its first beat, a new engine is still starting Python: a short timeout must not kill it there.
            if silent > (timeout if engine.beating else max(timeout, ENGINE_FIRST_BEAT_S)) and engine.proc.returncode is None:
                log.error("engine pid %d stalled: no heartbeat for %.1f s (--engine-timeout %g); killing it", engine.pid, silent, timeout)
                engine.stalled = True
                engine.proc.kill()
                return

    async def engine_loop(self, engine: EngineHandle) -> None:
        """Read one engine's messages until its socket is closed."""
        while True:
            # Our own engine on a private 0600 socket: trusted, and its stats (the expert
            # manager's) may hold more containers than a client message may.
            msg = msgpack.unpackb(await engine.sock.recv(), raw=False)
            kind = msg["type"]
            if kind == "events":
                if isinstance(msg.get("t"), float):  # monotonic clocks are system-wide: comparable across processes
                    self.engine_latency.append(time.monotonic() - msg["t"])
                self.on_events(msg["events"])
            elif kind == "failed":
                req = self.requests.get(msg["seq"])
                if req is not None:
                    self.finish(req, P.error(msg["code"], msg["message"], req.id))
            elif kind == "stats":
                msg.pop("type")
                self.engine_stats = msg
            elif kind == "progress":
                self.progress = {k: msg.get(k) for k in ("stage", "message", "fraction")}
            elif kind == "ready":
                self.model = msg["model"]
                engine.ready = True
                self.state = "ready" if self.state != "stopping" else self.state
                self.progress = {"stage": "ready", "message": "model loaded", "fraction": 1.0}
                log.info("engine ready: %s", self.model.get("name"))
                self.notify_ready()
                self.pump()
            elif kind == "fatal":
                self.progress = {"stage": "failed", "message": msg["message"], "fraction": None}
                log.error("engine: %s", msg["message"])
                self.fatal_message = msg["message"]

    def on_events(self, events: list[dict]) -> None:
        now = time.monotonic()
        self.tok_window.append((now, len(events)))
        self.trim_tok_window(now)  # here, not only in status(): a daemon nobody asks grew without bound
        for ev in events:
            req = self.requests.get(ev["seq"])
            if req is None:
                continue  # its client is gone
            if ev["token_ids"]:
                req.completion_tokens += len(ev["token_ids"])
                req.first_token = req.first_token or now
                req.last_token = now
            finish = ev.get("finish")
            if ev["text"] or ev["token_ids"]:
                if not self.send(req.client, P.chunk(req.id, ev["text"], ev["token_ids"])):
                    continue
            if finish is not None:
                self.finish(req, P.done(req.id, finish, ev["usage"], req.timings() | {"max_batch": ev.get("max_batch"), "engine_decode_tok_s": ev.get("engine_decode_tok_s")}))

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
            self.fail_all(P.ErrorCode.ENGINE_ERROR, f"moed is exiting: {e}")  # no request waits on a dead daemon
            raise DaemonError(str(e)) from None
        self.model = {"name": self.model_path.name, "path": str(self.model_path)}

    async def supervise(self) -> None:
        """Run engines until shutdown, restarting one that dies."""
        failures = 0
        while True:
            engine = await self.start_engine()
            self.engine = engine
            reader = asyncio.ensure_future(self.engine_loop(engine))
            waiter = asyncio.ensure_future(engine.proc.wait())
            stopper = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({reader, waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper.done():
                await self.stop_engine(engine, reader, waiter)
                return
            stopper.cancel()
            if reader.done() and reader.exception() is not None:
                log.error("engine channel failed: %r", reader.exception())
                engine.proc.kill()
            rc = await waiter
            await asyncio.sleep(0.05)  # let the reader deliver what the engine sent before it died
            reader.cancel()
            self.close_engine_socket(engine)
            self.engine = None
            was_ready = engine.ready
            log.error("engine pid %d exited with code %s", engine.pid, rc)
            if not was_ready and self.engine_count == 1 or self.fatal_message:
                message = self.fatal_message or f"the engine exited with code {rc} while loading the model (see the log in {log_dir()})"
                self.fail_all(P.ErrorCode.ENGINE_ERROR, f"moed is exiting: {message}")  # no request waits on a dead daemon
                raise DaemonError(message)
            if engine.stalled:
                reason = f"the engine stalled (no heartbeat for {self.args.engine_timeout:g} s) and was killed"
            else:
                reason = f"the engine stopped (exit code {rc})"
            self.fail_in_engine(P.ErrorCode.ENGINE_RESTARTED, f"{reason}; it is restarting; retry the request")
            if self.state == "stopping":
                return
            self.state = "restarting"
            self.progress = {"stage": "restarting", "message": f"engine exited with code {rc}; restarting", "fraction": 0.0}
            failures = failures + 1 if not was_ready else 0
            await asyncio.sleep(RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)])

    def fail_all(self, code: str, message: str) -> None:
        self.queue.clear()
        for req in list(self.requests.values()):
            self.finish(req, P.error(code, message, req.id))

    def fail_in_engine(self, code: str, message: str) -> None:
        for req in [r for r in self.requests.values() if r.in_engine]:
            self.finish(req, P.error(code, message, req.id))

    async def stop_engine(self, engine: EngineHandle, reader, waiter) -> None:
        self.engine_send({"type": "shutdown"})
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=10.0)
        except asyncio.TimeoutError:
            log.warning("engine did not stop; killing it")
            engine.proc.kill()
            await waiter
        await asyncio.sleep(0.05)
        reader.cancel()
        self.close_engine_socket(engine)
        self.engine = None

    def close_engine_socket(self, engine: EngineHandle) -> None:
        if engine.watchdog is not None:
            engine.watchdog.cancel()
        if engine.beat_fd >= 0:
            asyncio.get_running_loop().remove_reader(engine.beat_fd)
            os.close(engine.beat_fd)
            engine.beat_fd = -1
        engine.sock.close(linger=0)
        try:
            engine.endpoint_path.unlink()
        except FileNotFoundError:
            pass

    # -- status, readiness, shutdown ------------------------------------------

    def trim_tok_window(self, now: float) -> None:
        while self.tok_window and now - self.tok_window[0][0] > TOK_RATE_WINDOW_S:
            self.tok_window.popleft()

    def status(self) -> dict:
        now = time.monotonic()
        self.trim_tok_window(now)
        tokens = sum(n for _, n in self.tok_window)
        span = (now - self.tok_window[0][0]) if len(self.tok_window) > 1 else 0.0
        front_rss = self.rss(os.getpid())
        engine_rss = self.rss(self.engine.pid) if self.engine else None
        in_engine = sum(1 for r in self.requests.values() if r.in_engine)
        return {
            "state": self.state,
            "pid": os.getpid(),
            "engine_pid": self.engine.pid if self.engine else None,
            "uptime_s": now - self.started,
            "model": self.model,
            "memory": {
                "rss_bytes": (front_rss + engine_rss) if front_rss is not None and engine_rss is not None else None,
                "front_rss_bytes": front_rss,
                "engine_rss_bytes": engine_rss,
                "mlx_active_bytes": self.engine_stats.get("mlx_active_bytes"),
                "budget_bytes": self.args.memory_budget,
            },
            "requests": {"active": in_engine, "queued": len(self.queue)},
            "clients": len(self.by_client),
            "recent_tok_s": tokens / span if span > 0 else 0.0,
            "engine_to_front_us": percentiles_us(self.engine_latency),
            "experts": self.engine_stats.get("experts"),
            "prompt_cache": self.engine_stats.get("prompt_cache"),
            "editor_socket": str(self.editor.path) if self.editor else None,
            "http": self.http.url if self.http else None,
            "progress": self.progress,
            "instance_id": self.instance_id,
            "version": VERSION,
            "protocol": list(P.PROTOCOL_VERSION),
            "engine_restarts": max(0, self.engine_count - 1),
        }

    def rss(self, pid: int) -> int | None:
        from moed import platform

        if platform.rss_probe_blocks():
            return self.rss_seen.get(pid)  # never a subprocess on the event loop: the last figure refresh_rss() took
        return rss_of(pid)

    async def refresh_rss(self) -> None:
        """Where the RSS probe runs a program, take the front's and the engine's RSS in a thread, now and then."""
        while True:
            pids = [os.getpid()] + ([self.engine.pid] if self.engine else [])
            self.rss_seen = await asyncio.to_thread(lambda: {pid: rss_of(pid) for pid in pids})
            await asyncio.sleep(RSS_REFRESH_S)

    def notify_ready(self) -> None:
        from moed import platform

        platform.notify("READY=1")

    async def watchdog(self, interval: float) -> None:
        from moed import platform

        while True:
            platform.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def begin_shutdown(self, now: bool) -> None:
        if self.state == "stopping" and not now:
            return
        self.state = "stopping"
        self.progress = {"stage": "stopping", "message": "shutting down", "fraction": None}
        for seq in list(self.queue):
            self.cancel(seq)
        if now:
            for seq in [s for s, r in self.requests.items() if r.in_engine]:
                self.cancel(seq)
        self.drain_deadline = time.monotonic() + (0.0 if now else self.args.shutdown_timeout)
        asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """Let in-flight requests finish (or be cancelled), then stop."""
        while self.requests and time.monotonic() < self.drain_deadline:
            await asyncio.sleep(0.02)
        if self.requests:
            for seq in list(self.requests):
                self.cancel(seq)
            deadline = time.monotonic() + 2.0
            while self.requests and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.stopping.set()

    async def run(self) -> int:
        from moed import platform

        self.bind_client_socket()
        from moed.doors import editor, http

        try:
            self.http = await http.open_gateway(self.args, self.runtime.socket_path)
        except http.GatewayError as e:
            raise DaemonError(str(e)) from None
        self.editor = await editor.open_door(self.args, self.runtime.socket_path)
        log.info("moed %s listening on %s (instance %s), model %s", VERSION, self.runtime.socket_path, self.instance_id, self.args.model or "embedded")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_shutdown, False)
        tasks = [asyncio.ensure_future(self.client_loop(self.router)), asyncio.ensure_future(self.watch_socket())]
        if self.tcp_router is not None:
            tasks.append(asyncio.ensure_future(self.client_loop(self.tcp_router, tcp=True)))
        if platform.rss_probe_blocks():
            tasks.append(asyncio.ensure_future(self.refresh_rss()))
        interval = platform.watchdog_interval()
        if interval:
            tasks.append(asyncio.ensure_future(self.watchdog(interval)))
        try:
            await self.resolve_model()
            await self.supervise()
            platform.notify("STOPPING=1")
            # Final replies (done/cancelled) are already queued; give libzmq a moment to flush them.
            await asyncio.sleep(0.05)
            return self.exit_code
        finally:
            for t in tasks:
                t.cancel()
            if self.http is not None:
                await self.http.close()
            if self.editor is not None:
                await self.editor.close()
            self.router.close(linger=EXIT_FLUSH_MS)
            if self.tcp_router is not None:
                self.tcp_router.close(linger=EXIT_FLUSH_MS)
                self.authenticator.stop()
            self.ctx.term()


def send_error(sent) -> BaseException | None:
    """The error of a NOBLOCK send's finished future (None if it went out), let go of its traceback.

    pyzmq's frames in that traceback hold the future, which holds the traceback, and they lead
    (f_back) to the caller's frame: ~30 objects per dead client that only a full garbage
    collection would free.
    """
    error = sent.exception() if sent.done() else None
    if error is not None and error.__traceback__ is not None:
        traceback.clear_frames(error.__traceback__)
        error.__traceback__ = None
    return error


def drain_beats(engine: EngineHandle) -> bool:
    """Read what the engine's heartbeat thread wrote; whether there was anything."""
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
    return got


def door(client) -> str:
    """Which door a client came through: 'ipc', 'tcp' or 'editor' (each editor request is a client)."""
    if isinstance(client, tuple):
        return client[0]
    return "editor" if client.startswith(b"\x00editor") else "ipc"


def percentiles_us(samples) -> dict | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return {"p50": ordered[len(ordered) // 2] * 1e6, "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, "n": len(ordered)}


def client_name(client) -> str:
    return f"tcp:{client[1].hex()}" if isinstance(client, tuple) else client.hex()


def rss_of(pid: int) -> int | None:
    """Resident memory of a process; None if the probe fails (status must answer regardless)."""
    from moed import platform

    try:
        return platform.process_rss_bytes(pid)
    except Exception as e:
        log.debug("rss probe failed: %r", e)
        return None


def reply_id(msg: dict | None) -> str | None:
    """The request id to put on an error reply, when the bad message had a usable one."""
    if not isinstance(msg, dict):
        return None
    try:
        return P.request_id(msg)
    except P.ProtocolError:
        return None


# --------------------------------------------------------------------------
# CLI


def parse_size(text: str) -> int:
    from moed import config

    try:
        return config.parse_size(text)
    except config.ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def apply_config(args) -> None:
    """Settings shared with moectl come from config.toml < MOED_* environment < these flags."""
    from moed import config

    flags = {
        "model": args.model, "memory_budget": args.memory_budget, "capacity": args.capacity,
        "approximate": True if args.approximate else None, "prefetch": False if args.no_prefetch else None,
        "socket": args.socket, "tcp": args.tcp, "http": getattr(args, "http", None), "max_clients": args.max_clients,
    }
    cfg = config.load(flags)
    args.model, args.memory_budget, args.capacity = cfg.model, cfg.memory_budget, cfg.capacity
    args.approximate, args.no_prefetch = cfg.approximate, not cfg.prefetch
    args.socket, args.tcp, args.max_clients = cfg.socket, cfg.tcp, cfg.max_clients
    if hasattr(args, "http"):
        args.http = cfg.http
    if cfg.log_dir:
        os.environ["MOED_LOG_DIR"] = str(Path(cfg.log_dir).expanduser())  # the engine reads it too


def build_parser() -> argparse.ArgumentParser:
    from moed.engine import loop as engine  # the engine's own defaults (it imports no MLX until it loads a model)

    p = argparse.ArgumentParser(prog="moed", description="moed: one warm Mixture-of-Experts model, shared by many clients")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--model", default=None, help="model directory or Hugging Face repo id (default: the embedded model)")
    s.add_argument("--socket", default=None, help="socket path (default: moed.sock in the runtime dir)")
    s.add_argument("--tcp", default=None, metavar="127.0.0.1:PORT", help="also listen on TCP, CURVE-authenticated (off by default)")
    s.add_argument("--tcp-allow-remote", action="store_true", help="allow --tcp on a non-loopback address")
    s.add_argument("--memory-budget", type=parse_size, default=None, help="bytes for expert caches, e.g. 8G")
    s.add_argument("--capacity", type=int, default=None, help="expert slots per layer")
    s.add_argument("--approximate", action="store_true", help="allow approximate expert substitution")
    s.add_argument("--no-prefetch", action="store_true", help="disable expert prefetching")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 'busy'")
    s.add_argument("--max-clients", type=int, default=None,
                   help="clients per door before 'busy': ZeroMQ clients with requests in flight, editor connections, "
                        "HTTP requests in flight (default 64; config max_clients)")
    s.add_argument("--max-tokens", type=int, default=1 << 16, help="largest max_tokens a request may ask for")
    s.add_argument("--max-context", type=int, default=32768, help="largest prompt + max_tokens")
    s.add_argument("--prefill-step", type=int, default=2048, help="prompt tokens per prefill step (2048 as mlx_lm.generate: smaller steps let other streams decode sooner but change long-prompt numerics)")
    s.add_argument("--stream-interval", type=float, default=engine.STREAM_INTERVAL_S,
                   help="seconds a token may be held to go out with the next ones when tokens come faster than that "
                        "(a request's first token and its end never wait; 0: one message per token)")
    s.add_argument("--prompt-cache-size", type=int, default=8, help="recent prompt caches kept for prefix reuse")
    s.add_argument("--prompt-cache-bytes", type=parse_size, default=512 << 20, help="memory for those caches, e.g. 512M")
    s.add_argument("--shutdown-timeout", type=float, default=GRACEFUL_SHUTDOWN_S, help="seconds in-flight requests get on shutdown")
    s.add_argument("--engine-timeout", type=float, default=ENGINE_STALL_TIMEOUT_S,
                   help="seconds without a heartbeat from the engine before it is killed and restarted (0: never)")
    s.add_argument("--debug", action="store_true", help="verbose logs, including prompts")
    from moed.doors import editor, http

    editor.add_arguments(s)
    http.add_arguments(s)
    return p


def serve(args) -> int:
    from moed.config import ConfigError

    try:
        apply_config(args)
    except ConfigError as e:
        print(f"moed: configuration: {e}", file=sys.stderr)
        return 1
    logfile = setup_logging("moed", args.debug)
    if args.socket:
        os.environ.setdefault("MOED_RUNTIME_DIR", str(Path(args.socket).parent))
    socket_path = Path(args.socket) if args.socket else paths.daemon_socket()
    runtime = RuntimeFiles(socket_path)
    try:
        runtime.acquire()
    except (DaemonError, PermissionError) as e:
        print(f"moed: {e}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(Daemon(args, runtime).run())
    except DaemonError as e:
        log.error("%s", e)
        print(f"moed: {e} (log: {logfile})", file=sys.stderr)
        return 1
    finally:
        runtime.release()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
