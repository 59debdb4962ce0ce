"""The ranks of a distributed engine in lockstep: rank 0 decides each turn, every rank applies it.

Only rank 0 talks to the front (moed/engine/loop.py). Each turn of its serve loop
it packs what it decided (``Turn``: requests with their tokens, cancels, shutdown,
whether to gather stats, the prefill chunk length) and an all_sum of a byte buffer
(the other ranks add zeros) hands it to every rank; every rank then applies the
same decisions and runs the same engine step, so the pipeline's transfers meet
(moed/engine/pipeline.py). The transport is mx.distributed's own.

Collectives must reach the backend in the same order on every rank, and work on
two streams runs in no set order: mlx-lm decodes on its ``generation_stream``
(queued ahead with async_eval), so a job's rank runs everything on that stream
(``use_one_stream``), the turns too.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import mlx.core as mx
import msgpack
import numpy as np

from moed.channel import decode, encode

HEADER = 256  # one all_sum of this many bytes per turn; a longer turn takes a second one


@dataclass
class Turn:
    """What every rank does this turn of the serve loop, as rank 0 decided it."""

    submits: list = field(default_factory=list)  # (Submit, prompt tokens)
    cancels: list = field(default_factory=list)  # seqs
    shutdown: bool = False
    stats: bool = False
    chunk: int = 0  # rank 0's prefill chunk length this turn (its ChunkClock measures time, which differs by rank)

    def pack(self) -> bytes:
        return msgpack.packb([[[encode(m), t] for m, t in self.submits], self.cancels, self.shutdown, self.stats,
                              self.chunk])

    @classmethod
    def unpack(cls, data: bytes) -> Turn:
        submits, cancels, shutdown, stats, chunk = msgpack.unpackb(data)
        return cls([(decode(m), t) for m, t in submits], cancels, shutdown, stats, chunk)


class Lockstep:
    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.bytes_sent = 0  # this rank's share of the ring's traffic for turns and stats

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, turn: Turn | None) -> Turn:
        """Rank 0's ``turn`` on every rank (the others pass None)."""
        packed = turn.pack() if self.leader else b""
        head = np.zeros(HEADER, np.uint8)
        if self.leader:
            head[:4] = np.frombuffer(len(packed).to_bytes(4, "little"), np.uint8)
            first = packed[:HEADER - 4]
            head[4:4 + len(first)] = np.frombuffer(first, np.uint8)
        got = self._sum(head)
        n = int.from_bytes(got[:4], "little")
        if n <= HEADER - 4:
            return Turn.unpack(got[4:4 + n])
        rest = np.zeros(n - (HEADER - 4), np.uint8)
        if self.leader:
            rest[:] = np.frombuffer(packed[HEADER - 4:], np.uint8)
        return Turn.unpack(got[4:] + self._sum(rest))

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (msgpack-able), in rank order, on every rank."""
        data = msgpack.packb(obj)
        sizes = self._gather(np.array([len(data)], np.int32))
        most = int(sizes.max())
        buf = np.zeros(most, np.uint8)
        buf[:len(data)] = np.frombuffer(data, np.uint8)
        every = self._gather(buf)
        return [msgpack.unpackb(every[r * most:r * most + int(n)].tobytes()) for r, n in enumerate(sizes)]

    def _sum(self, buf: np.ndarray) -> bytes:
        out = mx.distributed.all_sum(mx.array(buf), group=self.group, stream=stream())
        self.bytes_sent += 2 * (self.size - 1) * buf.nbytes // self.size  # a ring all_sum's share per rank
        return bytes(np.array(out))

    def _gather(self, buf: np.ndarray) -> np.ndarray:
        out = mx.distributed.all_gather(mx.array(buf), group=self.group, stream=stream())
        self.bytes_sent += (self.size - 1) * buf.nbytes
        return np.array(out)


def stream():
    from mlx_lm.generate import generation_stream

    return generation_stream


def use_one_stream():
    """A context in which everything this rank computes (loading, prefill chunks, expert readbacks,
    turns) goes on mlx-lm's generation stream, where its decode loops queue their steps: one order
    of collectives."""
    return mx.stream(stream())


class PinnedChunks:
    """A follower rank's ChunkClock: the chunk length rank 0 chose for this turn."""

    def __init__(self, clock):
        self.clock, self.n = clock, clock.size()

    def size(self, context: int = 0) -> int:
        return self.n

    def record(self, tokens: int, seconds: float, context: int = 0, disk_s: float = 0.0) -> None:
        self.clock.record(tokens, seconds, context, disk_s)

    def stats(self) -> dict:
        return self.clock.stats()


def rank_figures(rank: int, engine, lockstep: Lockstep, piece) -> dict:
    """One rank's line in ``status``: host, layers, memory, expert hit rate, bytes sent per token."""
    from moed.platform import process_rss_bytes

    experts = engine.manager.stats() if engine.manager is not None else None
    traffic = piece.traffic
    sent = traffic.bytes_sent + lockstep.bytes_sent
    tokens = engine.tokens_generated
    return {
        "rank": rank,
        "host": socket.gethostname(),
        "layers": [piece.start, piece.end],
        "split": "generic" if piece.generic else "mlx-lm pipeline()",
        "rss_bytes": process_rss_bytes(),
        "mlx_active_bytes": mx.get_active_memory(),
        "budget_bytes": experts["memory"]["budget_bytes"] if experts else None,
        "resident": [experts["resident"], experts["slots"]] if experts else None,
        "hit_rate": experts.get("hit_rate") if experts else None,
        "pipeline_bytes": traffic.bytes_sent,
        "lockstep_bytes": lockstep.bytes_sent,
        "activation_bytes": traffic.activation_bytes,
        "tokens_generated": tokens,
        "bytes_per_token": sent / tokens if tokens else None,
    }


def new_seed(lockstep: Lockstep) -> None:
    """The same random state on every rank (rank 0's draw), so unseeded sampling draws the same tokens."""
    draw = int(np.random.default_rng().integers(1 << 31)) if lockstep.leader else 0
    mx.random.seed(lockstep.gather(draw)[0])

