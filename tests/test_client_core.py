"""The client core's rules, against a scripted fake daemon (a ROUTER socket in a thread):
late replies, silence, a restarted daemon and a client closed under its stream, for the
blocking and the asyncio client alike."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import zmq

import moed_client.core
from moed_client import AsyncClient, Client, DaemonNotRunning, MoedError, Timeout
from moed_client import protocol as P


class FakeDaemon:
    """Answers each message with what ``answer(msg)`` returns (a list of replies; may sleep first)."""

    def __init__(self, path, answer):
        self.answer = answer
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.bind(f"ipc://{path}")
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            if not self.sock.poll(20):
                continue
            ident, frame = self.sock.recv_multipart()
            for reply in self.answer(P.unpack(frame)):
                self.sock.send_multipart([ident, P.pack(reply)])

    def stop(self):
        self.running = False
        self.thread.join()
        self.sock.close(linger=0)


def hello_then(rest, instance="a"):
    def answer(msg):
        if msg["type"] == P.HELLO:
            return [P.hello_reply(instance, {}, True)]
        return rest(msg)

    return answer


@pytest.fixture
def fake(monkeypatch):
    from conftest import short_tmpdir

    monkeypatch.setattr(moed_client.core, "LIVENESS_S", 0.2)
    path = short_tmpdir() / "moed.sock"
    started = []

    def start(answer):
        started.append(FakeDaemon(path, answer))
        return path

    yield start
    for d in started:
        d.stop()


def run(kind, path, body, **kwargs):
    """Run ``body(client)`` with a blocking or an asyncio client (``body`` awaits when async)."""
    if kind == "sync":
        with Client(path, **kwargs) as c:
            return body(c)

    async def main():
        async with AsyncClient(path, **kwargs) as c:
            return await body(c)

    return asyncio.run(main())


async def _maybe(value):
    return await value if asyncio.iscoroutine(value) else value


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_late_reply_is_not_taken_by_the_next_request(fake, kind, monkeypatch):
    monkeypatch.setattr(moed_client.core, "LIVENESS_S", 5.0)  # the fake is deaf while it sleeps
    count = []

    def status(msg):
        if msg["type"] == P.PING:
            return [{"type": P.PONG, "instance_id": "a", "nonce": msg.get("nonce")}]
        count.append(1)
        if len(count) == 1:
            time.sleep(0.4)  # answers after the client gave up
        return [{"type": P.STATUS, "n": len(count)}]

    path = fake(hello_then(status))

    def body(c):
        async def go():
            c.timeout = 0.1
            with pytest.raises(Timeout):
                await _maybe(c.status())
            c.timeout = 5
            return await _maybe(c.status())

        return go() if kind == "async" else asyncio.run(go())

    assert run(kind, path, body)["n"] == 2


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_short_timeout_on_a_slow_daemon_is_a_timeout(fake, kind, monkeypatch):
    """A wait cut short by its deadline is no silence: it must not probe, nor call a live daemon gone."""
    monkeypatch.setattr(moed_client.core, "LIVENESS_S", 5.0)

    def pong_only(msg):
        return [{"type": P.PONG, "instance_id": "a", "nonce": msg.get("nonce")}] if msg["type"] == P.PING else []

    path = fake(hello_then(pong_only))

    def body(c):
        async def go():
            for _ in range(20):
                with pytest.raises(Timeout):
                    await _maybe(c.status())

        return go() if kind == "async" else asyncio.run(go())

    run(kind, path, body, timeout=0.02)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_silent_daemon_ends_a_request_at_the_probe_not_the_timeout(fake, kind):
    path = fake(hello_then(lambda msg: []))  # says hello, then never a word (pings neither)
    t0 = time.monotonic()
    with pytest.raises(DaemonNotRunning, match="stopped answering"):
        run(kind, path, lambda c: c.status(), timeout=30)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_pong_from_another_instance_ends_a_stream_as_restarted(fake, kind):
    def pong_from_b(msg):
        return [{"type": P.PONG, "instance_id": "b", "nonce": msg.get("nonce")}] if msg["type"] == P.PING else []

    path = fake(hello_then(pong_from_b))

    def body(c):
        async def go():
            stream = await _maybe(c.generate("hi"))
            with pytest.raises(DaemonNotRunning) as e:
                if kind == "async":
                    await stream.__anext__()
                else:
                    next(stream)
            return e.value.code

        return go() if kind == "async" else asyncio.run(go())

    assert run(kind, path, body, timeout=30) == "restarted"


def test_a_stream_of_a_closed_client_says_so(fake):
    path = fake(hello_then(lambda msg: []))
    c = Client(path)
    stream = c.generate("hi")
    c.close()
    with pytest.raises(MoedError) as e:
        next(stream)
    assert e.value.code == "closed"


async def test_closing_an_async_client_wakes_its_waiting_stream(fake):
    path = fake(hello_then(lambda msg: []))
    c = AsyncClient(path, timeout=30)
    stream = await c.generate("hi")
    reading = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.05)
    await c.close()
    with pytest.raises(MoedError) as e:
        await asyncio.wait_for(reading, 5)
    assert e.value.code == "closed"
