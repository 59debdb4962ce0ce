"""The expert manager: per forward, how a model's lazy experts are found.

Sync scheme (why lazy.py wraps the forward): knowing whether a token's experts
are resident needs the router's choice on the CPU, a device->host readback.
Doing that per layer costs one sync per layer per token. Instead a forward runs
*speculatively* on whatever is resident (missing experts read slot 0) while
recording every layer's expert ids; one evaluation at the end reads them all
back. All resident: done, one readback. Something missing: the KV caches are
trimmed back by the tokens just fed, and the forward is finished from the
first missed layer (redo.py): layers before it return the speculative pass's
outputs (same input, all experts resident), the missed layer's experts are
loaded and the rest runs speculatively again, or in *sync* mode, where each
layer reads back its choice, loads what it misses, then computes. Output is
exact either way.
Long prefill chunks and miss-heavy decoding go to sync mode directly (see
``ExpertManager``); a decode loop may have the check of a decode pass done one
token late (deferred.py). docs/experts.md has the whole scheme.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import mlx.core as mx
import numpy as np

from .approximate import approximate_forward
from .cache import LayerCache
from .deferred import PassChecks, Rollback
from .redo import Redos
from .families import MoESite
from .payoff import Payoff
from .store import Reader
from .streaming import ExpertStream

log = logging.getLogger("moed.experts")


class ExpertManager(PassChecks, Redos):
    """Owns the layer caches and decides, per forward, how experts are found.

    ``decode_mode``: "speculative" (one readback when everything is resident,
    a redo otherwise), "sync" (a readback per MoE layer, never a redo), or
    "auto" (default): whichever has cost less per token lately, redos and
    rollbacks included, the other retried at gaps that grow while it keeps
    losing (redo.py, ``_pick_decode_mode``). Prefill chunks go speculative while recent
    chunks found their experts resident, else sync (redo.py, ``_pick_chunk_mode``).
    """

    EXPLORE_EVERY = 16  # the decode modes' first gap between explorations; it doubles up to 256
    STEP_PARTS = ("prefetch", "build", "route", "eval", "check", "record", "sync")

    def __init__(self, caches: list[LayerCache], sites: list[MoESite], reader: Reader, *, approximate: bool = False,
                 memory_budget: int | None = None, nonexpert_bytes: int = 0, decode_mode: str = "auto",
                 redo_mode: str = "sync"):
        if decode_mode not in ("auto", "speculative", "sync"):
            raise ValueError(f"decode_mode must be auto, speculative or sync, not {decode_mode!r}")
        self.caches = caches
        self.sites = sites
        self.reader = reader
        self.approximate = approximate
        self.memory_budget = memory_budget
        self.nonexpert_bytes = nonexpert_bytes
        self.decode_mode = decode_mode
        self._order = {id(c): i for i, c in enumerate(caches)}
        self._mode = "direct"
        self._sync_from = 0
        self._records: list[tuple] = []  # this pass's (cache, routed ids, slot map, evictions), see route()
        self._outputs: dict[int, mx.array] = {}  # speculative expert outputs, by layer position
        self._lock = threading.RLock()
        self.forwards = self.decode_steps = self.readbacks = self.decode_readbacks = self.redos = 0
        self._step_readbacks = 0
        self.wait_time = 0.0
        self.decode_time = 0.0
        self.decode_wait = 0.0
        self.skipped = 0
        self.fill_bytes: int | None = None  # read before the first decode step: seeding, prefill
        # where decode steps' time goes (seconds, summed): prefetcher hooks, building the
        # speculative pass's graph ("route": the part of it that is moed's own per-layer
        # Python), waiting for its evaluation (the readback), the residency check and
        # bookkeeping (deferred: the previous pass's check, up to queueing this one), recording
        # a deferred pass's use while the next computes, redos and sync-mode steps (loads included)
        self.step_seconds = dict.fromkeys(self.STEP_PARTS, 0.0)
        self.always_check = False  # diagnostics: run the exactness scheme even when every expert is resident
        self._init_redos(redo_mode)  # redo.py: how a pass that missed is finished
        self._init_checks()  # deferred.py: the checks of speculative passes, now or one token late
        # seconds per token of each decode mode lately, a miss's redo and rollback counted in
        self.modes = Payoff(("speculative", "sync"), explore_every=self.EXPLORE_EVERY, window=32, warmup=2,
                            per_token=True, max_explore_every=16 * self.EXPLORE_EVERY)
        self.mode_steps = {"speculative": 0, "sync": 0}
        # EWMA share of decode steps that found an expert missing: a redo in a speculative
        # step, a load at some layer in a sync step (the redo a speculative pass would have needed)
        self.redo_rate = 0.0
        self._step_missed = False
        self._top_k = 1  # experts per token, as last seen
        self.prefetcher = None
        self.stream = ExpertStream()  # expert-major compute of prefill chunks (streaming.py)
        self.collect = False  # count activations even when every expert is resident (profiling)
        self._collected: list = []
        self.model_path = None
        self.warm_start = False
        self.save_warm_start: Callable | None = None  # set by load_model when warm_start is on (profile.py)
        self.seeded: dict = {}
        self.baseline_rss = None  # process memory before the model was loaded
        self._closed = False

    # -- per-layer routing (called from inside the model's forward) ---------
    def route(self, cache: LayerCache, inner, x, indices):
        mode = self._mode
        if mode == "direct" or (cache.complete and not self.always_check):
            if self.collect:
                self._collected.append((cache, indices))
            return inner(x, indices)
        order = self._order[id(cache)]
        if mode in ("sync", "resume") and order < self._sync_from:
            # same input as in the speculative pass, all experts were there: reuse
            return self._outputs[order]
        if mode in ("speculative", "resume"):  # resume: the rest of a redo, speculative again (redo.py)
            t0, slots = time.perf_counter(), cache.lut()[indices]
            t1, y = time.perf_counter(), inner(x, slots)
            t2 = time.perf_counter()
            # the slot map as this pass reads it: the check must judge the pass by it, since loads
            # may be installed (or slots evicted) before a deferred pass is checked
            self._records.append((cache, indices, cache.slot_of.copy(), cache.evictions))
            self._outputs[order] = y
            if self.prefetcher is not None and mode == "speculative":
                self.prefetcher.trace(order, x, indices)
            self._route_s += t1 - t0 + time.perf_counter() - t2  # moed's own Python, apart from the experts' graph
            return y
        if mode == "approximate":
            self._records.append((cache, indices, None, None))
            y = inner(x, cache.lut()[indices])
            keep = cache.present_lut()[indices]
            return y * keep[..., None].astype(y.dtype)
        return self._route_sync(cache, inner, x, indices, order)

    def _route_sync(self, cache: LayerCache, inner, x, indices, order: int):
        self._top_k = indices.shape[-1]
        pf = self.prefetcher
        ahead = pf.predict(order, x, indices) if pf is not None and pf.wants_ahead() else []
        t = time.perf_counter()
        mx.eval(indices, *[guess for _, guess, _ in ahead])
        self.readback_time += time.perf_counter() - t
        self.readbacks += 1
        self._step_readbacks += 1
        ids = np.array(indices)
        needed = np.unique(ids)
        cache.record(needed)
        cache.count(ids)
        cache.in_use = set(needed.tolist())  # replaces the speculative pass's guess
        if self.prefetcher is not None:
            self.prefetcher.note_need(order, cache, needed)
            self.prefetcher.request_ahead(ahead)
        if ids.size > ids.shape[-1] and len(cache.missing(needed)):  # several tokens, misses: expert-major
            if self.prefetcher is not None:  # its loads for this layer land first: none is read twice
                self.prefetcher.settle_layer(order)
            self._step_missed = True
            y, waited = self.stream.compute(cache, inner, x, indices, ids, needed)
            self.wait_time += waited
            return y
        pinned = np.array(sorted(cache.pinned & set(needed.tolist())), dtype=needed.dtype)
        others = np.setdiff1d(needed, pinned)
        room = cache.capacity - len(cache.pinned)  # pinned experts are always resident
        if len(others) <= room:
            self._load(cache, needed)
            return inner(x, cache.lut()[indices])
        # More distinct experts than slots (a decode step of a capacity below top-k): compute in groups
        # that fit, resident ones first, each group evaluated before the next overwrites its slots.
        others = others[np.argsort(cache.slot_of[others] < 0, kind="stable")]
        y = None
        for start in range(0, len(others), room):
            group = others[start:start + room]
            if start == 0:
                group = np.concatenate([pinned, group])
            cache.in_use = set(group.tolist())
            self._load(cache, group)
            mask = mx.array(np.isin(ids, group))
            out = inner(x, mx.where(mask, cache.lut()[indices], 0))
            y = out if y is None else mx.where(mask[..., None], out, y)
            mx.eval(y)
        return y

    def _load(self, cache: LayerCache, experts) -> None:
        missing = cache.missing(experts)
        if not len(missing):
            return
        self._step_missed = True
        t0 = time.perf_counter()
        try:
            if self.prefetcher is not None:
                self.prefetcher.wait_or_load(self._order[id(cache)], cache, missing, protect=experts)
            else:
                cache.ensure(missing, protect=experts)
        finally:
            self.wait_time += time.perf_counter() - t0

    # -- the wrapped forward -------------------------------------------------
    def forward(self, call, args, kwargs):
        with self._lock:
            return self._forward(call, args, kwargs)

    def _forward(self, call, args, kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        cache = kwargs["cache"] if "cache" in kwargs else (args[1] if len(args) > 1 else None)
        ntok = inputs.shape[-1] if inputs is not None and inputs.ndim >= 1 else 0
        decode = ntok == 1
        redo, self._redo = self._redo, None  # armed by a rollback: this forward redoes a deferred pass
        self.forwards += 1
        self.forward_id += 1
        self.decode_steps += decode and redo is None
        self.fill_bytes = self._bytes_read() if decode and self.fill_bytes is None else self.fill_bytes
        self._step_readbacks = 0
        self._step_missed = False
        self._route_s = 0.0
        t0 = time.perf_counter()
        wait0 = self.wait_time
        used = None
        rolled_back = False
        missed = False  # a redo, or a sync-mode step: the steps where how experts are found matters
        parts = dict.fromkeys(self.STEP_PARTS, 0.0)
        if self.prefetcher is not None:
            self.prefetcher.begin_forward(decode)
        t = time.perf_counter()
        parts["prefetch"] = t - t0
        try:
            if redo is not None:
                used, t = "speculative", time.perf_counter()
                out = self._redo_from(call, *redo, cache, ntok, inputs)
                missed = True
                parts["sync"] = time.perf_counter() - t
                self.redo_time += parts["sync"]
                return out
            elif all(c.complete for c in self.caches) and not self.always_check:
                self._settle()
                self._mode = "direct"
                out = call()
                if self.collect:
                    mx.eval(out, [i for _, i in self._collected])
                    for c, ind in self._collected:
                        c.count(np.array(ind))
                    self._collected = []
                parts["build"] = time.perf_counter() - t
                return out
            elif self.approximate:
                return approximate_forward(self, call)
            else:
                trimmable = cache is None or all(c.is_trimmable() for c in cache)
                if decode and trimmable:
                    used = self._pick_decode_mode()
                elif trimmable:  # a prefill chunk (redo.py): sync when it is likely to miss
                    used = self._pick_chunk_mode(ntok)
                else:
                    used = "sync"
                defer = self._defer and decode and trimmable and used == "speculative"
                if not defer:
                    self._settle()  # this forward's input came from the deferred pass: check it first
                self._sync_from = 0
                if used == "speculative":
                    self._mode, self._records, self._outputs = "speculative", [], {}
                    out = call()
                    this = self._pass(out, cache, ntok, inputs, lambda: self.forward(call, args, kwargs))
                    parts["build"] = (t1 := time.perf_counter()) - t
                    if defer:
                        # The previous token's pass computed while this graph was built. It is checked
                        # before this one is queued: a readback can wait for everything queued before
                        # it, and on a miss nothing of this pass has run.
                        queued = []

                        def queue():
                            queued.append(time.perf_counter())
                            # counted as eval: it can block (on the CPU backend it returns only after
                            # most of the step's compute, measured)
                            mx.async_eval(out, this.routing, [g for _, g in this.traces])
                            queued.append(time.perf_counter())

                        self._settle(built_on=ntok, queue=queue)
                        parts["check"] = queued[0] - t1
                        parts["eval"] = queued[1] - queued[0]
                        parts["record"] = time.perf_counter() - queued[1]
                        self._pending = this
                        self.deferred += 1
                        return out
                    mx.eval(out, this.routing, [g for _, g in this.traces])
                    parts["eval"] = (t := time.perf_counter()) - t1
                    first = self._check(this, decode)
                    parts["check"] = time.perf_counter() - t
                    if not decode:
                        self._note_chunk(used, first is not None)
                    if first is None:
                        return out
                    t, missed = time.perf_counter(), True
                    need = self._needed_at(this, first, self._order) if decode else None  # prefill: sync
                    out = self._redo_from(call, first, self._undo(this, first), need, cache, ntok, inputs)
                    parts["sync"] = time.perf_counter() - t
                    self.redo_time += parts["sync"]
                    return out
            missed = True
            self._mode, self._records = "sync", []
            out = call()
            mx.eval(out)
            if decode and used == "sync":  # a sync step that loaded nothing: speculative would have done
                self.redo_rate = 0.9 * self.redo_rate + 0.1 * self._step_missed
            elif not decode and trimmable:
                self._note_chunk("sync", self._step_missed)
            parts["sync"] = time.perf_counter() - t
            self._count_readback()
            return out
        except Rollback:
            rolled_back = True
            raise
        finally:
            self._mode, self._records, self._outputs = "direct", [], {}
            for c in self.caches:
                c.in_use.clear()
            dt = time.perf_counter() - t0
            if self.prefetcher is not None:
                self.prefetcher.end_forward(decode, missed, dt)
            if decode:
                self.decode_readbacks += self._step_readbacks
                self.decode_time += dt
                self.decode_wait += self.wait_time - wait0
                parts["prefetch"] += time.perf_counter() - t0 - dt
                parts["route"] = self._route_s
                for k, v in parts.items():
                    self.step_seconds[k] += v
                if used is not None:
                    # a rolled-back forward made no token, and a redo remakes one already counted
                    self.modes.record(used, dt, tokens=int(redo is None and not rolled_back))
                    self.mode_steps[used] += 1

    def _count_readback(self):
        self.readbacks += 1
        self._step_readbacks += 1

    # -- reporting -----------------------------------------------------------
    def expert_bytes(self) -> int:
        return sum(c.capacity * c.expert_bytes for c in self.caches)

    def _bytes_read(self) -> int:
        return sum(c.bytes_read for c in self.caches)

    def stats(self) -> dict:
        from moed.platform import process_rss_bytes

        layers = [c.stats() for c in self.caches]
        hits = sum(c.hits for c in self.caches)
        misses = sum(c.misses for c in self.caches)
        rss = process_rss_bytes()
        out = {
            "layers": layers,
            "moe_layers": len(self.caches),
            "num_experts": self.caches[0].num_experts if self.caches else 0,
            "capacity": self.caches[0].capacity if self.caches else 0,
            "approximate": self.approximate,
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "bytes_read": self._bytes_read(),
            "fill_bytes": self.fill_bytes,
            "load_time_s": round(sum(c.load_time for c in self.caches), 6),
            "resident": sum(int((c.slot_of >= 0).sum()) for c in self.caches),
            "slots": sum(c.capacity for c in self.caches),
            "forwards": self.forwards,
            "decode_steps": self.decode_steps,
            "readbacks": self.readbacks,
            "readbacks_per_token": self.decode_readbacks / self.decode_steps if self.decode_steps else None,
            "redos": self.redos,
            **self._redo_stats(),
            "deferred_checks": self.deferred,
            "rollbacks": self.rollbacks,
            "seeded": self.seeded,
            "decode_mode": self.decode_mode,
            "mode_steps": dict(self.mode_steps),
            "mode_costs": self.modes.stats(),
            "expert_wait_s": round(self.wait_time, 6),
            "prefill_stream": self.stream.stats(),
            "decode_step_ms": {k: v / self.decode_steps * 1e3 for k, v in self.step_seconds.items()}
            if self.decode_steps else None,
            "expert_wait_share": (self.decode_wait / self.decode_time) if self.decode_time else None,
            # the initial fill (fill_bytes) is left out: it is paid once, not per token
            "disk_bytes_per_token": ((self._bytes_read() - (self.fill_bytes or 0)) / self.decode_steps)
            if self.decode_steps else None,
            "memory": {
                "budget_bytes": self.memory_budget,
                "expert_bytes": self.expert_bytes(),
                "nonexpert_bytes": self.nonexpert_bytes,
                "baseline_rss_bytes": self.baseline_rss,
                "process_rss_bytes": rss,
                "rss_vs_budget": rss / self.memory_budget if self.memory_budget else None,
            },
        }
        if self.approximate:
            out["skipped_expert_uses"] = self.skipped
        if self.prefetcher is not None:
            pf = out["prefetch"] = self.prefetcher.stats()
            out["recall"], out["precision"] = pf["recall"], pf["precision"]
        return out

    def close(self) -> None:
        """Stop the prefetch threads (joined within a second), save the warm-start
        state if enabled, close the shard files."""
        if self._closed:
            return
        self._closed = True
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.stream.close()
        if self.save_warm_start is not None and not all(c.complete for c in self.caches):
            try:
                self.save_warm_start()
            except OSError as e:
                log.warning("could not save warm-start state: %s", e)
        self.reader.close()
