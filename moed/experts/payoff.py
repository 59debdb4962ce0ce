"""The prefetcher's choice of how to work on a step, from measured step costs."""

from __future__ import annotations

import statistics
from collections import deque


class Payoff:
    """Which way of working costs least per step, measured rather than guessed.

    Keeps the last ``window`` step costs of each arm, runs the arm with the
    lowest median, and every ``explore_every``-th step runs one of the others
    (in turn), so a change of regime (a slower disk, a larger model, another
    backend) is seen. Each arm is measured ``warmup`` times first, in order."""

    def __init__(self, arms=(True, False), explore_every: int = 16, window: int = 8, warmup: int = 3):
        self.arms = tuple(arms)
        self.costs = {arm: deque(maxlen=window) for arm in self.arms}
        self.steps = dict.fromkeys(self.arms, 0)
        self.explore_every = explore_every
        self.warmup = warmup

    def best(self):
        return min(self.arms, key=lambda arm: statistics.median(self.costs[arm]))

    def choose(self):
        for arm in self.arms:
            if len(self.costs[arm]) < self.warmup:
                return arm
        best = self.best()
        done = sum(self.steps.values())
        if done % self.explore_every:
            return best
        others = [arm for arm in self.arms if arm != best]
        return others[(done // self.explore_every) % len(others)]

    def record(self, arm, seconds: float) -> None:
        self.costs[arm].append(seconds)
        self.steps[arm] += 1

    def stats(self) -> dict:
        measured = all(self.costs[arm] for arm in self.arms)
        return {"arms": {str(arm): {"steps": self.steps[arm],
                                    "median_ms": statistics.median(self.costs[arm]) * 1e3 if self.costs[arm] else None}
                         for arm in self.arms},
                "best": str(self.best()) if measured else None}
