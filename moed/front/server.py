"""``moed serve``'s front process: its sockets, the dispatch of client messages, and its life.

It owns the ZeroMQ ROUTER that clients speak protocol v1 (moed_client.protocol)
to, starts the doors (HTTP gateway, editor socket: protocol clients of this
socket), and runs the engine through the Supervisor. A request flows one way:
socket -> Sessions (admission, queue) -> Supervisor -> engine -> Sessions ->
the client. ``status``, ``ping`` and ``cancel`` never wait for the engine, so
they are answered while it decodes or loads. The command line is moed/front/main.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
import traceback
import uuid

import zmq
import zmq.asyncio

from moed_client import paths
from moed_client import protocol as P

from moed.front import status
from moed.front.runtime import DaemonError, RuntimeFiles, bind_private
from moed.front.sessions import Sessions, client_name
from moed.front.supervisor import Supervisor
from moed.front.switching import ModelKeeper
from moed.net import is_loopback

__all__ = ["Daemon", "DaemonError", "RuntimeFiles"]

log = logging.getLogger("moed.daemon")

# ZMTP heartbeats let the ROUTER notice peers that vanish without closing
# their connection (a dead TCP peer); ipc peers are noticed at once.
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000
# A client that stops reading is dropped rather than allowed to stall the others.
CLIENT_SNDHWM = 100_000
SOCKET_CHECK_S = 1.0  # how often the front checks that its socket file is still there
# On exit, how long libzmq may keep delivering queued replies to a client that
# reads slowly: its final 'done' sits behind its unread chunks.
EXIT_FLUSH_MS = 2000


class Daemon:
    def __init__(self, args, runtime: RuntimeFiles):
        self.args = args
        self.runtime = runtime
        self.instance_id = uuid.uuid4().hex
        self.started = time.monotonic()
        self.ctx = zmq.asyncio.Context()
        self.meters = status.Meters()
        self.sessions = Sessions(args, self.send)
        self.supervisor = Supervisor(args, self.ctx, self.sessions, self.meters)
        self.sessions.engine = self.supervisor
        self.keeper = ModelKeeper(self)  # `load`, model names on requests, keep-alive
        self.stopping = asyncio.Event()
        self.drain_deadline: float | None = None
        self.exit_code = 0
        self.editor = None  # the editor socket (moed/doors/editor.py), a protocol v1 client of this daemon
        self.http = None  # the OpenAI-compatible gateway (moed/doors/http.py), the same

    @property
    def state(self) -> str:
        return self.supervisor.state

    def status(self) -> dict:
        return status.report(self)

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
        bind_private(sock, self.runtime.socket_path)

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
        self.sessions.drop_client(client)
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
        self.keeper.heard_from(client)
        if kind == P.HELLO:
            if "version" not in msg:
                P.check_version(msg)
            self.send(client, P.hello_reply(self.instance_id, self.supervisor.model, self.state == "ready") | {"state": self.state})
        elif kind == P.PING:
            reply = {"type": P.PONG, "instance_id": self.instance_id, "state": self.state}
            if "nonce" in msg:
                reply["nonce"] = msg["nonce"]
            self.send(client, reply)
        elif kind == P.STATUS:
            self.send(client, {"type": P.STATUS, **self.status()})
        elif kind == P.GENERATE:
            self.keeper.check_request(client, msg)
            self.sessions.admit(client, msg)
        elif kind == P.LOAD:
            self.keeper.load(client, msg)
        elif kind == P.CANCEL:
            self.sessions.cancel_id(client, P.request_id(msg))
        elif kind == P.SHUTDOWN:
            now = bool(msg.get("now"))
            log.info("shutdown requested by a client (now=%s)", now)
            self.send(client, {"type": P.SHUTDOWN, "accepted": True, "now": now})
            self.begin_shutdown(now)
        else:
            raise P.ProtocolError(P.ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}; this daemon knows {sorted(P.CLIENT_TYPES)}")

    # -- shutdown ----------------------------------------------------------

    def begin_shutdown(self, now: bool) -> None:
        if self.state == "stopping" and not now:
            return
        self.supervisor.stop_accepting()
        self.sessions.closed = True
        self.sessions.cancel_all(in_engine_too=now)
        self.drain_deadline = time.monotonic() + (0.0 if now else self.args.shutdown_timeout)
        asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """Let in-flight requests finish (or be cancelled), then stop."""
        requests = self.sessions.requests
        while requests and time.monotonic() < self.drain_deadline:
            await asyncio.sleep(0.02)
        if requests:
            for seq in list(requests):
                self.sessions.cancel(seq)
            deadline = time.monotonic() + 2.0
            while requests and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.stopping.set()

    def pids(self) -> list[int]:
        """The front's and the engine's, for the RSS figures."""
        engine = self.supervisor.engine
        return [os.getpid()] + ([engine.pid] if engine else [])

    async def watchdog(self, interval: float) -> None:
        from moed import platform

        while True:
            platform.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run(self) -> int:
        from moed import platform

        self.bind_client_socket()
        from moed.doors import editor, http

        try:
            self.http = await http.open_gateway(self.args, self.runtime.socket_path)
        except http.GatewayError as e:
            raise DaemonError(str(e)) from None
        self.editor = await editor.open_door(self.args, self.runtime.socket_path)
        log.info("moed %s listening on %s (instance %s), model %s", status.VERSION, self.runtime.socket_path, self.instance_id, self.args.model or "embedded")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_shutdown, False)
        tasks = [asyncio.ensure_future(self.client_loop(self.router)), asyncio.ensure_future(self.watch_socket()),
                 asyncio.ensure_future(self.keeper.idle_loop())]
        if self.tcp_router is not None:
            tasks.append(asyncio.ensure_future(self.client_loop(self.tcp_router, tcp=True)))
        if platform.rss_probe_blocks():
            tasks.append(asyncio.ensure_future(self.meters.refresh_rss(self.pids)))
        interval = platform.watchdog_interval()
        if interval:
            tasks.append(asyncio.ensure_future(self.watchdog(interval)))
        try:
            await self.supervisor.resolve_model()
            await self.supervisor.supervise(self.stopping)
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


def reply_id(msg: dict | None) -> str | None:
    """The request id to put on an error reply, when the bad message had a usable one."""
    if not isinstance(msg, dict):
        return None
    try:
        return P.request_id(msg)
    except P.ProtocolError:
        return None
