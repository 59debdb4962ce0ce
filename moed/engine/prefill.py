"""Chunked prefill: a prompt fed to the model a chunk at a time, each chunk a scheduling unit.

mlx-lm's ``generate_step`` and ``BatchGenerator`` prefill a whole prompt in one
call, so a 28k-token prompt held the engine for minutes: other requests could
not decode and a cancel could not land. Here the engine feeds all but a
prompt's last token itself, one chunk per engine step (batch.py runs the
other requests' decode steps in between and rotates among prompts being
prefilled), then hands the filled KV cache and the last token to the solo
loop or the batch, as it does for a prompt-cache hit.

Chunk size is chosen by time, not by a fixed count (``ChunkClock``): each
chunk's seconds are measured, split into the time its forward waited for
experts read from disk (the manager's ``wait_time``) and compute, and the next
chunk is as long as fits the target (200 ms by default). Compute per token is
fitted as a line in the context the chunk attends to (attention grows with
it), so chunks shrink as a long prompt fills the cache instead of
overshooting. The disk part is what a chunk costs whatever its length at
partial residency; when it alone is over half the target, chunks grow until
compute matches it, since shorter ones would read the same experts again for
fewer tokens. An earlier clock fitted ``seconds = fixed + per_token * tokens``
and read the growth of attention as a fixed cost: chunks of 250-370 tokens
near 300 ms, then one of 760 tokens at 1066 ms (bench/results/README.md, prefill-gaps).

``calibrate`` measures a few short forwards when the engine starts, so the
first chunk is sized by this device's speed too, not by a guess.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("moed.engine")

FIRST_CHUNK = 128  # tokens, before anything was measured
# The shortest chunk. Not 1: a one-token forward is a decode step to the expert manager. Was 16,
# which at 25% residency on the CPU held every chunk at 1.8-2.5 s for a 250 ms target (a token
# cost 115 ms there, bench/results/README.md, prefill-gaps-qwen3next25)
MIN_CHUNK = 2
CALIBRATION_CHUNK = 16  # calibrate's first measured forward: long enough to time on any device


@dataclass(frozen=True)
class Sample:
    tokens: int
    seconds: float
    context: int = 0  # tokens in the cache before the chunk
    disk_s: float = 0.0  # of ``seconds``, waiting for experts to load

    @property
    def compute_s(self) -> float:
        return max(self.seconds - self.disk_s, 0.0)

    @property
    def attended(self) -> float:
        """Token x context pairs the chunk's attention computes: tokens times their mean context."""
        return self.tokens * (self.context + self.tokens / 2)


# a chunk's compute: fixed + per_token * tokens + per_attended * attended, each coefficient >= 0
TERMS = ("fixed", "per_token", "per_attended")


def _features(s: Sample) -> tuple[float, float, float]:
    return 1.0, float(s.tokens), s.attended


class ChunkClock:
    """Prompt tokens per chunk so that a chunk takes about ``target_s``."""

    def __init__(self, target_s: float, most: int, samples: int = 8):
        self.target_s = target_s
        self.most = most
        self.recent: deque[Sample] = deque(maxlen=samples)
        self.calibration: dict | None = None  # what ``calibrate`` measured
        self.misses: deque[float] = deque(maxlen=4 * samples)  # measured / predicted compute of recent chunks

    def record(self, tokens: int, seconds: float, context: int = 0, disk_s: float = 0.0) -> None:
        if tokens <= 0:
            return
        sample = Sample(tokens, seconds, context, min(disk_s, seconds))
        if len(self.recent) >= 2:
            predicted = float(np.dot(self.fit(), _features(sample)))
            if predicted > 0:
                self.misses.append(sample.compute_s / predicted)
        self.recent.append(sample)

    def margin(self) -> float:
        """How much longer than predicted chunks ran lately (the 98th percentile, 1 to 2): the
        compute budget is divided by it, so that a chunk stays within the target
        on a busy machine (others' processes, a page fault) nearly always, not half of the time.
        On the shared 2-core box, aiming the mean at the target left a p99 of 1.4x it."""
        if len(self.misses) < 4:
            return 1.0
        ordered = sorted(self.misses)
        return min(max(ordered[int(0.98 * (len(ordered) - 1))], 1.0), 2.0)

    def fit(self) -> tuple[float, float, float]:
        """(fixed, per token, per attended pair) seconds of compute, fitted to the recent chunks.

        Least squares over subsets of the three terms whose coefficients come out >= 0 (a
        negative cost is noise), taken in an order of trust: the first that fits within 2% of the
        best residual wins. Per-token terms come first and a fixed cost last, and tokens are never
        free: a clock that meets its target records chunks of the same seconds, which a fixed
        cost alone explains as well as the truth, and a fixed cost alone would ask for chunks of
        any length (the old clock's fault).
        """
        if not self.recent:
            return 0.0, 0.0, 0.0
        X = np.array([_features(s) for s in self.recent])
        y = np.array([s.compute_s for s in self.recent])
        fits = []
        for terms in ((1,), (2,), (1, 2), (0, 1), (0, 2), (0, 1, 2)):
            coef, *_ = np.linalg.lstsq(X[:, terms], y, rcond=None)
            if (coef >= 0).all():
                full = np.zeros(3)
                full[list(terms)] = coef
                fits.append((float(((X @ full - y) ** 2).sum()), full))
        best = min(r for r, _ in fits)  # (1,) alone always fits: its coefficient is a ratio of sums >= 0
        good_enough = best * 1.02 + 1e-6 * float((y ** 2).sum())  # (the second term: exact fits, rounding)
        coef = next(c for r, c in fits if r <= good_enough)
        return tuple(float(c) for c in coef)

    def disk_s(self) -> float:
        """What the next chunk is expected to wait for expert reads: the recent mean."""
        return sum(s.disk_s for s in self.recent) / len(self.recent) if self.recent else 0.0

    def size(self, context: int = 0) -> int:
        """Tokens for the next chunk, whose first token has ``context`` tokens before it in the cache."""
        if self.target_s <= 0:
            return self.most
        if not self.recent:
            return min(FIRST_CHUNK, self.most)
        fixed, per, pair = self.fit()
        disk = self.disk_s()
        # disk over half the target: compute as long as the reads
        budget = max(self.target_s - disk, disk) / self.margin() - fixed
        # n tokens at this context cost per * n + pair * n * (context + n / 2): the positive root
        lin = per + pair * context
        if budget <= 0:
            n = 0.0
        elif pair > 0:
            n = (math.sqrt(lin * lin + 2 * pair * budget) - lin) / pair
        else:
            n = budget / lin if lin > 0 else float(self.most)
        # at most twice the last chunk: a fit from short chunks may not hold for long ones (or from
        # noise), so a wrong guess costs at most about twice the target
        n = min(n, 2 * self.recent[-1].tokens)
        return int(min(max(n + 1e-6, MIN_CHUNK), self.most))  # (the epsilon: 239.99999 tokens is 240)

    def stats(self) -> dict:
        fixed, per, pair = self.fit()
        last = self.recent[-1] if self.recent else None
        return {"target_ms": self.target_s * 1e3, "next_chunk": self.size(), "fixed_ms": fixed * 1e3,
                "per_token_ms": per * 1e3, "per_token_ms_per_1k_context": pair * 1e6, "disk_ms": self.disk_s() * 1e3,
                "margin": self.margin(), "last_chunk": {"tokens": last.tokens, "ms": last.seconds * 1e3, "context": last.context} if last else None,
                "calibration": self.calibration}


def calibrate(model, clock: ChunkClock, vocab: int, new_cache, waited=lambda: 0.0, most_forwards: int = 6) -> dict:
    """Time short forwards of throwaway tokens into a fresh cache and feed them to ``clock``: the
    first chunk of the first long prompt is then sized by this device, not by ``FIRST_CHUNK``.

    A 4-token forward first, unmeasured (MLX's first call pays for setup); then ``CALIBRATION_CHUNK``
    tokens, and forwards as long as the clock says fit a quarter of the target (at most doubling
    each time) until one takes most of that quarter: calibrating costs about half the target.
    ``waited``: the manager's seconds spent waiting for experts so far; those waits are reported,
    not fed to the clock.
    """
    import random

    if clock.target_s <= 0:
        return {}
    rng = random.Random(0)
    cache = new_cache()
    ids = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    _timed_forward(model, cache, ids(4), waited)
    measured, context = [], 4
    quarter = ChunkClock(clock.target_s / 4, clock.most)
    n = min(CALIBRATION_CHUNK, clock.most)
    for _ in range(most_forwards):
        seconds, disk = _timed_forward(model, cache, ids(n), waited)
        # the clock gets the compute only: reads here are the cold start's (empty caches), and taken
        # for a chunk's cost they sized the first real chunk by them (13 tokens in 1.6 s at 50%)
        compute = max(seconds - disk, 0.0)
        quarter.record(n, compute, context)
        clock.record(n, compute, context)
        context += n
        measured.append({"tokens": n, "ms": round(seconds * 1e3, 3), "disk_ms": round(disk * 1e3, 3)})
        if seconds >= 0.8 * quarter.target_s or n >= clock.most:  # near enough: the clock is fed
            break
        n = quarter.size(context)
    clock.calibration = {"forwards": measured, "first_chunk": clock.size()}
    return clock.calibration


def _timed_forward(model, cache, ids: list, waited) -> tuple[float, float]:
    import mlx.core as mx

    w0, t0 = waited(), time.perf_counter()
    model(mx.array(ids)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return time.perf_counter() - t0, waited() - w0


@dataclass
class Prefill:
    """One request's prompt being fed; ``todo`` are the tokens still to feed (the last
    prompt token is never among them: the decode loop feeds it and samples)."""

    active: object  # batch.Active
    insert: dict  # BatchGenerator.insert arguments, as submitted
    cache: list
    tokens: list  # the whole prompt
    todo: list
    chunks: int = 0
    started_at: float = field(default_factory=time.perf_counter)

    def feed(self, model, clock: ChunkClock, waited=lambda: 0.0) -> int:
        """Feed the next chunk, as long as ``clock`` says, to the model (evaluated), and tell the
        clock what it took (``waited``: the manager's seconds waiting for experts); how many were fed."""
        context = len(self.fed())
        n = clock.size(context)
        chunk, self.todo = self.todo[:n], self.todo[n:]
        seconds, disk = _timed_forward(model, self.cache, chunk, waited)
        clock.record(len(chunk), seconds, context, disk)
        self.chunks += 1
        log.debug("seq %d: prefill chunk of %d tokens at %d, %.1f ms (%.1f ms waiting for experts)",
                  self.active.seq, len(chunk), context, seconds * 1e3, disk * 1e3)
        return len(chunk)

    @property
    def done(self) -> bool:
        return not self.todo

    def fed(self) -> list:
        """The prompt tokens already in the cache."""
        return self.tokens[: len(self.tokens) - 1 - len(self.todo)]

    def handoff(self) -> dict:
        """BatchGenerator.insert arguments that continue from the filled cache."""
        return dict(self.insert, prompts=[self.tokens[-1:]], caches=[self.cache], all_tokens=[self.tokens[:-1]])
