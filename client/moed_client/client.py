"""Clients for the moed daemon: ``Client`` (blocking) and ``AsyncClient`` (asyncio, ``aio.py``).

Both are thin drivers over one core (``core.py``) and speak protocol v1
(``moed_client.protocol``) over one ZeroMQ DEALER socket. Several requests may be
in flight on one client; replies are routed by request id. A ``Client`` is not
thread-safe: use one per thread.

    with Client() as c:
        for chunk in c.generate("Once upon a time", max_tokens=50):
            print(chunk.text, end="")

Leaving the loop early (``break``, an exception, or dropping the stream)
cancels the request on the daemon.
"""

from __future__ import annotations

import math
import time

import zmq

from . import protocol as P
from .aio import AsyncClient, AsyncStream
from .core import CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, Chunk, Completion, Core, StreamBase

__all__ = ["AsyncClient", "AsyncStream", "Chunk", "Client", "Completion", "Stream"]


class Stream(StreamBase):
    """Iterator over a request's chunks. ``finish_reason``, ``usage``, ``timings``, ``text`` after the end."""

    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        if self._open and (chunk := self._step(self._client._next_for(self.id, self._timeout))) is not None:
            return chunk
        raise StopIteration

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def collect(self) -> Completion:
        for _ in self:
            pass
        return self._outcome.completion()


class Client(Core):
    """Blocking client. ``timeout`` bounds every wait for one reply or token (None: wait forever).

    ``socket``: a path, ``ipc://`` or ``tcp://`` endpoint (default: the user's daemon).
    Over TCP the connection is CURVE-encrypted with ``curve`` (``moed_client.curve.ClientKeys``),
    by default this user's keys from ``moed_client.curve.client_keys()``.
    """

    def __init__(self, socket=None, *, timeout: float | None = DEFAULT_TIMEOUT_S, connect_timeout: float = CONNECT_TIMEOUT_S, name: str = "moed-client", curve=None):
        super().__init__(socket, timeout, connect_timeout, name, curve)
        self._ctx = zmq.Context.instance()

    def connect(self) -> dict:
        """Say hello (done lazily by every call); the daemon's hello reply."""
        if self._sock is not None:
            return self.server
        self._open_socket(self._ctx)
        try:
            self.server = self._request(P.hello(self.name), P.HELLO, self.connect_timeout)
        except BaseException:
            self.close()
            raise
        return self.server

    def close(self) -> None:
        if self._sock is not None:
            self._close_socket()

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests ------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, messages=None, token_ids=None, timeout: float | None = ..., **sampling) -> Stream:
        """Stream a completion: an iterator of ``Chunk``. Sampling: max_tokens, temperature, top_p, top_k, min_p, seed, stop."""
        self.connect()
        rid, frame = self._start(prompt, messages, token_ids, sampling)
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
        return self._request({"type": P.STATUS}, P.STATUS, self.timeout)

    def ping(self) -> float:
        """Round-trip time to the daemon in seconds."""
        self.connect()
        t0 = time.perf_counter()
        self._request({"type": P.PING}, P.PONG, self.timeout)
        return time.perf_counter() - t0

    def shutdown(self, now: bool = False) -> dict:
        """Ask the daemon to stop: gracefully (in-flight requests finish) or ``now`` (they are cancelled)."""
        self.connect()
        return self._request({"type": P.SHUTDOWN, "now": now}, P.SHUTDOWN, self.timeout)

    def load(self, model: str | None, drain: bool = True) -> dict:
        """Ask the daemon to serve ``model`` (None: the embedded one) instead: in-flight requests finish first
        (``drain``) or are cancelled. The reply says it accepted; ``status`` shows the load's progress."""
        self.connect()
        return self._request({"type": P.LOAD, "model": model, "drain": drain}, P.LOAD, self.timeout)

    # -- the driver: blocking pyzmq ------------------------------------------------

    def _request(self, msg: dict, kind: str, timeout: float | None) -> dict:
        waiter = self._expect(kind)
        self._send(msg)
        self._wait(waiter.take, timeout, "reply", hello=kind == P.HELLO)
        return self._answer(waiter)

    def _next_for(self, rid: str, timeout: float | None) -> dict:
        return self._wait(lambda: self._take_for(rid), timeout, "token")

    def _wait(self, take, timeout: float | None, what: str, hello: bool = False) -> dict:
        rule = self._wait_rule(take, timeout, what, hello)
        try:
            wait = next(rule)
            while True:
                wait = rule.send(self._receive(wait))
        except StopIteration as found:
            return found.value

    def _receive(self, wait: float) -> bool:
        """Receive and route one message if one comes within ``wait`` seconds."""
        if not self._sock.poll(math.ceil(wait * 1000)):  # not a millisecond early: that would spin
            return False
        self._deliver(P.unpack(self._sock.recv()))
        return True

    def _send(self, msg: dict) -> None:
        self._sock.send(P.pack(msg))

    def _post(self, frame: bytes) -> bool:
        try:
            self._sock.send(frame, flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # no daemon connected (Again), or the socket is going away
            return False
        return True
