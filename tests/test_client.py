"""moed_client: errors a caller can branch on, the asyncio client, and the rule
that the client never imports MLX."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest

import moed_client
from moed_client import AsyncClient, Client, DaemonNotRunning, ProtocolMismatch, RequestError, Timeout
from moed_client import protocol as P


def test_client_does_not_import_mlx():
    code = "import sys, moed_client; c = moed_client.Client; assert not any(m == 'mlx' or m.startswith(('mlx.', 'mlx_lm')) for m in sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_not_running_without_socket(tmp_path):
    with pytest.raises(DaemonNotRunning, match="not running"):
        Client(tmp_path / "nope.sock").status()


def test_not_running_with_dead_socket(tmp_path):
    from conftest import short_tmpdir

    path = short_tmpdir() / "moed.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    t0 = time.monotonic()
    with pytest.raises(DaemonNotRunning):
        Client(path, connect_timeout=0.5).ping()
    assert time.monotonic() - t0 < 5


def test_protocol_mismatch(shared_daemon, monkeypatch):
    monkeypatch.setattr(P, "PROTOCOL_VERSION", (P.PROTOCOL_VERSION[0] + 1, 0))
    with pytest.raises(ProtocolMismatch, match="version"):
        Client(shared_daemon.socket).connect()


def test_request_error_has_code(shared_daemon):
    with shared_daemon.client() as c:
        with pytest.raises(RequestError) as e:
            c.complete("hi", temperature=-3)
    assert e.value.code == P.ErrorCode.INVALID_REQUEST
    with pytest.raises(TypeError):
        Client(shared_daemon.socket).generate("hi", temprature=1.0)


def test_stream_timeout(shared_daemon):
    with shared_daemon.client() as c:
        stream = c.generate("hello world", max_tokens=30000, ignore_eos=True, timeout=1e-6)
        with pytest.raises(Timeout):
            for _ in stream:
                pass
        stream.close()
        assert c.ping() < 5


def test_exceptions_exported():
    for name in ("Busy", "DaemonNotRunning", "EngineError", "EngineRestarted", "MoedError", "ProtocolMismatch", "Timeout"):
        assert issubclass(getattr(moed_client, name), moed_client.MoedError)


async def test_async_client_streams_and_cancels(shared_daemon):
    async with shared_daemon.async_client() as c:
        with shared_daemon.client() as sync:
            expected = sync.complete("hello world", max_tokens=20).text
        stream = await c.generate("hello world", max_tokens=20)
        text = "".join([ch.text async for ch in stream])
        assert text == expected
        assert stream.finish_reason in ("length", "stop")

        # Leaving the loop early cancels on the daemon.
        stream = await c.generate("hello world", max_tokens=30000, ignore_eos=True)
        async with stream:
            async for i, _ in _enumerate(stream):
                if i == 2:
                    break
        for _ in range(200):
            if (await c.status())["requests"]["active"] == 0:
                break
            await asyncio.sleep(0.02)
        assert (await c.status())["requests"]["active"] == 0
        assert await c.ping() < 5


def test_closing_a_finished_but_unread_stream_leaves_nothing_behind(shared_daemon):
    with shared_daemon.client() as c:
        short = c.generate("hello world", max_tokens=2)
        assert "".join(ch.text for ch in c.generate("the quick brown fox", max_tokens=24))  # reads short's messages too
        assert any(m.get("type") == P.DONE for m in c._inbox[short.id])  # over, not yet read
        short.close()
        running = c.generate("hello world", max_tokens=30000, ignore_eos=True)
        next(iter(running))
        running.close()
        assert c._abandoned == {running.id}  # only the request that was still running was cancelled
        assert c.ping() < 5


async def test_async_closing_a_finished_but_unread_stream_leaves_nothing_behind(shared_daemon):
    async with shared_daemon.async_client() as c:
        short = await c.generate("hello world", max_tokens=2)
        await c.complete("the quick brown fox", max_tokens=24)  # short's messages arrive meanwhile
        assert any(m.get("type") == P.DONE for m in c._inbox[short.id])  # over, not yet read
        short.close()
        running = await c.generate("hello world", max_tokens=30000, ignore_eos=True)
        await running.__anext__()
        running.close()
        assert c._abandoned == {running.id}
        for _ in range(200):  # its late messages end with done/error, which clears it
            if not c._abandoned:
                break
            await asyncio.sleep(0.02)
        assert not c._abandoned


def test_stream_cancel_ends_with_the_final_done_and_its_usage(shared_daemon):
    with shared_daemon.client() as c:
        stream = c.generate("hello world", max_tokens=30000, ignore_eos=True)
        first = next(stream)
        stream.cancel()
        stream.cancel()  # idempotent: one cancel on the wire
        rest = [ch for ch in stream]  # chunks already on the way, then the final done
        assert stream.finish_reason == "cancelled"
        assert stream.usage["completion_tokens"] == len(first.token_ids) + sum(len(ch.token_ids) for ch in rest)
        assert stream.usage["completion_tokens"] < 30000 and not c._abandoned
        stream.cancel()  # over: nothing sent
        assert c.status()["requests"] == {"active": 0, "queued": 0}


async def test_async_stream_cancel_ends_with_the_final_done_and_its_usage(shared_daemon):
    async with shared_daemon.async_client() as c:
        stream = await c.generate("hello world", max_tokens=30000, ignore_eos=True)
        await stream.__anext__()
        stream.cancel()
        async for _ in stream:
            pass
        assert stream.finish_reason == "cancelled" and stream.usage["completion_tokens"] >= 1
        assert (await c.status())["requests"] == {"active": 0, "queued": 0}


async def test_async_client_concurrent_tasks(shared_daemon):
    prompts = ["hello world", "the quick brown fox", "def main():"]
    with shared_daemon.client() as sync:
        expected = [sync.complete(p, max_tokens=16).text for p in prompts]
    async with shared_daemon.async_client() as c:
        results = await asyncio.gather(*(c.complete(p, max_tokens=16) for p in prompts), c.status(), c.ping())
    assert [r.text for r in results[:3]] == expected
    assert results[3]["state"] == "ready"


async def test_async_not_running(tmp_path):
    with pytest.raises(DaemonNotRunning):
        await AsyncClient(tmp_path / "nope.sock").status()


async def _enumerate(aiter):
    i = 0
    async for x in aiter:
        yield i, x
        i += 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_daemon_killed_midstream_is_noticed(daemon, monkeypatch, kind):
    """A stream whose daemon dies (kill -9) ends with DaemonNotRunning after the liveness probe, not at the timeout."""
    import os
    import signal

    import moed_client.core

    monkeypatch.setattr(moed_client.core, "LIVENESS_S", 0.5)
    d = daemon()

    async def run_async():
        async with d.async_client(timeout=60) as c:
            stream = await c.generate("hello world", max_tokens=30000, ignore_eos=True)
            await stream.__anext__()
            os.kill(d.pid, signal.SIGKILL)
            async for _ in stream:
                pass

    t0 = time.monotonic()
    with pytest.raises(DaemonNotRunning):
        if kind == "async":
            asyncio.run(run_async())
        else:
            with d.client(timeout=60) as c:
                stream = c.generate("hello world", max_tokens=30000, ignore_eos=True)
                next(stream)
                os.kill(d.pid, signal.SIGKILL)
                for _ in stream:
                    pass
    assert time.monotonic() - t0 < 20


def test_liveness_pong_is_swallowed(shared_daemon):
    """The client's own liveness ping is answered and consumed without disturbing other replies."""
    with shared_daemon.client() as c:
        c._probe()
        assert c.status()["state"] == "ready"
        assert c._probe_sent is False
        assert not c._waiters  # nothing waits for a reply, and the pong answered no one
        assert c.complete("hello world", max_tokens=5).token_ids
