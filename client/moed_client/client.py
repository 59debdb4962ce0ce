"""Clients for the moed daemon: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak protocol v1 (``moed_client.protocol``) over one ZeroMQ DEALER
socket. Several requests may be in flight on one client; replies are routed
by request id. A ``Client`` is not thread-safe: use one per thread.

    with Client() as c:
        for chunk in c.generate("Once upon a time", max_tokens=50):
            print(chunk.text, end="")

Leaving the loop early (``break``, an exception, or dropping the stream)
cancels the request on the daemon.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

from . import paths
from . import protocol as P
from .errors import DaemonNotRunning, MoedError, ProtocolMismatch, RequestError, Timeout, from_message

DEFAULT_TIMEOUT_S = 120.0  # longest wait for any one reply or token (a first token may wait for a busy batch)
CONNECT_TIMEOUT_S = 5.0
# After this long without a word from the daemon, a waiting client pings it; with no pong
# within as long again, the daemon is gone (killed, crashed) and the wait ends at once
# instead of at ``timeout``. The front answers pings while the engine is busy.
LIVENESS_S = 5.0
LIVENESS_NONCE = "moed-client-liveness"


@dataclass
class Chunk:
    """A piece of a stream: new text and the token ids it came from."""

    text: str
    token_ids: list[int]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict
    timings: dict


@dataclass
class _Outcome:
    """What a finished stream ended with (shared by the sync and async streams)."""

    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)

    def absorb(self, msg: dict) -> Chunk | None:
        """Take one message for this request: a Chunk, None when done, or raise its error."""
        kind = msg.get("type")
        if kind == P.CHUNK:
            chunk = Chunk(msg.get("text", ""), list(msg.get("token_ids") or []))
            self.text += chunk.text
            self.token_ids += chunk.token_ids
            return chunk
        if kind == P.DONE:
            self.finish_reason = msg.get("finish_reason")
            self.usage = msg.get("usage") or {}
            self.timings = msg.get("timings") or {}
            return None
        if kind == P.ERROR:
            self.finish_reason = "error"
            raise from_message(msg)
        raise MoedError(f"unexpected message {kind!r} in a stream", code=P.ErrorCode.INTERNAL)

    def completion(self) -> Completion:
        return Completion(self.text, self.token_ids, self.finish_reason, self.usage, self.timings)


def generate_message(request_id: str, prompt=None, messages=None, token_ids=None, **sampling) -> dict:
    msg = {"type": P.GENERATE, "id": request_id}
    for name, value in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids)):
        if value is not None:
            msg[name] = value
    unknown = set(sampling) - set(P.SamplingParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown sampling parameters: {sorted(unknown)}")
    msg.update({k: v for k, v in sampling.items() if v is not None})
    return msg


def request_frame(msg: dict) -> bytes:
    """The frame for ``msg``, refused here (limit_exceeded) when it is over the
    daemon's MAXMSGSIZE: the daemon would drop the connection unanswered."""
    frame = P.pack(msg)
    if len(frame) > P.MAX_MESSAGE_BYTES:
        raise RequestError(f"request of {len(frame)} bytes exceeds the {P.MAX_MESSAGE_BYTES}-byte message limit", code=P.ErrorCode.LIMIT_EXCEEDED)
    return frame


def _check_socket(endpoint: str) -> None:
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://") :]):
        raise DaemonNotRunning(f"moed is not running (no socket at {endpoint[len('ipc://'):]}); start it with `moectl start` or `moed serve`")


def _same_daemon(server: dict | None, pong: dict) -> None:
    """A pong from another daemon instance means ours restarted: its requests are gone."""
    if server and pong.get("instance_id") and pong["instance_id"] != server.get("instance_id"):
        raise DaemonNotRunning("moed restarted (a new instance answers); requests in flight were lost", code="restarted")


def _hello_reply(msg: dict, endpoint: str) -> dict:
    if msg.get("type") == P.ERROR:
        if msg.get("code") == P.ErrorCode.VERSION_MISMATCH:
            raise ProtocolMismatch(str(msg.get("message")))
        raise from_message(msg)
    if msg.get("type") != P.HELLO:
        raise MoedError(f"unexpected reply {msg.get('type')!r} to hello from {endpoint}")
    try:
        P.check_version(msg)
    except P.ProtocolError as e:
        raise ProtocolMismatch(e.message) from None
    return msg


class _StreamOutcome:
    """What a finished request reports, shared by the blocking and the asyncio stream."""

    _outcome: _Outcome

    finish_reason = property(lambda self: self._outcome.finish_reason)
    usage = property(lambda self: self._outcome.usage)
    timings = property(lambda self: self._outcome.timings)
    text = property(lambda self: self._outcome.text)
    token_ids = property(lambda self: self._outcome.token_ids)


class _Base:
    def __init__(self, socket: str | Path | None, timeout: float | None, connect_timeout: float, name: str, curve):
        self.endpoint = paths.endpoint(socket)
        self.curve = curve
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name
        self.server: dict | None = None  # the daemon's hello reply
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    def _new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _socket(self, ctx) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES * 2)
        if self.endpoint.startswith("tcp://"):
            from . import curve

            keys = self.curve or curve.client_keys()
            sock.curve_serverkey = keys.server_public
            sock.curve_publickey = keys.public
            sock.curve_secretkey = keys.secret
        sock.connect(self.endpoint)
        return sock


# --------------------------------------------------------------------------
# Blocking client


class Stream(_StreamOutcome):
    """Iterator over a request's chunks. ``finish_reason``, ``usage``, ``timings``, ``text`` after the end."""

    def __init__(self, client: "Client", request_id: str, timeout: float | None):
        self._client = client
        self.id = request_id
        self._timeout = timeout
        self._outcome = _Outcome()
        self._open = True

    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        while self._open:
            msg = self._client._next_for(self.id, self._timeout)
            try:
                chunk = self._outcome.absorb(msg)
            except MoedError:
                self._end()
                raise
            if chunk is None:
                self._end()
                break
            return chunk
        raise StopIteration

    def _end(self) -> None:
        self._open = False
        self._client._forget(self.id)

    def close(self) -> None:
        """Cancel the request if it is still running."""
        if self._open:
            self._open = False
            self._client._abandon(self.id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def collect(self) -> Completion:
        for _ in self:
            pass
        return self._outcome.completion()


class Client(_Base):
    """Blocking client. ``timeout`` bounds every wait for one reply or token (None: wait forever).

    ``socket``: a path, ``ipc://`` or ``tcp://`` endpoint (default: the user's daemon).
    Over TCP the connection is CURVE-encrypted with ``curve`` (``moed_client.curve.ClientKeys``),
    by default this user's keys from ``moed_client.curve.client_keys()``.
    """

    def __init__(self, socket=None, *, timeout: float | None = DEFAULT_TIMEOUT_S, connect_timeout: float = CONNECT_TIMEOUT_S, name: str = "moed-client", curve=None):
        super().__init__(socket, timeout, connect_timeout, name, curve)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._inbox: dict[str, collections.deque] = {}
        self._replies: collections.deque = collections.deque()  # replies that carry no request id
        self._abandoned: set[str] = set()
        self._probe_sent = False

    def connect(self) -> dict:
        """Say hello (done lazily by every call); the daemon's hello reply."""
        if self._sock is not None:
            return self.server
        _check_socket(self.endpoint)
        self._sock = self._socket(self._ctx)
        try:
            self._send(P.hello(self.name))
            msg = self._reply(P.HELLO, self.connect_timeout, not_running=True)
            self.server = _hello_reply(msg, self.endpoint)
        except BaseException:
            self.close()
            raise
        return self.server

    def close(self) -> None:
        if self._sock is not None:
            for rid in list(self._inbox):
                self._abandon(rid)
            self._sock.close(linger=100)
            self._sock = None

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests ------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, messages=None, token_ids=None, timeout: float | None = ..., **sampling) -> Stream:
        """Stream a completion: an iterator of ``Chunk``. Sampling: max_tokens, temperature, top_p, top_k, min_p, seed, stop."""
        self.connect()
        rid = self._new_id()
        frame = request_frame(generate_message(rid, prompt, messages, token_ids, **sampling))
        self._inbox[rid] = collections.deque()
        self._sock.send(frame)
        return Stream(self, rid, self.timeout if timeout is ... else timeout)

    def chat(self, messages: list[dict], **kwargs) -> Stream:
        """Like ``generate`` with chat messages rendered by the model's chat template."""
        return self.generate(messages=messages, **kwargs)

    def complete(self, prompt: str | None = None, **kwargs) -> Completion:
        """Generate to the end; the whole text with finish reason, usage and timings."""
        with self.generate(prompt, **kwargs) as stream:
            return stream.collect()

    def status(self) -> dict:
        self.connect()
        self._send({"type": P.STATUS})
        return self._reply(P.STATUS, self.timeout)

    def ping(self) -> float:
        """Round-trip time to the daemon in seconds."""
        self.connect()
        t0 = time.perf_counter()
        self._send({"type": P.PING})
        self._reply(P.PONG, self.timeout)
        return time.perf_counter() - t0

    def shutdown(self, now: bool = False) -> dict:
        """Ask the daemon to stop: gracefully (in-flight requests finish) or ``now`` (they are cancelled)."""
        self.connect()
        self._send({"type": P.SHUTDOWN, "now": now})
        return self._reply(P.SHUTDOWN, self.timeout)

    # -- plumbing -------------------------------------------------------------

    def _send(self, msg: dict) -> None:
        self._sock.send(P.pack(msg))

    def _receive(self, deadline: float | None, not_running: bool = False) -> None:
        """Receive one message into the inbox it belongs to."""
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            slice_s = LIVENESS_S if wait is None else min(wait, LIVENESS_S)
            if self._sock.poll(int(slice_s * 1000)):
                break
            if deadline is not None and time.monotonic() >= deadline:
                if not_running:
                    raise DaemonNotRunning(f"moed does not answer on {self.endpoint} (socket present but no reply in {self.connect_timeout:g} s)")
                raise Timeout(f"no reply from moed on {self.endpoint} within the timeout")
            if not not_running:
                self._probe()
        msg = P.unpack(self._sock.recv())
        self._probe_sent = False  # any message shows the daemon is alive
        if msg.get("type") == P.PONG and msg.get("nonce") == LIVENESS_NONCE:
            _same_daemon(self.server, msg)
            return
        rid = msg.get("id")
        if isinstance(rid, str) and rid in self._abandoned:
            if msg.get("type") in (P.DONE, P.ERROR):
                self._abandoned.discard(rid)
            return
        if isinstance(rid, str) and rid in self._inbox:
            self._inbox[rid].append(msg)
        else:
            self._replies.append(msg)

    def _probe(self) -> None:
        """A silent wait: ping the daemon, or give up if the last ping went unanswered."""
        if self._probe_sent:
            raise DaemonNotRunning(f"moed stopped answering on {self.endpoint} (no reply to a ping in {LIVENESS_S:g} s)")
        try:
            self._sock.send(P.pack({"type": P.PING, "nonce": LIVENESS_NONCE}), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise DaemonNotRunning(f"moed is gone from {self.endpoint}") from None
        self._probe_sent = True

    def _reply(self, kind: str, timeout: float | None, not_running: bool = False) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._replies:
                msg = self._replies.popleft()
                if msg.get("type") == kind:
                    return msg
                if msg.get("type") == P.ERROR:
                    if kind == P.HELLO:
                        return msg
                    raise from_message(msg)
            self._receive(deadline, not_running)

    def _next_for(self, rid: str, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        inbox = self._inbox[rid]
        while not inbox:
            self._receive(deadline)
        return inbox.popleft()

    def _forget(self, rid: str) -> None:
        self._inbox.pop(rid, None)

    def _abandon(self, rid: str) -> None:
        """Cancel a request nobody will read; its late messages are dropped."""
        inbox = self._inbox.pop(rid, None)
        if inbox is not None and any(m.get("type") in (P.DONE, P.ERROR) for m in inbox):
            return  # it is over already: nothing to cancel, nothing more will come
        if self._sock is not None:
            self._abandoned.add(rid)
            try:
                self._sock.send(P.pack({"type": P.CANCEL, "id": rid}), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass


# --------------------------------------------------------------------------
# asyncio client


class AsyncStream(_StreamOutcome):
    """Async iterator over a request's chunks; ``aclose()`` (or ``async with``) cancels it."""

    def __init__(self, client: "AsyncClient", request_id: str, queue: asyncio.Queue, timeout: float | None):
        self._client = client
        self.id = request_id
        self._queue = queue
        self._timeout = timeout
        self._outcome = _Outcome()
        self._open = True

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        while self._open:
            msg = await self._next_message()
            if msg is None:  # the client closed under us
                self._open = False
                raise MoedError("client closed", code="closed")
            try:
                chunk = self._outcome.absorb(msg)
            except MoedError:
                self._end()
                raise
            if chunk is None:
                self._end()
                break
            return chunk
        raise StopAsyncIteration

    async def _next_message(self) -> dict | None:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            slice_s = LIVENESS_S if wait is None else min(wait, LIVENESS_S)
            try:
                return await asyncio.wait_for(self._queue.get(), slice_s)
            except asyncio.TimeoutError:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"no token from moed within {self._timeout:g} s")
            try:  # silence: is the daemon still there?
                pong = await self._client._request({"type": P.PING, "nonce": LIVENESS_NONCE}, P.PONG, LIVENESS_S)
            except Timeout:
                raise DaemonNotRunning(f"moed stopped answering on {self._client.endpoint} (no reply to a ping in {LIVENESS_S:g} s)") from None
            _same_daemon(self._client.server, pong)

    def _end(self):
        self._open = False
        self._client._streams.pop(self.id, None)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._client._abandon(self.id)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    async def collect(self) -> Completion:
        async for _ in self:
            pass
        return self._outcome.completion()


class AsyncClient(_Base):
    """asyncio client; safe to use from many tasks of one event loop."""

    def __init__(self, socket=None, *, timeout: float | None = DEFAULT_TIMEOUT_S, connect_timeout: float = CONNECT_TIMEOUT_S, name: str = "moed-client", curve=None):
        super().__init__(socket, timeout, connect_timeout, name, curve)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = None
        self._reader: asyncio.Task | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._waiters: collections.deque = collections.deque()  # (kind, future) for replies without an id
        self._abandoned: set[str] = set()
        self._connecting: asyncio.Lock | None = None

    async def connect(self) -> dict:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._sock is not None:
                return self.server
            _check_socket(self.endpoint)
            self._sock = self._socket(self._ctx)
            self._reader = asyncio.ensure_future(self._read())
            try:
                msg = await self._request(P.hello(self.name), P.HELLO, self.connect_timeout, not_running=True)
                self.server = _hello_reply(msg, self.endpoint)
            except BaseException:
                await self.close()
                raise
            return self.server

    async def close(self) -> None:
        if self._sock is None:
            return
        for rid in list(self._streams):
            self._abandon(rid)
        if self._reader is not None:
            self._reader.cancel()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(MoedError("client closed", code="closed"))
        self._waiters.clear()
        for q in self._streams.values():
            q.put_nowait(None)
        self._sock.close(linger=100)
        self._sock = None

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def generate(self, prompt: str | None = None, *, messages=None, token_ids=None, timeout: float | None = ..., **sampling) -> AsyncStream:
        """``async for chunk in await client.generate(...)``."""
        await self.connect()
        rid = self._new_id()
        frame = request_frame(generate_message(rid, prompt, messages, token_ids, **sampling))
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = queue
        await self._sock.send(frame)
        return AsyncStream(self, rid, queue, self.timeout if timeout is ... else timeout)

    async def chat(self, messages: list[dict], **kwargs) -> AsyncStream:
        return await self.generate(messages=messages, **kwargs)

    async def complete(self, prompt: str | None = None, **kwargs) -> Completion:
        stream = await self.generate(prompt, **kwargs)
        async with stream:
            return await stream.collect()

    async def status(self) -> dict:
        await self.connect()
        return await self._request({"type": P.STATUS}, P.STATUS, self.timeout)

    async def ping(self) -> float:
        await self.connect()
        t0 = time.perf_counter()
        await self._request({"type": P.PING}, P.PONG, self.timeout)
        return time.perf_counter() - t0

    async def shutdown(self, now: bool = False) -> dict:
        await self.connect()
        return await self._request({"type": P.SHUTDOWN, "now": now}, P.SHUTDOWN, self.timeout)

    # -- plumbing -------------------------------------------------------------

    async def _request(self, msg: dict, kind: str, timeout: float | None, not_running: bool = False) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((kind, fut))
        await self._sock.send(P.pack(msg))
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            if not_running:
                raise DaemonNotRunning(f"moed does not answer on {self.endpoint} (socket present but no reply in {timeout:g} s)") from None
            raise Timeout(f"no {kind} reply from moed within {timeout:g} s") from None
        finally:
            self._waiters = collections.deque(w for w in self._waiters if w[1] is not fut)
        if reply.get("type") == P.ERROR and kind != P.HELLO:
            raise from_message(reply)
        return reply

    async def _read(self) -> None:
        while True:
            msg = P.unpack(await self._sock.recv())
            rid = msg.get("id")
            if isinstance(rid, str) and rid in self._abandoned:
                if msg.get("type") in (P.DONE, P.ERROR):
                    self._abandoned.discard(rid)
                continue
            if isinstance(rid, str) and rid in self._streams:
                # A final message ends the request here: the stream keeps its queue, and a
                # stream closed before reading it has nothing left to cancel (see _abandon).
                queue = self._streams.pop(rid) if msg.get("type") in (P.DONE, P.ERROR) else self._streams[rid]
                queue.put_nowait(msg)
                continue
            # A reply without a request id answers the oldest waiter (the daemon answers in order).
            while self._waiters:
                kind, fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(msg)
                    break

    def _abandon(self, rid: str) -> None:
        if self._streams.pop(rid, None) is None:
            return  # over already (its final message is queued or read): nothing to cancel
        if self._sock is not None:
            self._abandoned.add(rid)
            data = P.pack({"type": P.CANCEL, "id": rid})
            try:
                # pyzmq's own socket (not a sync shadow) keeps its edge-triggered wakeups right;
                # NOBLOCK returns a finished future at once, whose error nobody needs.
                sent = self._sock.send(data, flags=zmq.NOBLOCK)
                if sent.done():
                    sent.exception()
            except RuntimeError:  # no event loop (a stream collected after the loop ended): nobody is receiving
                try:
                    zmq.Socket.shadow(self._sock.underlying).send(data, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
