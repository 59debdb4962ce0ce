"""Prefetch: predict the experts of upcoming layers and stream them from SSD
into free or evictable slots before the engine asks for them.

Threading model
---------------
* The **engine thread** runs forwards. It alone decides which slot a load goes
  to (``LayerCache.reserve``), makes a filled slot visible to the model
  (``install``), and reads the caches' maps. It installs only between forwards
  or, in sync mode, before the graph of the layer being computed is built, so
  the model never sees a slot change under it.
* An **I/O pool** (``workers`` threads) runs ``LayerCache.fill``: preads of one
  expert into a reserved slot's memory. A reserved slot is mapped by no expert,
  so the model cannot read it while it is being written; a failed read leaves
  it free (``release``), never half-written and in use.
* Evicting for a prefetch never touches an expert the forward in progress uses:
  sync mode marks each layer's experts ``in_use`` before its compute; in a
  speculative pass the choice is not known yet, but an expert evicted during
  the pass is seen as missing by the residency check afterwards, which forces
  the exact redo (see manager.py), so a stale read can never reach the output.

Predictors (each scored in ``stats()`` on a sample of decode steps, whether or not it drives loads)
--------------------------------------------------------------------------------------------------
* ``gate+1``/``gate+2``: the router of layer l+1 (l+2) applied to layer l's
  expert input, carried over from layer l's pre-expert norm to l+1's
  (speculative gating); linear routers name 2 x top-k guesses. Drives loads in
  sync mode in the "ahead" arm (below).
* ``runahead``: a speculative pass's own choices for the layers after its first
  miss. Drives loads for the redo (all arms but "off").
* ``persistence``: the previous forward's experts at the same layer.
* ``gate+1|persistence``: both together, the set the prefetcher actually
  works from (gate+1 names what to load, persistence what to keep).
* ``profile``: the most active experts of a saved profile (see profile.py);
  drives pinning and the initial fill.

Cost control
------------
What the prefetcher does on every forward is kept to a few array operations:
the predictors are scored (and the speculative pass's gate+1 guesses traced)
on one decode step in ``sample_every`` only. Loading is what can cost more
than it saves (guesses evict experts, the pool's reads compete with compute,
and on an H100 loads from the pool measured slower than the engine thread's
own), so each decode step runs one of three arms (``ARMS``: off, runahead,
ahead) picked by a ``Payoff`` meter from the measured cost of recent steps
that missed, the losing arms retried in turn every ``explore_every``-th step.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from .cache import LayerCache
from .families import find_pre_expert_norm, find_router
from .payoff import Payoff

log = logging.getLogger("moed.experts.prefetch")

PREDICTORS = ("gate+1", "gate+2", "runahead", "persistence", "profile", "gate+1|persistence")


class _Score:
    __slots__ = ("predicted", "needed", "hit")

    def __init__(self):
        self.predicted = self.needed = self.hit = 0

    def add(self, predicted: set, needed: np.ndarray) -> None:
        self.predicted += len(predicted)
        self.needed += len(needed)
        self.hit += sum(1 for e in needed.tolist() if e in predicted)

    def as_dict(self) -> dict:
        return {"recall": self.hit / self.needed if self.needed else None,
                "precision": self.hit / self.predicted if self.predicted else None,
                "needed": self.needed, "predicted": self.predicted}


# How the prefetcher works on a decode step, from least to most: "off" does what
# on-demand loading does (misses are read when needed, one after another);
# "runahead" reads a speculative pass's misses in parallel before the redo;
# "ahead" also loads the gate guesses for the next layers in sync mode.
ARMS = ("off", "runahead", "ahead")


class Prefetcher:
    def __init__(self, manager, *, workers: int = 4, depth: int = 2, width: int = 2, load_ahead: bool = True,
                 sample_every: int = 8):
        self.manager = manager
        self.caches: list[LayerCache] = manager.caches
        self.routers = [find_router(s.block, s.num_experts) for s in manager.sites]
        self.norms = [find_pre_expert_norm(s) for s in manager.sites]
        self.width = width
        self.depth = depth
        self.sample_every = sample_every
        self.sampled = False  # this forward scores the predictors (a decode step, one in sample_every)
        # load_ahead=False: no "ahead" arm, gate guesses are scored but never loaded
        self.meter = Payoff(ARMS if load_ahead else ARMS[:2])
        self.arm = self.meter.arms[-1]  # this forward's arm
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="moed-prefetch")
        self.workers = workers
        self.inflight: dict[tuple[int, int], tuple[int, Future]] = {}  # (layer position, expert) -> (slot, load)
        self.prior: list[set] = [set() for _ in self.caches]  # profile predictor
        self.previous: list = [None for _ in self.caches]  # persistence predictor: last forward's experts
        self._current: list = [None for _ in self.caches]
        self._predicted: dict[tuple[str, int], set] = {}  # (predictor, layer position) -> experts, this forward
        self._traces: list[tuple[int, mx.array]] = []
        self.scores = {name: _Score() for name in PREDICTORS}
        self.needed = self.resident_at_need = self.inflight_at_need = 0
        self.requested = self.completed = self.failed = self.dropped = 0
        self.errors: list[str] = []
        self._busy_lock = threading.Lock()
        self._active = 0
        self._busy_since = 0.0
        self.busy_time = 0.0
        self.streamed_bytes = 0
        self._closed = False

    # -- predictions -------------------------------------------------------
    def _route(self, position: int, x, k: int, source: int | None = None):
        """The experts layer ``position``'s router would pick for ``x``, the
        input of layer ``source``'s experts: ``x`` is first moved from that
        layer's pre-expert norm to this one's (an RMSNorm is scale-free, so
        rms_norm(x / w_source) * w_position is what this layer's norm makes of
        the same residual). Linear routers name ``width`` x top-k guesses."""
        router = self.routers[position]
        if router is None:
            return None
        if source is not None and self.norms[source] is not None and self.norms[position] is not None:
            src, dst = self.norms[source], self.norms[position]
            w = src.weight
            x = mx.fast.rms_norm(x / mx.where(mx.abs(w) < 1e-6, 1.0, w), dst.weight, dst.eps)
        out = router(x)
        if isinstance(out, tuple):  # MoEGate: (indices, scores), its own top-k
            return out[0]
        n = min(k * self.width, out.shape[-1])
        return mx.argpartition(-out, kth=n - 1, axis=-1)[..., :n]

    def predict(self, position: int, x, indices) -> list[tuple[int, mx.array, int]]:
        """Lazy guesses ``(layer position, expert ids, steps ahead)`` of the next
        ``depth`` layers from this layer's input."""
        k = indices.shape[-1]
        out = []
        for step in range(1, self.depth + 1):
            j = position + step
            if j >= len(self.caches):
                break
            guess = self._route(j, x, k, source=position)
            if guess is not None:
                out.append((j, guess, step))
        return out

    def trace(self, position: int, x, indices) -> None:
        """In a speculative pass: the gate+1 guess for the next layer, for the
        stats only, so on sampled steps only, to keep the extra router work off
        most tokens."""
        if not self.sampled:
            return
        j = position + 1
        if j < len(self.caches) and self.routers[j] is not None:
            self._traces.append((j, self._route(j, x, indices.shape[-1], source=position)))

    def take_traces(self) -> list[tuple[int, mx.array]]:
        """This pass's gate+1 guesses (layer position, lazy ids), handed to its check."""
        traces, self._traces = self._traces, []
        return traces

    def wants_ahead(self) -> bool:
        """Whether sync mode should compute gate guesses this forward: to load
        them, or to score them on a sampled step."""
        return self.arm == "ahead" or self.sampled

    def request_ahead(self, ahead) -> None:
        for j, guess, step in ahead:
            experts = np.unique(np.array(guess))
            if self.sampled:
                key = (f"gate+{step}", j)
                self._predicted[key] = set(experts.tolist()) | self._predicted.get(key, set())
            if self.arm == "ahead":
                self.request(j, experts)

    # -- loads -------------------------------------------------------------
    def request(self, position: int, experts, protect=()) -> int:
        """Start loads of those ``experts`` that are neither resident nor in flight."""
        cache = self.caches[position]
        started = 0
        keep = set(protect) | set(np.asarray(experts, dtype=np.int64).tolist())  # once: a chunk asks for hundreds
        for e in cache.missing(experts).tolist():
            if (position, e) in self.inflight:
                continue
            slot = cache.reserve(keep)
            if slot is None:
                self.dropped += 1
                continue
            self.inflight[(position, e)] = (slot, self.pool.submit(self._fill, cache, slot, e))
            self.requested += 1
            started += 1
        return started

    def _fill(self, cache: LayerCache, slot: int, expert: int) -> int:
        """One load in the pool; also times the pool's busy wall time, so
        streaming throughput counts the threads' overlap."""
        with self._busy_lock:
            if self._active == 0:
                self._busy_since = time.perf_counter()
            self._active += 1
        try:
            n = cache.fill(slot, expert)
            with self._busy_lock:
                self.streamed_bytes += n
            return n
        finally:
            with self._busy_lock:
                self._active -= 1
                if self._active == 0:
                    self.busy_time += time.perf_counter() - self._busy_since

    def _settle(self, key, wait: bool) -> bool:
        """Install (or release, on failure) one in-flight load. Engine thread."""
        slot, fut = self.inflight[key]
        if not wait and not fut.done():
            return False
        del self.inflight[key]
        cache = self.caches[key[0]]
        try:
            fut.result()
        except Exception as e:  # the slot stays free; whoever needs this expert loads it again and sees the error
            cache.release(slot)
            self.failed += 1
            self.errors = (self.errors + [str(e)])[-5:]
            log.warning("prefetch of layer %d expert %d failed: %s", cache.layer, key[1], e)
            return True
        cache.install(slot, key[1], prefetched=True)
        self.completed += 1
        return True

    def install_ready(self) -> None:
        for key in [k for k, (_, f) in self.inflight.items() if f.done()]:
            self._settle(key, wait=False)

    def wait_or_load(self, position: int, cache: LayerCache, missing, protect) -> None:
        """Block until every expert in ``missing`` is resident (the exact path)."""
        self.install_ready()
        if self.arm == "off":  # as on-demand loading does, once this layer's earlier loads are in
            self.settle_layer(position)
            cache.ensure(cache.missing(missing), protect=protect)
            return
        todo = [e for e in cache.missing(missing).tolist() if (position, e) not in self.inflight]
        # The engine thread reads one of them itself while the pool reads the rest: it
        # would only wait otherwise, and a pool round trip costs more than a small read.
        mine = cache.reserve(protect) if todo else None
        self.request(position, todo[1:] if mine is not None else todo, protect)
        if mine is not None:
            try:
                cache.fill(mine, todo[0])
            except BaseException:
                cache.release(mine)
                raise
            cache.install(mine, todo[0])
        for e in missing.tolist():
            if (position, e) in self.inflight:
                self._settle((position, e), wait=True)
        still = cache.missing(missing)
        if len(still):  # a prefetch failed or no slot could be had: load here, errors raise to the caller
            self.settle_layer(position)  # loads of guesses hold slots this layer needs now
            cache.ensure(still, protect=protect)

    def settle_layer(self, position: int) -> None:
        """Wait for every load in flight for layer ``position`` and install it."""
        for key in [k for k in self.inflight if k[0] == position]:
            self._settle(key, wait=True)

    # -- bookkeeping from the manager ----------------------------------------
    def note_need(self, position: int, cache: LayerCache, needed: np.ndarray, sampled: bool | None = None) -> None:
        """``sampled``: whether the forward that routed this scores the predictors
        (default: this forward's; a deferred pass is checked in the next one)."""
        sampled = self.sampled if sampled is None else sampled
        resident = int((cache.slot_of[needed] >= 0).sum())
        self.needed += len(needed)
        self.resident_at_need += resident
        if resident < len(needed):
            self.inflight_at_need += sum(1 for e in needed.tolist()
                                         if cache.slot_of[e] < 0 and (position, e) in self.inflight)
        previous, self._current[position] = self.previous[position], needed
        if not sampled:  # predictors are scored on a sample of decode steps
            return
        for name in ("gate+1", "gate+2", "runahead"):
            guess = self._predicted.get((name, position))
            if guess is not None:
                self.scores[name].add(guess, needed)
        if previous is not None:
            previous = set(previous.tolist())
            self.scores["persistence"].add(previous, needed)
            gate = self._predicted.get(("gate+1", position))
            if gate is not None:  # what to load (gate) plus what to keep (persistence)
                self.scores["gate+1|persistence"].add(gate | previous, needed)
        if self.prior[position]:
            self.scores["profile"].add(self.prior[position], needed)

    def absorb_traces(self, traces) -> None:
        """When a speculative pass is checked, before its needs are noted: its
        gate+1 guesses become the predictions to score."""
        for j, guess in traces:
            self._predicted[("gate+1", j)] = set(np.unique(np.array(guess)).tolist())

    def after_pass(self, seen, first) -> None:
        """On a speculative pass's miss, start loads for every layer's misses
        (runahead) before the redo."""
        if first is None:
            return
        for position, cache, needed, missing, _ in seen:
            if position >= first:
                self._predicted[("runahead", position)] = set(needed.tolist())
                if len(missing) and self.arm != "off":
                    self.request(position, missing, protect=needed)

    def begin_forward(self, decode: bool) -> None:
        """Engine thread, before a forward: install finished loads, pick this
        forward's arm, decide whether it is sampled. Prefill runs the fullest arm."""
        self.install_ready()
        self.sampled = decode and self.manager.decode_steps % self.sample_every == 0
        self.arm = self.meter.choose() if decode else self.meter.arms[-1]

    def end_forward(self, decode: bool = False, missed: bool = False, seconds: float = 0.0) -> None:
        """After a forward: persistence moves on. The cost of a decode step
        that missed (a redo or a sync-mode step) goes to the meter: steps where
        every expert was resident cost the same under every arm and would only
        hide the difference. Sampled steps carry the predictors' scoring: left out."""
        self._traces = []
        self._predicted.clear()
        for i, cur in enumerate(self._current):
            if cur is not None:
                self.previous[i] = cur
                self._current[i] = None
        if decode and missed and not self.sampled:
            self.meter.record(self.arm, seconds)

    # -- reporting / shutdown -----------------------------------------------
    def stats(self) -> dict:
        used = sum(c.prefetch_used for c in self.caches)
        wasted = sum(c.prefetch_wasted for c in self.caches)
        return {
            "workers": self.workers,
            "depth": self.depth,
            "recall": (self.resident_at_need + self.inflight_at_need) / self.needed if self.needed else None,
            "resident_at_need": self.resident_at_need,
            "inflight_at_need": self.inflight_at_need,
            "needed": self.needed,
            "precision": used / (used + wasted) if used + wasted else None,
            "prefetched_used": used,
            "prefetched_evicted_unused": wasted,
            "requested": self.requested,
            "completed": self.completed,
            "failed": self.failed,
            "no_slot": self.dropped,
            "in_flight": len(self.inflight),
            "streamed_bytes": self.streamed_bytes,
            "stream_gb_s": self.streamed_bytes / self.busy_time / 1e9 if self.busy_time else None,
            "errors": self.errors,
            "predictors": {name: s.as_dict() for name, s in self.scores.items()},
            "sample_every": self.sample_every,
            "arm": self.arm,
            "payoff": self.meter.stats(),
        }

    def close(self, timeout: float = 1.0) -> None:
        if self._closed:
            return
        self._closed = True
        t0 = time.monotonic()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for key in list(self.inflight):
            slot, fut = self.inflight.pop(key)
            try:
                fut.result(timeout=max(0.0, timeout - (time.monotonic() - t0)))
            except Exception:
                pass
            self.caches[key[0]].release(slot)
        for t in list(getattr(self.pool, "_threads", ())):
            t.join(max(0.0, timeout - (time.monotonic() - t0)))


def attach_prefetcher(manager, *, workers: int = 4, depth: int = 2) -> Prefetcher:
    manager.prefetcher = Prefetcher(manager, workers=workers, depth=depth)
    return manager.prefetcher
