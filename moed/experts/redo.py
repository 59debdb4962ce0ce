"""Redoing a speculative pass that missed, from the layer that missed.

A speculative pass (manager.py) that read a missing expert at layer position
``first`` is exact up to that layer: those outputs are reused. Two ways to
compute the rest:

- ``sync`` (default): every layer from ``first`` on reads its routing back,
  loads what it misses, then computes: one device->host sync per remaining
  layer, each a stall of the whole pipeline (also the fallback below);
- ``resume``: layer ``first``'s experts are loaded first (its routing
  is known exactly: same input as in the pass that missed), then the rest of
  the forward runs speculatively again, with one readback at its end. Another
  miss, at a later layer, resumes from there; after ``RESUME_TRIES`` such passes
  the remaining layers go sync. A miss costs about its load and one pass over
  the remaining layers, not a readback per layer.

Either way every layer's output is computed with all its experts resident and
the check proves it: the output is exactly what stock mlx-lm computes.
On the CPU, resume gave 1.04x sync at 50% residency and 0.61-0.92x at 25%
(a resumed pass that misses again throws its compute away, and a CPU readback
is cheap), so sync stays the default; docs/experts.md has the figures. Where a
readback costs more than a layer's compute (GPUs), resume is the one to measure.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from .deferred import Pass

REDO_MODES = ("sync", "resume")


class Redos:
    """The manager's redo of a pass that missed, and its choice of mode for decode steps and prefill chunks.
    Uses the manager's ``caches``, ``_mode``, ``_records``, ``_outputs``,
    ``_sync_from``, ``_load``, ``_pass``, ``_check``, ``_undo``, ``modes``,
    ``redo_rate`` and counters; ``redo_mode`` picks the scheme above."""

    RESUME_TRIES = 3

    def _init_redos(self, redo_mode: str = "sync") -> None:
        if redo_mode not in REDO_MODES:
            raise ValueError(f"redo_mode must be one of {', '.join(REDO_MODES)}, not {redo_mode!r}")
        self.redo_mode = redo_mode
        self.resumes = self.resume_misses = 0  # resumed passes, and those that missed again
        self.redo_time = 0.0  # seconds spent finishing passes that missed, loads included
        # where that time goes: waiting for loads, sync mode's per-layer readbacks, the last evaluation
        # (the rest is building graphs and bookkeeping)
        self.redo_seconds = {"loads": 0.0, "readbacks": 0.0, "final_eval": 0.0}
        self.readback_time = 0.0  # sync mode's per-layer readbacks, whichever forward ran them
        self.speculate = True  # whether a forward may run speculatively (and so be redone)
        # EWMA share of recent multi-token forwards (prefill chunks) that found an expert missing
        self.chunk_miss_rate = 0.0
        self.chunk_modes = {"speculative": 0, "sync": 0}

    def lockstep(self) -> None:
        """Never redo: on one rank of a distributed job a redo would run the forward's pipeline
        transfers again on this rank alone. Every forward that may miss runs in sync mode."""
        self.decode_mode, self.defer_checks, self.speculate = "sync", False, False

    def _redo_stats(self) -> dict:
        return {"redo_mode": self.redo_mode, "resumes": self.resumes, "resume_misses": self.resume_misses,
                "chunk_modes": dict(self.chunk_modes), "chunk_miss_rate": round(self.chunk_miss_rate, 3),
                # what a miss costs, loads included, and its parts
                "ms_per_redo": self.redo_time / self.redos * 1e3 if self.redos else None,
                "ms_per_redo_parts": {k: v / self.redos * 1e3 for k, v in self.redo_seconds.items()}
                if self.redos else None}

    def _pick_decode_mode(self) -> str:
        """The decode step's mode under ``decode_mode`` "auto": the one that cost less per token
        lately (``modes``, a per-token ``Payoff``), the other retried now and then. Sync mode is
        not tried until a recent step missed: with nothing to load it can only add readbacks.
        Where a readback stalls a GPU, speculative wins and sync is retried ever more rarely;
        on a CPU, where a readback is cheap and a redo costs most of a token, sync wins as soon
        as misses are common."""
        if self.decode_mode != "auto":
            return self.decode_mode
        if self.redo_rate < self.SYNC_AFTER_MISSES and not self.modes.costs["sync"]:
            return "speculative"
        return self.modes.choose()

    # the share of recent decode steps that missed (an EWMA) before sync mode is first tried:
    # one miss lifts it to 0.1
    SYNC_AFTER_MISSES = 0.02

    CHUNK_MISS_WEIGHT = 0.5

    def _pick_chunk_mode(self, ntok: int) -> str:
        """A multi-token forward's mode: speculative only while recent chunks found their experts
        resident and its pairs fit the slots. A speculative chunk that misses is computed twice
        (its redo starts at the first missed layer, at partial residency the first layer): at 25%
        on a Qwen3-Next synth, chunks of 2-12 tokens cost 2x sync mode's per token
        (bench/results/README.md, prefill-gaps-qwen3next25). Sync chunks tell whether they would
        have missed too, so speculation returns by itself once chunks stop missing."""
        fits = ntok * self._top_k <= min(c.capacity for c in self.caches)
        return "speculative" if self.speculate and fits and self.chunk_miss_rate < 0.25 else "sync"

    def _note_chunk(self, used: str, missed: bool) -> None:
        w = self.CHUNK_MISS_WEIGHT  # one miss is enough to go sync; two chunks that hit bring speculation back
        self.chunk_miss_rate = (1 - w) * self.chunk_miss_rate + w * missed
        self.chunk_modes[used] += 1

    @staticmethod
    def _needed_at(p: Pass, order: int, orders: dict) -> np.ndarray:
        """The distinct experts layer position ``order`` routed to in checked pass ``p``."""
        flat = np.array(p.routing)
        start = 0
        for cache, ind, _, _ in p.records:
            if orders[id(cache)] == order:
                return np.unique(flat[start:start + ind.size])
            start += ind.size
        raise KeyError(order)

    def _redo_from(self, call, first: int, outputs: dict, need, kv, ntok: int, inputs):
        """Finish a forward (``call``, fed ``inputs``: ``ntok`` tokens into KV caches
        ``kv``) whose layers before position ``first`` are ``outputs`` (exact), the
        KV caches already trimmed back to before it. ``need``: layer ``first``'s
        experts (None: unknown, redo sync)."""
        wait0, readback0 = self.wait_time, self.readback_time
        try:
            return self._finish_pass(call, first, outputs, need, kv, ntok, inputs)
        finally:
            self.redo_seconds["loads"] += self.wait_time - wait0
            self.redo_seconds["readbacks"] += self.readback_time - readback0

    def _evaluate(self, *arrays) -> None:
        t = time.perf_counter()
        mx.eval(*arrays)
        self.redo_seconds["final_eval"] += time.perf_counter() - t

    def _finish_pass(self, call, first: int, outputs: dict, need, kv, ntok: int, inputs):
        if self.redo_mode == "resume" and need is not None:
            for _ in range(self.RESUME_TRIES):
                cache = self.caches[first]
                if len(np.setdiff1d(need, list(cache.pinned))) > cache.capacity - len(cache.pinned):
                    break  # more experts than slots: sync mode computes that layer in groups
                cache.in_use = set(need.tolist())  # replaces the guesses of the pass that missed
                self._load(cache, need)
                self._mode, self._records, self._outputs, self._sync_from = "resume", [], dict(outputs), first
                out = call()
                this = self._pass(out, kv, ntok, inputs, None)
                self._evaluate(out, this.routing)
                self.resumes += 1
                missed = self._check(this, decode=False)
                if missed is None:
                    return out
                self.resume_misses += 1
                need = self._needed_at(this, missed, self._order)
                outputs, first = self._undo(this, missed), missed
                self.redos -= 1  # _undo counts a redo; this is still the first one
        self._mode, self._records, self._outputs, self._sync_from = "sync", [], dict(outputs), first
        out = call()
        self._evaluate(out)
        self._count_readback()
        return out
