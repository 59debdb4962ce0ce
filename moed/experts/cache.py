"""Per-layer expert caches: a fixed number of slots held in stacked tensors.

Each MoE layer owns, for every expert tensor (``gate_proj.weight``,
``gate_proj.scales``...), one stacked array of ``capacity`` slots. The model's
own switch layers compute over these arrays with slot ids in place of expert
ids. A load reads an expert's bytes from disk straight into its slot's memory
(a writable byte view of the array), so a slot write costs one expert, never a
copy of the stack.

Slot states: free (``expert_in[s] == -1``), loading (reserved by a reader,
invisible to the model), resident (mapped in ``slot_of``). A slot only becomes
resident after every byte of the expert arrived; a failed read leaves it free.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .store import Extent, Reader, StoreError


@dataclass(frozen=True)
class Part:
    """One expert tensor of a layer: ``name`` like ``gate_proj.scales``."""

    name: str
    shape: tuple  # per expert
    dtype: mx.Dtype
    extents: tuple[Extent, ...]  # one per expert

    @property
    def nbytes(self) -> int:
        return self.extents[0].nbytes


class LRU:
    """Evict the expert used longest ago."""

    name = "lru"

    def __init__(self, num_experts: int):
        self.last = np.zeros(num_experts, np.float64)
        self.clock = 0

    def touch(self, experts) -> None:
        self.clock += 1
        self.last[experts] = self.clock

    def scores(self) -> np.ndarray:
        return self.last

    def seed(self, prior: np.ndarray) -> None:
        """Start from a prior ranking in [0, 1] (a profile): higher lasts longer."""
        self.last = np.asarray(prior, np.float64).copy()


class FrequencyRecency:
    """Evict the expert with the least decayed use count (frequency x recency).

    Each use adds 1 to an expert's score; all scores decay by ``decay`` per
    step, so an expert used often long ago loses to one used a few times lately.
    """

    name = "lfru"

    def __init__(self, num_experts: int, decay: float = 0.9):
        self.score = np.zeros(num_experts, np.float64)
        self.stamp = np.zeros(num_experts, np.int64)
        self.decay = decay
        self.clock = 0

    def touch(self, experts) -> None:
        self.clock += 1
        experts = np.asarray(experts, dtype=np.int64)
        # decayed to the new clock, the touched experts only: scores() would price every expert per touch
        self.score[experts] = self.score[experts] * self.decay ** (self.clock - self.stamp[experts]) + 1.0
        self.stamp[experts] = self.clock

    def scores(self) -> np.ndarray:
        return self.score * self.decay ** (self.clock - self.stamp)

    def seed(self, prior: np.ndarray) -> None:
        """Start from a prior ranking in [0, 1] (a profile), worth a few recent uses."""
        self.score = 3.0 * np.asarray(prior, np.float64)
        self.stamp[:] = self.clock


POLICIES = {"lru": LRU, "lfru": FrequencyRecency}


class LayerCache:
    """The resident experts of one MoE layer and the bookkeeping around them."""

    def __init__(self, layer: int, num_experts: int, capacity: int, parts: list[Part], reader: Reader, policy: str = "lfru"):
        if not 1 <= capacity <= num_experts:
            raise ValueError(f"capacity {capacity} must be within 1..{num_experts}")
        self.layer = layer
        self.num_experts = num_experts
        self.capacity = capacity
        self.parts = parts
        self.reader = reader
        self.policy = POLICIES[policy](num_experts)
        self.slots = {p.name: mx.zeros((capacity, *p.shape), dtype=p.dtype) for p in parts}
        mx.eval(list(self.slots.values()))
        self._views = {n: np.frombuffer(a, dtype=np.uint8).reshape(capacity, -1) for n, a in self.slots.items()}
        self.slot_of = np.full(num_experts, -1, np.int32)
        self._identity = np.arange(num_experts, dtype=np.int32)
        self.expert_in = np.full(capacity, -1, np.int32)
        self.loading = np.zeros(capacity, bool)
        self.pinned: set[int] = set()
        self.in_use: set[int] = set()  # experts the forward in progress reads: not evictable
        self.lock = threading.RLock()
        self._lut = None
        self.fresh = np.zeros(num_experts, bool)  # prefetched, not used yet
        self.activations = np.zeros(num_experts, np.int64)  # routed (token, k) pairs per expert
        self.prefetch_used = self.prefetch_wasted = 0
        self.hits = self.misses = self.bytes_read = self.loads = self.evictions = 0
        self.load_time = 0.0

    # -- views the model reads -------------------------------------------
    @property
    def expert_bytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def complete(self) -> bool:
        """Every expert resident in the slot of its own id: the model may use expert
        ids as slot ids, with no lookup and no residency check."""
        return self.capacity == self.num_experts and bool((self.slot_of == self._identity).all())

    def lut(self) -> mx.array:
        """expert id -> slot id as a device array (missing experts map to slot 0)."""
        with self.lock:
            if self._lut is None:
                self._lut = mx.array(np.maximum(self.slot_of, 0))
            return self._lut

    def present_lut(self) -> mx.array:
        with self.lock:
            return mx.array(self.slot_of >= 0)

    def resident(self) -> np.ndarray:
        return np.flatnonzero(self.slot_of >= 0)

    def missing(self, experts) -> np.ndarray:
        experts = np.asarray(experts, dtype=np.int64)
        return experts[self.slot_of[experts] < 0]

    # -- accounting --------------------------------------------------------
    def record(self, experts, count_stats: bool = True) -> None:
        """Note one forward's use of ``experts`` (distinct ids) for stats and eviction."""
        experts = np.asarray(experts, dtype=np.int64)
        if count_stats:
            miss = int((self.slot_of[experts] < 0).sum())
            self.misses += miss
            self.hits += len(experts) - miss
        used = experts[self.fresh[experts] & (self.slot_of[experts] >= 0)]
        self.prefetch_used += len(used)
        self.fresh[used] = False
        self.policy.touch(experts)

    def count(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids).ravel()
        if ids.size <= self.num_experts // 8:  # a decode step's top-k: a scatter beats a full-length bincount
            np.add.at(self.activations, ids, 1)
        else:
            self.activations += np.bincount(ids, minlength=self.num_experts)[: self.num_experts]

    # -- loading -----------------------------------------------------------
    def reserve(self, protect=()) -> int | None:
        """Take a slot for loading: a free one, else evict the lowest-scored
        unpinned expert outside ``protect``. Returns None when none can be had."""
        with self.lock:
            free = np.flatnonzero((self.expert_in < 0) & ~self.loading)
            if len(free):
                s = int(free[0])
            else:
                cand = self.expert_in.copy()
                blocked = list(self.pinned | self.in_use) + [int(e) for e in protect]
                ok = (cand >= 0) & ~self.loading & ~np.isin(cand, blocked)
                if not ok.any():
                    return None
                scores = np.where(ok, self.policy.scores()[np.maximum(cand, 0)], np.inf)
                s = int(np.argmin(scores))
                if self.fresh[cand[s]]:
                    self.prefetch_wasted += 1
                    self.fresh[cand[s]] = False
                self.slot_of[cand[s]] = -1
                self.expert_in[s] = -1
                self._lut = None
                self.evictions += 1
            self.loading[s] = True
            return s

    def fill(self, slot: int, expert: int) -> int:
        """Read ``expert`` into reserved ``slot`` (any thread). Returns bytes read."""
        n, seconds = 0, 0.0
        for p in self.parts:
            seconds += self.reader.read_into(p.extents[expert], self._views[p.name][slot])
            n += p.nbytes
        with self.lock:
            self.bytes_read += n
            self.load_time += seconds
            self.loads += 1
        return n

    def install(self, slot: int, expert: int, prefetched: bool = False) -> None:
        """Make a filled slot visible to the model. Engine thread, between forwards
        or before the graph of this layer is built."""
        with self.lock:
            self.loading[slot] = False
            if self.slot_of[expert] >= 0:  # already resident (loaded twice): the slot stays free
                return
            self.slot_of[expert] = slot
            self.expert_in[slot] = expert
            self.fresh[expert] = prefetched
            self._lut = None

    def release(self, slot: int) -> None:
        """Give back a reserved slot whose load failed; it stays free."""
        with self.lock:
            self.loading[slot] = False

    def ensure(self, experts, protect=None) -> int:
        """Make ``experts`` resident, loading misses synchronously. Returns bytes read."""
        protect = set(int(e) for e in (experts if protect is None else protect))
        total = 0
        for e in self.missing(experts):
            e = int(e)
            s = self.reserve(protect)
            if s is None:
                raise RuntimeError(f"layer {self.layer}: no evictable slot for expert {e} (capacity {self.capacity})")
            try:
                total += self.fill(s, e)
            except BaseException:
                self.release(s)
                raise
            self.install(s, e)
        return total

    def pin(self, experts) -> None:
        experts = [int(e) for e in experts][: max(self.capacity - 1, 0)]
        self.ensure(experts)
        self.pinned = set(experts)

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {
            "layer": self.layer,
            "capacity": self.capacity,
            "resident": int((self.slot_of >= 0).sum()),
            "pinned": len(self.pinned),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / total if total else None,
            "loads": self.loads,
            "evictions": self.evictions,
            "bytes_read": self.bytes_read,
            "load_time_s": round(self.load_time, 6),
        }


__all__ = ["Part", "LayerCache", "LRU", "FrequencyRecency", "POLICIES", "StoreError"]
