"""The watchdog: a long, legitimate prefill is not a hang; no progress for N seconds is.
The engine's heartbeats say whether its loop moved on (moed/engine/loop.py,
ProgressMark); the supervisor judges (moed/front/supervisor.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from moed.engine.loop import ProgressMark
from moed.front.supervisor import EngineHandle, Supervisor


def test_progress_mark_says_whether_the_loop_moved_on():
    mark = ProgressMark()
    assert mark.beat() == mark.PROGRESS  # loading the model: not judged
    mark.waiting = False
    mark.tick()
    assert mark.beat() == mark.PROGRESS  # a turn finished since the last beat (a prefill chunk, a step)
    assert mark.beat() == mark.ALIVE  # stuck inside a turn
    mark.waiting = True
    assert mark.beat() == mark.PROGRESS  # waiting for work is not a hang


class FakeProc:
    def __init__(self):
        self.returncode = None
        self.killed_at = None

    def kill(self):
        self.killed_at = time.monotonic()
        self.returncode = -9


def watch(beat: bytes, seconds: float, hang: float = 1.0) -> tuple[FakeProc, EngineHandle]:
    """Run the supervisor's watchdog over an engine that beats ``beat`` every 0.1 s."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    proc = FakeProc()
    engine = EngineHandle(proc, None, None, 1234, ready=True, beat_fd=r)
    stop = threading.Event()

    def beater():
        while not stop.is_set():
            os.write(w, beat)
            time.sleep(0.1)

    threading.Thread(target=beater, daemon=True).start()
    sup = Supervisor.__new__(Supervisor)

    async def main():
        task = asyncio.ensure_future(sup.engine_watchdog(engine, 5.0, hang))
        await asyncio.wait({task}, timeout=seconds)
        task.cancel()

    t0 = time.monotonic()
    try:
        asyncio.run(main())
    finally:
        stop.set()
        os.close(w)
        os.close(r)
    if proc.killed_at is not None:
        proc.killed_at -= t0
    return proc, engine


def test_an_engine_that_beats_without_progress_is_killed_as_hung():
    proc, engine = watch(ProgressMark.ALIVE, 5.0, hang=1.0)
    assert proc.killed_at is not None and 0.9 < proc.killed_at < 3.0, proc.killed_at
    assert engine.hung and engine.stalled


def test_a_long_prefill_that_makes_progress_is_not_a_hang():
    proc, engine = watch(ProgressMark.PROGRESS, 2.5, hang=1.0)
    assert proc.killed_at is None and not engine.hung


def test_hang_timeout_zero_never_judges():
    proc, _ = watch(ProgressMark.ALIVE, 2.0, hang=0.0)
    assert proc.killed_at is None


def test_a_loading_engine_is_not_judged():
    r, w = os.pipe()
    os.set_blocking(r, False)
    proc = FakeProc()
    engine = EngineHandle(proc, None, None, 1, ready=False, beat_fd=r, last_progress=time.monotonic() - 100)
    sup = Supervisor.__new__(Supervisor)

    async def main():
        task = asyncio.ensure_future(sup.engine_watchdog(engine, 0.0, 1.0))
        os.write(w, b",")
        await asyncio.wait({task}, timeout=1.5)
        task.cancel()

    try:
        asyncio.run(main())
    finally:
        os.close(w)
        os.close(r)
    assert proc.killed_at is None


def test_serve_flag_parses():
    from moed.front.main import build_parser

    args = build_parser().parse_args(["serve", "--hang-timeout", "42"])
    assert args.hang_timeout == 42.0
