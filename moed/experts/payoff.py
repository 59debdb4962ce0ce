"""Which way of working on a step costs least, from measured step costs: the prefetcher's arms
(prefetch.py) and the decode mode, speculative or sync (manager.py)."""

from __future__ import annotations

import statistics
from collections import deque


class Payoff:
    """Which way of working costs least per step, measured rather than guessed.

    Keeps the last ``window`` step costs of each arm, runs the arm that cost
    least, and every ``explore_every``-th step runs one of the others (in turn),
    so a change of regime (a slower disk, a larger model, another backend) is
    seen. Each arm is measured ``warmup`` times first, in order.

    ``per_token``: an arm's cost is its window's seconds over the tokens they
    made (``record(arm, seconds, tokens)``), not the median step: a speculative
    decode step that misses is rare and costs several steps, and a median
    would never see it. ``max_explore_every``: each exploration whose step cost
    more than the best arm does doubles the gap to the next one, up to this;
    one that cost less puts the gap back to ``explore_every``, so the loser's
    stale window is refreshed soon (a loser that costs twice the best is
    retried rarely, not on every 16th step, and a change of regime is still
    seen within one gap)."""

    def __init__(self, arms=(True, False), explore_every: int = 16, window: int = 8, warmup: int = 3,
                 per_token: bool = False, max_explore_every: int | None = None):
        self.arms = tuple(arms)
        self.costs = {arm: deque(maxlen=window) for arm in self.arms}
        self.steps = dict.fromkeys(self.arms, 0)
        self.explore_every = self.gap = explore_every
        self.max_explore_every = max(max_explore_every or explore_every, explore_every)
        self.warmup = warmup
        self.per_token = per_token
        self._next = explore_every  # the step count at which the next exploration runs
        self._turn = 0
        self._explored = None  # (arm explored, the best arm's cost then), until the verdict on it
        self._fresh = [0.0, 0]  # seconds and tokens recorded since the last exploration began

    def cost(self, arm) -> float:
        window = self.costs[arm]
        if self.per_token:
            return sum(s for s, _ in window) / max(sum(t for _, t in window), 1)
        return statistics.median(s for s, _ in window)

    def best(self):
        return min(self.arms, key=self.cost)

    def choose(self):
        for arm in self.arms:
            if len(self.costs[arm]) < self.warmup:
                return arm
        best = self.best()
        done = sum(self.steps.values())
        if self._explored is not None:
            seconds, tokens = self._fresh  # without per_token every step records one token: a mean step
            lost = seconds / max(tokens, 1) >= self._explored[1]
            self.gap = min(self.gap * 2, self.max_explore_every) if lost else self.explore_every
            self._explored = None
        if done < self._next:
            return best
        self._next = done + self.gap
        others = [arm for arm in self.arms if arm != best]
        self._turn += 1
        arm = others[self._turn % len(others)]
        self._explored, self._fresh = (arm, self.cost(best)), [0.0, 0]
        return arm

    def record(self, arm, seconds: float, tokens: int = 1) -> None:
        self.costs[arm].append((seconds, tokens))
        self.steps[arm] += 1
        if self._explored is not None and arm == self._explored[0]:
            self._fresh[0] += seconds
            self._fresh[1] += tokens

    def stats(self) -> dict:
        measured = all(self.costs[arm] for arm in self.arms)
        key = "ms_per_token" if self.per_token else "median_ms"
        return {"arms": {str(arm): {"steps": self.steps[arm],
                                    key: self.cost(arm) * 1e3 if self.costs[arm] else None}
                         for arm in self.arms},
                "best": str(self.best()) if measured else None, "explore_every": self.gap}
