"""The engine process: the only place moed imports MLX.

The front process (moed/front) starts it as ``python -m moed.engine`` with
``EngineOptions`` flags and talks to it over a private ZeroMQ PAIR socket
(moed/channel.py: the messages both ways). This module is the process: its
serve loop, the ``Outbox`` that merges token events, the heartbeat and
``main``; the decoding itself is moed/engine/batch.py.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from moed_client import protocol as P

from moed.channel import Cancel, Channel, EngineOptions, Event, Events, Failed, Fatal, Progress, Ready, SendStats, Shutdown, Stats, Submit
from moed.engine.batch import Engine
from moed.engine.loading import load_model, model_info
from moed.engine.tokenizing import Tokenizing

log = logging.getLogger("moed.engine")

STATS_INTERVAL_S = 1.0
HEARTBEAT_S = 0.5
TOKENIZE_POLL_MS = 5


def expert_read_failed(e: BaseException) -> bool:
    try:
        from moed.experts.store import StoreError
    except ImportError:
        return False
    return isinstance(e, StoreError)


class Outbox:
    """Token events on their way to the front.

    A request's first token and its final event go at once; later tokens wait
    up to ``interval`` seconds and go merged (text joined, ids appended). At
    hundreds of tokens/s that turns one message per token through the front
    and the client into one per few tokens, which on a small machine is CPU
    the engine gets back; a token is never held longer than ``interval``.
    """

    def __init__(self, channel: Channel, interval: float):
        self.channel, self.interval = channel, interval
        self.pending: dict[int, Event] = {}
        self.streaming: set[int] = set()  # requests whose first token went out
        self.urgent = False
        self.last_flush = 0.0

    def add(self, events: list[Event]) -> None:
        for ev in events:
            seq = ev["seq"]
            held = self.pending.get(seq)
            if held is None:
                self.pending[seq] = dict(ev, token_ids=list(ev["token_ids"]))
            else:
                final = {k: v for k, v in ev.items() if k not in ("text", "token_ids")}
                held.update(final, text=held["text"] + ev["text"], token_ids=held["token_ids"] + ev["token_ids"])
            if "finish" in ev or seq not in self.streaming:
                self.urgent = True

    def flush(self, now: float, force: bool = False) -> None:
        if not self.pending or not (force or self.urgent or now - self.last_flush >= self.interval):
            return
        events = list(self.pending.values())
        for ev in events:
            if "finish" in ev:
                self.streaming.discard(ev["seq"])
            elif ev["token_ids"]:
                self.streaming.add(ev["seq"])
        self.channel.send(Events(events, time.monotonic()))
        self.pending, self.urgent, self.last_flush = {}, False, now


def serve(channel: Channel, engine: Engine, stream_interval: float) -> None:
    front = os.getppid()
    outbox = Outbox(channel, stream_interval)
    tokenizing = Tokenizing(engine)
    try:
        _serve(channel, engine, outbox, tokenizing, front)
    finally:
        tokenizing.close()


def _serve(channel: Channel, engine: Engine, outbox: Outbox, tokenizing: Tokenizing, front: int) -> None:
    last_stats = 0.0
    while True:
        MARK.tick()
        if os.getppid() != front:  # the front died without telling us (kill -9): nobody will read our output
            log.error("front process %d is gone; exiting", front)
            return
        # an idle engine has flushed everything; one waiting only for the tokenizer looks again soon
        timeout = 0 if engine.busy else TOKENIZE_POLL_MS if tokenizing.jobs else int(STATS_INTERVAL_S * 1000)
        events = []
        MARK.waiting = timeout > 0
        while (msg := channel.poll(timeout)) is not None:
            MARK.waiting = False
            timeout = 0
            if isinstance(msg, Submit):
                tokenizing.add(msg)
            elif isinstance(msg, Cancel):
                event = tokenizing.cancel(msg.seq) or engine.cancel(msg.seq)
                if event:
                    events.append(event)
            elif isinstance(msg, SendStats):
                last_stats = 0.0
            elif isinstance(msg, Shutdown):
                outbox.add(events + [e for e in map(tokenizing.cancel, list(tokenizing.jobs)) if e] + engine.cancel_all())
                outbox.flush(time.monotonic(), force=True)
                return
        MARK.waiting = False
        for msg, tokens in tokenizing.ready():
            try:
                engine.submit(msg, tokens.result())
            except P.ProtocolError as e:
                channel.send(Failed(msg.seq, e.code, e.message))
            except Exception as e:
                log.exception("submit failed")
                channel.send(Failed(msg.seq, P.ErrorCode.ENGINE_ERROR, f"{type(e).__name__}: {e}"))
        if engine.busy:
            try:
                events.extend(engine.step())
            except Exception as e:
                # A failed step leaves its requests' caches half-updated: they fail, the batch starts
                # afresh. An expert that could not be read leaves the model and the expert slots sound
                # (a failed read frees its slot), so the engine goes on; anything else may not have:
                # exit, and the front starts a new engine.
                log.exception("decode step failed")
                outbox.flush(time.monotonic(), force=True)
                for seq in engine.drop_all():
                    channel.send(Failed(seq, P.ErrorCode.ENGINE_ERROR, f"{type(e).__name__}: {e}"))
                if not expert_read_failed(e):
                    raise
        outbox.add(events)
        now = time.monotonic()
        outbox.flush(now, force=not engine.busy)
        if now - last_stats >= STATS_INTERVAL_S:
            channel.send(Stats(engine.stats()))
            last_stats = now


class ProgressMark:
    """What each heartbeat says besides "alive": whether the serve loop moved on.

    The loop ticks once per turn (a turn runs at most one decode step and one
    prefill chunk) and marks the time it waits for messages. A beat is
    ``PROGRESS`` when it ticked since the last beat or is waiting, else
    ``ALIVE``: a long, legitimate prefill ticks every chunk, a loop stuck
    inside a turn only beats ALIVE, and the front judges how long that may last
    (moed/front/supervisor.py, --hang-timeout)."""

    PROGRESS, ALIVE = b".", b","

    def __init__(self):
        self.turns = 0
        self.waiting = True  # loading the model is not judged by the front (only a ready engine is)
        self._seen = -1

    def tick(self) -> None:
        self.turns += 1

    def beat(self) -> bytes:
        moved, self._seen = self.turns != self._seen, self.turns
        return self.PROGRESS if moved or self.waiting else self.ALIVE


MARK = ProgressMark()


def start_heartbeat(fd: int | None, mark: ProgressMark = MARK) -> None:
    """Beat on the front's pipe from a thread: a stopped or wedged process goes
    quiet, a long decode step does not (MLX releases the GIL while it computes);
    each beat says whether the loop made progress (``ProgressMark``)."""
    if fd is None:
        return

    def beat() -> None:
        while True:
            try:
                os.write(fd, mark.beat())
            except OSError:  # the front is gone
                return
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def main(argv=None) -> int:
    options, args = EngineOptions.parse(argv)
    from moed.logs import setup_logging

    setup_logging("engine", options.debug)
    start_heartbeat(args.heartbeat_fd)
    channel = Channel(args.channel)
    try:
        path = Path(args.model)
        channel.send(Progress("loading", f"loading {path.name}", 0.0))
        t0 = time.monotonic()
        try:
            model, tokenizer, manager = load_model(
                path, capacity=options.capacity, memory_budget=options.memory_budget, approximate=options.approximate,
                prefetch=not options.no_prefetch)
        except Exception as e:
            log.exception("cannot load %s", path)
            channel.send(Fatal(f"cannot load model {path}: {type(e).__name__}: {e}"))
            return 2
        engine = Engine(model, tokenizer, manager, options)
        channel.send(Progress("loading", "measuring prefill speed", 1.0))
        try:
            log.info("prefill speed measured at start: %s", engine.calibrate())
        except Exception:  # the clock then starts from its first guess; a model that cannot compute fails its requests
            log.exception("prefill calibration failed")
        info = model_info(path, model, tokenizer)
        log.info("model %s loaded in %.1f s (pid %d)", info["name"], time.monotonic() - t0, os.getpid())
        channel.send(Ready(info, os.getpid()))
        try:
            serve(channel, engine, options.stream_interval)
        finally:
            if manager is not None and hasattr(manager, "close"):
                manager.close()  # stops prefetching, saves the warm-start set
        return 0
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
