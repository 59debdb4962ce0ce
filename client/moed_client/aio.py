"""``AsyncClient``: the asyncio driver over the client core (``core.py``).

One reader task receives every message and routes it through the core; a task
waiting for a stream's token or a reply sleeps on a future that the reader
resolves when its message arrives.
"""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from . import protocol as P
from .core import CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, Chunk, Completion, Core, StreamBase


class AsyncStream(StreamBase):
    """Async iterator over a request's chunks; ``aclose()`` (or ``async with``) cancels it.
    ``cancel()`` cancels it too but lets iteration end with the final ``done`` (its usage)."""

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        if self._open and (chunk := self._step(await self._client._next_for(self.id, self._timeout))) is not None:
            return chunk
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()

    async def collect(self) -> Completion:
        async for _ in self:
            pass
        return self._outcome.completion()


class AsyncClient(Core):
    """asyncio client; safe to use from many tasks of one event loop."""

    def __init__(self, socket=None, *, timeout: float | None = DEFAULT_TIMEOUT_S, connect_timeout: float = CONNECT_TIMEOUT_S, name: str = "moed-client", curve=None):
        super().__init__(socket, timeout, connect_timeout, name, curve)
        self._ctx = zmq.asyncio.Context.instance()
        self._reader: asyncio.Task | None = None
        self._wakers: dict[object, asyncio.Future] = {}  # what a task waits for -> its future
        self._connecting: asyncio.Lock | None = None

    async def connect(self) -> dict:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._sock is not None:
                return self.server
            self._open_socket(self._ctx)
            self._reader = asyncio.ensure_future(self._read())
            try:
                self.server = await self._request(P.hello(self.name), P.HELLO, self.connect_timeout)
            except BaseException:
                await self.close()
                raise
            return self.server

    async def close(self) -> None:
        if self._sock is None:
            return
        if self._reader is not None:
            self._reader.cancel()
        self._close_socket()
        self._wake_all()  # their waits end with "client closed"

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def generate(self, prompt: str | None = None, *, messages=None, token_ids=None, timeout: float | None = ..., **sampling) -> AsyncStream:
        """``async for chunk in await client.generate(...)``."""
        await self.connect()
        rid, frame = self._start(prompt, messages, token_ids, sampling)
        await self._sock.send(frame)
        return AsyncStream(self, rid, self.timeout if timeout is ... else timeout)

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

    # -- the driver: a reader task and one future per waiting task ------------------

    async def _request(self, msg: dict, kind: str, timeout: float | None) -> dict:
        waiter = self._expect(kind)
        await self._sock.send(P.pack(msg))
        await self._wait(waiter, waiter.take, timeout, "reply", hello=kind == P.HELLO)
        return self._answer(waiter)

    async def _next_for(self, rid: str, timeout: float | None) -> dict:
        return await self._wait(rid, lambda: self._take_for(rid), timeout, "token")

    async def _wait(self, key, take, timeout: float | None, what: str, hello: bool = False) -> dict:
        rule = self._wait_rule(take, timeout, what, hello)
        try:
            wait = next(rule)
            while True:
                wait = rule.send(await self._woken(key, wait))
        except StopIteration as found:
            return found.value

    async def _woken(self, key, wait: float) -> bool:
        """Whether a message for ``key`` came within ``wait`` seconds."""
        woken = asyncio.get_running_loop().create_future()
        self._wakers[key] = woken
        try:
            await asyncio.wait_for(woken, wait)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if self._wakers.get(key) is woken:
                del self._wakers[key]

    async def _read(self) -> None:
        while True:
            key = self._deliver(P.unpack(await self._sock.recv()))
            if self._failure is not None:
                self._wake_all()
            elif key is not None:
                self._wake(key)

    def _wake(self, key) -> None:
        woken = self._wakers.pop(key, None)
        if woken is not None and not woken.done():
            woken.set_result(True)

    def _wake_all(self) -> None:
        for key in list(self._wakers):
            self._wake(key)

    def _post(self, frame: bytes) -> bool:
        try:
            # pyzmq's own socket (not a sync shadow) keeps its edge-triggered wakeups right;
            # NOBLOCK returns a finished future at once, whose error is read here.
            sent = self._sock.send(frame, flags=zmq.NOBLOCK)
        except RuntimeError:  # no event loop (a stream collected after the loop ended): nobody is receiving
            try:
                zmq.Socket.shadow(self._sock.underlying).send(frame, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                return False
            return True
        return not sent.done() or sent.exception() is None
