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
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from moed_client import protocol as P

from moed.channel import Cancel, Channel, EngineOptions, Event, Events, Failed, Fatal, Progress, Ready, SendStats, Shutdown, Stats, Submit
from moed.engine.batch import Engine
from moed.engine.loading import load_model, model_info
from moed.engine.lockstep import Turn, rank_figures
from moed.engine.tokenizing import Tokenizing

log = logging.getLogger("moed.engine")

STATS_INTERVAL_S = 1.0
HEARTBEAT_S = 0.5
TOKENIZE_POLL_MS = 5
# A rank waiting in a collective of MLX's ring backend spins a core (measured: 2.8 s of CPU in a 4 s wait),
# so an idle job's followers sleep between turns, and rank 0 polls the front for as long: the next turn
# finds them all there. It is also how long a request waits for an idle job to take it.
IDLE_TURN_MS = 50


def expert_read_failed(e: BaseException) -> bool:
    try:
        from moed.experts.store import StoreError
    except ImportError:
        return False
    return isinstance(e, StoreError)


def peer_lost(e: BaseException) -> bool:
    """An error of MLX's distributed backend (``[ring] connection to a peer was lost``): another rank died."""
    return isinstance(e, RuntimeError) and str(e).startswith(("[ring]", "[jaccl]", "[mpi]", "[nccl]"))


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
                final = {k: v for k, v in ev.items() if k not in ("text", "token_ids", "tool_calls")}
                held.update(final, text=held["text"] + ev["text"], token_ids=held["token_ids"] + ev["token_ids"])
                if ev.get("tool_calls"):
                    held["tool_calls"] = held.get("tool_calls", []) + ev["tool_calls"]
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


def serve(channel: Channel | None, engine: Engine, stream_interval: float, front_alive, lockstep=None, piece=None) -> None:
    """The serve loop. In a distributed job (``lockstep``, moed/engine/lockstep.py) every rank runs it:
    rank 0 decides each turn from the front's messages, the others (``channel`` None) follow."""
    leader = lockstep is None or lockstep.leader
    outbox = Outbox(channel if leader else _Discard(), stream_interval)
    tokenizing = Tokenizing(engine) if leader else None
    try:
        _serve(channel, engine, outbox, tokenizing, front_alive, lockstep, piece)
    finally:
        if tokenizing is not None:
            tokenizing.close()


class _Discard:
    """A follower rank's channel: rank 0 sends the events every rank computed."""

    def send(self, msg) -> None:
        pass


def _serve(channel, engine: Engine, outbox: Outbox, tokenizing, front_alive, lockstep, piece) -> None:
    last_stats = 0.0
    leader = lockstep is None or lockstep.leader
    while True:
        MARK.tick()
        events = []
        turn, gone = None, False
        if not leader and not engine.busy:
            time.sleep(IDLE_TURN_MS / 1000)
        if leader:
            gone = not front_alive()
            if gone:  # the front died without telling us (kill -9): nobody will read our output
                log.error("front process is gone; exiting")
                turn = Turn(shutdown=True)
            else:
                idle_ms = IDLE_TURN_MS if lockstep is not None else int(STATS_INTERVAL_S * 1000)
                turn, last_stats = _decide(channel, engine, tokenizing, events, last_stats, idle_ms)
        if lockstep is not None:
            if leader:  # every rank feeds the chunk length rank 0's clock gives (a single engine's sizes itself)
                turn.chunk = engine.chunk_clock.clock.size()
            turn = lockstep.share(turn)
            engine.chunk_clock.n = turn.chunk
        if gone:
            return
        if turn.shutdown:
            outbox.add(events + engine.cancel_all())
            outbox.flush(time.monotonic(), force=True)
            return
        for msg, tokens in turn.submits:
            try:
                engine.submit(msg, tokens)
            except P.ProtocolError as e:  # the same on every rank: the same tokens, the same checks
                outbox.channel.send(Failed(msg.seq, e.code, e.message))
            except Exception as e:
                log.exception("submit failed")
                outbox.channel.send(Failed(msg.seq, P.ErrorCode.ENGINE_ERROR, f"{type(e).__name__}: {e}"))
                if lockstep is not None:  # this rank may now differ from the others: end the job
                    raise
        for seq in turn.cancels:
            if event := engine.cancel(seq):
                events.append(event)
        if engine.busy:
            try:
                events.extend(engine.step())
            except Exception as e:
                # A failed step leaves its requests' caches half-updated: they fail, the batch starts
                # afresh. An expert that could not be read leaves the model and the expert slots sound
                # (a failed read frees its slot), so the engine goes on; anything else may not have:
                # exit, and the front starts a new engine. So does any failure of a distributed job's rank,
                # which the other ranks did not share.
                log.exception("decode step failed")
                if lockstep is not None and peer_lost(e):  # the job ends; the front tells clients engine_restarted
                    raise
                outbox.flush(time.monotonic(), force=True)
                for seq in engine.drop_all():
                    outbox.channel.send(Failed(seq, P.ErrorCode.ENGINE_ERROR, f"{type(e).__name__}: {e}"))
                if lockstep is not None or not expert_read_failed(e):
                    raise
        outbox.add(events)
        outbox.flush(time.monotonic(), force=not engine.busy)
        if turn.stats:
            figures = engine.stats() if leader else None
            if lockstep is not None:
                ranks = lockstep.gather(rank_figures(lockstep.rank, engine, lockstep, piece))
                figures = figures and dict(figures, ranks=ranks)
            if leader:
                channel.send(Stats(figures))


def _decide(channel: Channel, engine: Engine, tokenizing: Tokenizing, events: list, last_stats: float, idle_ms: int):
    """Rank 0's (or the only engine's) turn: the front's messages and the prompts tokenized since."""
    turn = Turn()
    # an idle engine has flushed everything; one waiting only for the tokenizer looks again soon
    timeout = 0 if engine.busy else min(TOKENIZE_POLL_MS, idle_ms) if tokenizing.jobs else idle_ms
    MARK.waiting = timeout > 0
    while (msg := channel.poll(timeout)) is not None:
        MARK.waiting = False
        timeout = 0
        if isinstance(msg, Submit):
            tokenizing.add(msg)
        elif isinstance(msg, Cancel):
            event = tokenizing.cancel(msg.seq)
            if event:
                events.append(event)
            else:
                turn.cancels.append(msg.seq)
        elif isinstance(msg, SendStats):
            last_stats = 0.0
        elif isinstance(msg, Shutdown):
            events.extend(e for e in map(tokenizing.cancel, list(tokenizing.jobs)) if e)
            turn.shutdown = True
            return turn, last_stats
    MARK.waiting = False
    for msg, tokens in tokenizing.ready():
        try:
            turn.submits.append((msg, tokens.result()))
        except P.ProtocolError as e:
            channel.send(Failed(msg.seq, e.code, e.message))
        except Exception as e:
            log.exception("submit failed")
            channel.send(Failed(msg.seq, P.ErrorCode.ENGINE_ERROR, f"{type(e).__name__}: {e}"))
    now = time.monotonic()
    if now - last_stats >= STATS_INTERVAL_S:
        turn.stats, last_stats = True, now
    return turn, last_stats


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
        self.gone = False  # a beat could not be written: nobody reads the pipe, the front is gone
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
                mark.gone = True
                return
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def main(argv=None) -> int:
    options, args = EngineOptions.parse(argv)
    from moed.logs import setup_logging

    job = bool(options.hosts) or (options.ranks or 1) > 1
    rank = int(os.environ.get("MLX_RANK", 0)) if job else 0  # known before the ring connects
    setup_logging("engine" if rank == 0 else f"engine-rank{rank}", options.debug)
    if rank == 0:
        fd = os.open(args.heartbeat_path, os.O_WRONLY) if args.heartbeat_path else args.heartbeat_fd
        start_heartbeat(fd)
    lockstep = None
    if job:  # one rank of an mlx.launch job (moed/front/job.py started it)
        import mlx.core as mx

        from moed.engine.lockstep import Lockstep, use_one_stream

        lockstep = Lockstep(mx.distributed.init(strict=True))
    channel = Channel(args.channel) if rank == 0 else None
    try:
        with use_one_stream() if job else nullcontext():
            return _run(options, args, channel, lockstep)
    finally:
        if channel is not None:
            channel.close()


def _run(options: EngineOptions, args, channel: Channel | None, lockstep) -> int:
    path = Path(args.model)
    if channel is not None:
        channel.send(Progress("loading", f"loading {path.name}", 0.0))
    t0 = time.monotonic()
    pieces = []
    split = None
    if lockstep is not None:
        from moed.engine.pipeline import split as split_layers

        split = lambda model: pieces.append(split_layers(model, lockstep.group))  # noqa: E731
        # Every rank must evict the same prompt caches; each measures only its own layers' bytes.
        options = replace(options, prompt_cache_bytes=1 << 62)
    try:
        model, tokenizer, manager = load_model(
            path, capacity=options.capacity, memory_budget=options.memory_budget, approximate=options.approximate,
            prefetch=not options.no_prefetch, split=split)
    except Exception as e:
        log.exception("cannot load %s", path)
        if channel is not None:
            channel.send(Fatal(f"cannot load model {path}: {type(e).__name__}: {e}"))
        return 2
    engine = Engine(model, tokenizer, manager, options)
    info = model_info(path, model, tokenizer)
    if lockstep is not None:
        from moed.engine.lockstep import PinnedChunks, new_seed

        info["ranks"] = lockstep.gather(pieces[0].describe())  # also: every rank has loaded
        new_seed(lockstep)
        # every rank feeds the chunk length rank 0 chose for the turn (not measured at start: a forward
        # on one rank alone would wait for the others)
        engine.chunk_clock = PinnedChunks(engine.chunk_clock)
    else:
        if channel is not None:
            channel.send(Progress("loading", "measuring prefill speed", 1.0))
        try:
            log.info("prefill speed measured at start: %s", engine.calibrate())
        except Exception:  # the clock then starts from its first guess; a model that cannot compute fails its requests
            log.exception("prefill calibration failed")
    log.info("model %s loaded in %.1f s (pid %d)", info["name"], time.monotonic() - t0, os.getpid())
    if channel is not None:
        channel.send(Ready(info, os.getpid()))
    try:
        serve(channel, engine, options.stream_interval, _front_watch(args.front_pid), lockstep,
              pieces[0] if pieces else None)
    finally:
        if manager is not None and hasattr(manager, "close"):
            manager.close()  # stops prefetching, saves the warm-start set
    return 0


def _front_watch(front_pid: int | None):
    """Whether the front still runs: it reads our heartbeats, our parent is (or, for a rank of a job,
    the launcher it started is) still there, and so is ``front_pid`` when given."""
    parent = os.getppid()

    def alive() -> bool:
        if MARK.gone or os.getppid() != parent:
            return False
        if front_pid is None:
            return True
        try:
            os.kill(front_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    return alive


if __name__ == "__main__":
    sys.exit(main())
