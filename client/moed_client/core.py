"""The one client core: protocol v1 state and rules, without I/O.

``Client`` (blocking, ``client.py``) and ``AsyncClient`` (asyncio, ``aio.py``) are thin
drivers over ``Core``: each owns a ZeroMQ DEALER socket and says how to wait for the
next message; everything else is here, written once: request ids, routing replies to
the request they answer, cancelling abandoned streams, the liveness probe, the hello
check and the timeouts. jupyter_client's blocking client instead runs its async
client on an event loop; here the blocking client keeps plain blocking pyzmq (a loopback
round trip of about 130 us, against 210 us through asyncio) and needs no event loop.
"""

from __future__ import annotations

import collections
import itertools
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq

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
FINAL = (P.DONE, P.ERROR)


@dataclass
class Chunk:
    """A piece of a stream: new text and the token ids it came from."""

    text: str
    token_ids: list[int]
    tool_calls: list[dict] = field(default_factory=list)  # calls completed in this chunk: {id, name, arguments (JSON text)}


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict
    timings: dict
    tool_calls: list[dict] = field(default_factory=list)
    stop_sequence: str | None = None  # the stop string that ended the answer


@dataclass
class _Outcome:
    """What a finished stream ended with."""

    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    stop_sequence: str | None = None

    def absorb(self, msg: dict) -> Chunk | None:
        """Take one message for this request: a Chunk, None when done, or raise its error."""
        kind = msg.get("type")
        if kind == P.CHUNK:
            chunk = Chunk(msg.get("text", ""), list(msg.get("token_ids") or []), list(msg.get("tool_calls") or []))
            self.text += chunk.text
            self.token_ids += chunk.token_ids
            self.tool_calls += chunk.tool_calls
            return chunk
        if kind == P.DONE:
            self.finish_reason = msg.get("finish_reason")
            self.usage = msg.get("usage") or {}
            self.timings = msg.get("timings") or {}
            self.tool_calls = list(msg.get("tool_calls") or self.tool_calls)
            self.stop_sequence = msg.get("stop_sequence")
            return None
        if kind == P.ERROR:
            self.finish_reason = "error"
            raise from_message(msg)
        raise MoedError(f"unexpected message {kind!r} in a stream", code=P.ErrorCode.INTERNAL)

    def completion(self) -> Completion:
        return Completion(self.text, self.token_ids, self.finish_reason, self.usage, self.timings, self.tool_calls, self.stop_sequence)


REQUEST_FIELDS = {"tools", "tool_choice", "model"}  # generate fields besides the prompt and sampling


def generate_message(request_id: str, prompt=None, messages=None, token_ids=None, **sampling) -> dict:
    msg = {"type": P.GENERATE, "id": request_id}
    for name, value in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids)):
        if value is not None:
            msg[name] = value
    unknown = set(sampling) - set(P.SamplingParams.__dataclass_fields__) - REQUEST_FIELDS
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


class _Waiter:
    """One request that is answered without an id (hello, status, ping, shutdown).

    The daemon answers these in the order they were sent, so the oldest waiter takes
    the next such reply; one that timed out stays in line to absorb its late reply."""

    __slots__ = ("kind", "reply")

    def __init__(self, kind: str):
        self.kind = kind
        self.reply: dict | None = None

    def take(self) -> dict | None:
        return self.reply


class Core:
    """Protocol state shared by both clients. A driver provides ``_post`` (a send that
    never blocks; False when it could not be sent) and drives ``_wait_rule``."""

    def __init__(self, socket: str | Path | None, timeout: float | None, connect_timeout: float, name: str, curve):
        self.endpoint = paths.endpoint(socket)
        self.curve = curve
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name
        self.server: dict | None = None  # the daemon's hello reply
        # `model_changed` notices (protocol.MODEL_CHANGED), newest last; server["model"] follows them.
        self.model_changes: collections.deque = collections.deque(maxlen=16)
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._sock = None
        self._reset()

    def _reset(self) -> None:
        self._inbox: dict[str, collections.deque] = {}  # messages of each live stream, until read
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._abandoned: set[str] = set()  # cancelled streams whose late messages are dropped
        self._probe_sent = False
        self._failure: MoedError | None = None  # found while routing; raised to the next waiter

    def _post(self, frame: bytes) -> bool:
        raise NotImplementedError

    def _open_socket(self, ctx) -> None:
        _check_socket(self.endpoint)
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
        self._sock = sock

    def _close_socket(self) -> None:
        """Cancel what still runs, then drop the socket and all state."""
        for rid in list(self._inbox):
            self._abandon(rid)
        self._sock.close(linger=100)
        self._sock = None
        self._reset()

    # -- requests ---------------------------------------------------------------

    def _start(self, prompt, messages, token_ids, sampling: dict) -> tuple[str, bytes]:
        """A new stream's id and the frame that starts it."""
        rid = f"{self._prefix}-{next(self._ids)}"
        frame = request_frame(generate_message(rid, prompt, messages, token_ids, **sampling))
        self._inbox[rid] = collections.deque()
        return rid, frame

    def _expect(self, kind: str) -> _Waiter:
        waiter = _Waiter(kind)
        self._waiters.append(waiter)
        return waiter

    def _answer(self, waiter: _Waiter) -> dict:
        """The waiter's reply, or its error raised."""
        reply = waiter.reply
        if waiter.kind == P.HELLO:
            return _hello_reply(reply, self.endpoint)
        if reply.get("type") == P.ERROR:
            raise from_message(reply)
        if reply.get("type") != waiter.kind:
            raise MoedError(f"unexpected reply {reply.get('type')!r} to {waiter.kind} from {self.endpoint}")
        return reply

    def _take_for(self, rid: str) -> dict | None:
        inbox = self._inbox.get(rid)
        if inbox is None:  # the client closed under the stream
            raise MoedError("client closed", code="closed")
        return inbox.popleft() if inbox else None

    def _forget(self, rid: str) -> None:
        self._inbox.pop(rid, None)

    def _abandon(self, rid: str) -> None:
        """Cancel a stream nobody will read; its late messages are dropped."""
        inbox = self._inbox.pop(rid, None)
        if inbox is None or any(m.get("type") in FINAL for m in inbox) or self._sock is None:
            return  # over already (or the client closed): nothing to cancel, nothing more will come
        self._abandoned.add(rid)
        self._post(P.pack({"type": P.CANCEL, "id": rid}))

    # -- incoming ---------------------------------------------------------------

    def _deliver(self, msg: dict) -> object:
        """Route one message from the daemon; what it woke (a stream id or a waiter), or None."""
        self._probe_sent = False  # any message shows the daemon is alive
        kind, rid = msg.get("type"), msg.get("id")
        if kind == P.PONG and msg.get("nonce") == LIVENESS_NONCE:
            if self.server and msg.get("instance_id") and msg["instance_id"] != self.server.get("instance_id"):
                # Another daemon instance answers: ours restarted and its requests are gone.
                self._failure = DaemonNotRunning("moed restarted (a new instance answers); requests in flight were lost", code="restarted")
            return None
        if kind == P.MODEL_CHANGED:  # unasked, never a reply: remember it, wake nobody
            self.model_changes.append(msg)
            if self.server is not None and isinstance(msg.get("model"), dict):
                self.server["model"] = msg["model"]
            return None
        if isinstance(rid, str) and rid in self._abandoned:
            if kind in FINAL:
                self._abandoned.discard(rid)
            return None
        if isinstance(rid, str) and rid in self._inbox:
            self._inbox[rid].append(msg)
            return rid
        if isinstance(rid, str) and rid:
            return None  # a stream that is over and forgotten
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.reply = msg
            return waiter
        return None

    def _probe(self) -> None:
        """A silent wait: ping the daemon, or give up if the last ping went unanswered."""
        if self._probe_sent:
            raise DaemonNotRunning(f"moed stopped answering on {self.endpoint} (no reply to a ping in {LIVENESS_S:g} s)")
        if not self._post(P.pack({"type": P.PING, "nonce": LIVENESS_NONCE})):
            raise DaemonNotRunning(f"moed is gone from {self.endpoint}")
        self._probe_sent = True

    def _wait_rule(self, take, timeout: float | None, what: str, hello: bool = False):
        """The one wait rule of both clients, as a generator: it yields how many seconds
        to wait for the next message and is sent whether one came; it returns what
        ``take`` found. Silence longer than LIVENESS_S sends a probe (not while saying
        hello: there is no daemon to judge yet)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            if self._sock is None:
                raise MoedError("client closed", code="closed")
            msg = take()
            if msg is not None:
                return msg
            wait = LIVENESS_S if deadline is None else min(max(0.0, deadline - time.monotonic()), LIVENESS_S)
            if (yield wait):
                continue
            if deadline is not None and time.monotonic() >= deadline:
                if hello:
                    raise DaemonNotRunning(f"moed does not answer on {self.endpoint} (socket present but no reply in {timeout:g} s)")
                raise Timeout(f"no {what} from moed on {self.endpoint} within {timeout:g} s")
            if not hello and wait >= LIVENESS_S:  # a slice cut short by the deadline is no silence
                self._probe()


class StreamBase:
    """What a request's stream reports, for both clients: ``finish_reason``, ``usage``,
    ``timings``, ``text`` and ``token_ids`` after the end."""

    def __init__(self, client: Core, request_id: str, timeout: float | None):
        self._client = client
        self.id = request_id
        self._timeout = timeout
        self._outcome = _Outcome()
        self._open = True
        self._cancel_sent = False

    finish_reason = property(lambda self: self._outcome.finish_reason)
    usage = property(lambda self: self._outcome.usage)
    timings = property(lambda self: self._outcome.timings)
    tool_calls = property(lambda self: self._outcome.tool_calls)
    stop_sequence = property(lambda self: self._outcome.stop_sequence)
    text = property(lambda self: self._outcome.text)
    token_ids = property(lambda self: self._outcome.token_ids)

    def _step(self, msg: dict) -> Chunk | None:
        """The chunk in ``msg``; None (and the stream ends) when the request is done."""
        try:
            chunk = self._outcome.absorb(msg)
        except MoedError:
            self._end()
            raise
        if chunk is None:
            self._end()
        return chunk

    def _end(self) -> None:
        self._open = False
        self._client._forget(self.id)

    def cancel(self) -> None:
        """Ask the daemon to cancel the request and keep the stream: iteration goes on to the
        daemon's final ``done`` (``finish_reason`` "cancelled" and the usage so far), which
        ``close()`` would drop. Idempotent; does nothing once the stream has ended."""
        if self._open and not self._cancel_sent and self._client._sock is not None:
            self._cancel_sent = True
            self._client._post(P.pack({"type": P.CANCEL, "id": self.id}))

    def close(self) -> None:
        """Cancel the request if it is still running."""
        if self._open:
            self._open = False
            self._client._abandon(self.id)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
