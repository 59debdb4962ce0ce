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
chunk is as long as fits the target (250 ms by default). Compute per token is
fitted as a line in the context the chunk attends to (attention grows with
it), so chunks shrink as a long prompt fills the cache instead of
overshooting. The disk part is what a chunk costs whatever its length at
partial residency; when it alone is over half the target, chunks grow until
compute matches it, since shorter ones would read the same experts again for
fewer tokens. An earlier clock fitted ``seconds = fixed + per_token * tokens``
and read the growth of attention as a fixed cost: chunks of 250-370 tokens
near 300 ms, then one of 760 tokens at 1066 ms (bench/results/prefill-cpu.md).

``calibrate`` measures two short forwards when the engine starts, so the first
chunk is sized by this device's speed too, not by a guess.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

FIRST_CHUNK = 128  # tokens, before anything was measured
MIN_CHUNK = 16


@dataclass(frozen=True)
class Sample:
    tokens: int
    seconds: float
    context: int = 0  # tokens in the cache before the chunk
    disk_s: float = 0.0  # of ``seconds``, waiting for experts to load

    @property
    def per_token(self) -> float:
        """Compute seconds per token, at ``middle``."""
        return max(self.seconds - self.disk_s, 0.0) / self.tokens

    @property
    def middle(self) -> float:
        """The mean context the chunk's tokens attend to."""
        return self.context + self.tokens / 2


class ChunkClock:
    """Prompt tokens per chunk so that a chunk takes about ``target_s``."""

    def __init__(self, target_s: float, most: int, samples: int = 8):
        self.target_s = target_s
        self.most = most
        self.recent: deque[Sample] = deque(maxlen=samples)
        self.calibration: dict | None = None  # what ``calibrate`` measured

    def record(self, tokens: int, seconds: float, context: int = 0, disk_s: float = 0.0) -> None:
        if tokens > 0:
            self.recent.append(Sample(tokens, seconds, context, min(disk_s, seconds)))

    def fit(self) -> tuple[float, float]:
        """(seconds per token at context 0, their growth per token of context), both >= 0."""
        n = len(self.recent)
        if n == 0:
            return 0.0, 0.0
        xs = [s.middle for s in self.recent]
        ys = [s.per_token for s in self.recent]
        mx_, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx_) ** 2 for x in xs)
        slope = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
        if slope <= 0:  # one context only, or noise: a flat cost, the mean
            return my, 0.0
        base = my - slope * mx_
        if base < 0:  # the line crosses zero before context 0: a cost proportional to the context
            return 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
        return base, slope

    def disk_s(self) -> float:
        """What the next chunk is expected to wait for expert reads: the recent mean."""
        return sum(s.disk_s for s in self.recent) / len(self.recent) if self.recent else 0.0

    def size(self, context: int = 0) -> int:
        """Tokens for the next chunk, whose first token has ``context`` tokens before it in the cache."""
        if self.target_s <= 0:
            return self.most
        if not self.recent:
            return min(FIRST_CHUNK, self.most)
        base, slope = self.fit()
        disk = self.disk_s()
        budget = max(self.target_s - disk, disk)  # disk over half the target: compute as long as the reads
        # n tokens cost n * (base + slope * (context + n / 2)): the positive root
        lin = base + slope * context
        if slope > 0:
            n = (math.sqrt(lin * lin + 2 * slope * budget) - lin) / slope
        else:
            n = budget / lin if lin > 0 else float(self.most)
        # at most twice the longest recent chunk: a fit from short chunks may not hold for long ones,
        # so a wrong guess costs at most about twice the target
        n = min(n, 2 * max(s.tokens for s in self.recent))
        return int(min(max(n + 1e-6, MIN_CHUNK), self.most))  # (the epsilon: 239.99999 tokens is 240)

    def stats(self) -> dict:
        base, slope = self.fit()
        return {"target_ms": self.target_s * 1e3, "next_chunk": self.size(), "per_token_ms": base * 1e3,
                "per_token_ms_per_1k_context": slope * 1e6, "disk_ms": self.disk_s() * 1e3,
                "last_chunk": ({"tokens": self.recent[-1].tokens, "ms": self.recent[-1].seconds * 1e3,
                                "context": self.recent[-1].context} if self.recent else None),
                "calibration": self.calibration}


def calibrate(model, clock: ChunkClock, vocab: int, new_cache, waited=lambda: 0.0) -> dict:
    """Time two forwards of throwaway tokens into a fresh cache and feed them to ``clock``: the
    first chunk of the first long prompt is then sized by this device, not by ``FIRST_CHUNK``.

    A 4-token forward first, unmeasured (MLX's first call pays for setup); then ``MIN_CHUNK``
    tokens; then as many as the clock says fit a quarter of the target, so calibrating costs
    about that. ``waited``: the manager's seconds spent waiting for experts so far.
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
    for n in (MIN_CHUNK, None):
        n = n or quarter.size(context)
        seconds, disk = _timed_forward(model, cache, ids(n), waited)
        quarter.record(n, seconds, context, disk)
        clock.record(n, seconds, context, disk)
        context += n
        measured.append({"tokens": n, "ms": round(seconds * 1e3, 3), "disk_ms": round(disk * 1e3, 3)})
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

    def feed(self, model, n: int) -> int:
        """Feed the next ``n`` tokens to the model (evaluated); how many were fed."""
        import mlx.core as mx

        chunk, self.todo = self.todo[:n], self.todo[n:]
        model(mx.array(chunk)[None], cache=self.cache)
        mx.eval([c.state for c in self.cache])
        self.chunks += 1
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
