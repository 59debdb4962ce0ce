"""Chunked prefill: a prompt fed to the model a chunk at a time, each chunk a scheduling unit.

mlx-lm's ``generate_step`` and ``BatchGenerator`` prefill a whole prompt in one
call, so a 28k-token prompt held the engine for minutes: other requests could
not decode and a cancel could not land. Here the engine feeds all but a
prompt's last token itself, one chunk per engine step (batch.py runs the
other requests' decode steps in between and rotates among prompts being
prefilled), then hands the filled KV cache and the last token to the solo
loop or the batch, as it does for a prompt-cache hit.

Chunk size is chosen by time, not by a fixed count (``ChunkClock``): each
chunk's seconds are measured, a line ``seconds = fixed + per_token * tokens``
is fitted to the recent ones, and the next chunk is as long as fits the
target (250 ms by default). The fixed part is what a chunk costs whatever its
length, mostly experts read from disk at partial residency; when it alone is
over the target, chunks grow until compute matches it, since shorter ones
would read the same experts again for fewer tokens.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

FIRST_CHUNK = 128  # tokens, before anything was measured
MIN_CHUNK = 16


class ChunkClock:
    """Prompt tokens per chunk so that a chunk takes about ``target_s``."""

    def __init__(self, target_s: float, most: int, samples: int = 8):
        self.target_s = target_s
        self.most = most
        self.recent: deque[tuple[int, float]] = deque(maxlen=samples)

    def record(self, tokens: int, seconds: float) -> None:
        self.recent.append((tokens, seconds))

    def fit(self) -> tuple[float, float]:
        """(fixed seconds, seconds per token) over the recent chunks, both >= 0."""
        n = len(self.recent)
        if n == 0:
            return 0.0, 0.0
        xs = [t for t, _ in self.recent]
        ys = [s for _, s in self.recent]
        mx_, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx_) ** 2 for x in xs)
        per = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
        if per <= 0:  # one length only, or noise (a loaded machine) made longer chunks look cheaper:
            return 0.0, my / mx_  # read it all as per-token cost, the cautious side
        return max(my - per * mx_, 0.0), per

    def size(self) -> int:
        if self.target_s <= 0:
            return self.most
        if not self.recent:
            return min(FIRST_CHUNK, self.most)
        fixed, per = self.fit()
        n = max(self.target_s - fixed, fixed) / per
        # at most twice the longest recent chunk: a fit from short chunks may not hold for long ones
        # (attention grows with the context), so a wrong guess costs at most about twice the target
        n = min(n, 2 * max(t for t, _ in self.recent))
        return int(min(max(n + 1e-6, MIN_CHUNK), self.most))  # (the epsilon: 239.99999 tokens is 240)

    def stats(self) -> dict:
        fixed, per = self.fit()
        return {"target_ms": self.target_s * 1e3, "next_chunk": self.size(), "fixed_ms": fixed * 1e3,
                "per_token_ms": per * 1e3}


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
