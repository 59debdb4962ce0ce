"""Find the MoE layers of an mlx-lm model and make their experts lazy.

Detection is structural: any module holding two or more (Quantized)SwitchLinear
children is a stacked expert module (``switch_mlp`` in Qwen/DeepSeek/GLM,
``block_sparse_moe.switch_mlp`` in Mixtral, ``experts`` in GPT-OSS/Llama 4).
Its projections keep their class and compute; only their weight arrays are
swapped for cache slots, and the module is wrapped so expert ids become slot
ids. Routers, shared experts and dense layers are untouched.

Sync scheme (why the forward is wrapped): knowing whether a token's experts are
resident needs the router's choice on the CPU, a device->host readback. Doing
that per layer costs one sync per layer per token. Instead a forward runs
*speculatively* on whatever is resident (missing experts read slot 0) while
recording every layer's expert ids; one evaluation at the end reads them all
back. All resident: done, one readback. Something missing: the KV caches are
trimmed back by the tokens just fed, and the forward is redone in *sync* mode,
where layers before the first miss return the speculative pass's outputs
(same input, all experts resident) and each later layer reads back its
choice, loads what it misses, then computes. Output is exact either way.
Long prefill chunks and miss-heavy decoding go to sync mode directly (see
``ExpertManager``); docs/experts.md has the whole scheme.

Deferred check: waiting for that readback inside the forward also waits for
the token's whole compute, so the next token's graph cannot be built while
this one computes (the overlap mlx-lm's ``generate_step`` is built around).
When a decode loop sets ``manager.defer``, a speculative decode pass returns
unchecked; it is checked at the end of the next forward's graph building, or
by ``verify_through`` before its token is handed out. A miss raises
``Rollback`` with the KV caches trimmed back and the redo armed; decode.py
restarts generation from the last good token.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .cache import LayerCache, Part
from .store import Checkpoint, Reader, expert_extents, layer_index

_PROJ_ARRAYS = ("weight", "scales", "biases", "bias")
log = logging.getLogger("moed.experts")


class NotMoEError(ValueError):
    """The model has no expert layers to make lazy."""


@dataclass
class MoESite:
    layer: int
    path: str  # module path of the stacked expert module
    parent: nn.Module
    attr: str
    switch: nn.Module
    block: nn.Module  # the MoE block (router + experts)
    num_experts: int
    layer_module: nn.Module | None = None  # the decoder layer holding the block


class Rollback(Exception):
    """A deferred pass read an expert that was not resident: the token it made
    must not go out. The KV caches are trimmed back to before that pass, and
    the next forward redoes it exactly; feed ``inputs`` again to get it."""

    def __init__(self, pass_id: int, inputs):
        super().__init__(f"forward {pass_id} missed an expert")
        self.pass_id = pass_id
        self.inputs = inputs


@dataclass
class Pass:
    """A speculative forward waiting for its residency check."""

    id: int
    out: mx.array
    records: list  # (layer cache, routed ids, slot map at build, evictions at build), in layer order
    outputs: dict = field(default_factory=dict)  # expert outputs by layer position, for the redo
    kv: list | None = None  # the KV caches it appended to
    ntok: int = 1
    inputs: object = None
    call: Callable | None = None  # runs this forward again (same inputs, same KV caches)
    routing: mx.array | None = None  # every layer's ids in one array: one readback, however many layers
    traces: list = field(default_factory=list)  # the prefetcher's gate+1 guesses, on a sampled step
    sampled: bool = False  # the prefetcher scores its predictors on this pass


def _projections(module) -> dict[str, nn.Module]:
    return {k: v for k, v in module.children().items() if isinstance(v, (SwitchLinear, QuantizedSwitchLinear))}


def find_moe_sites(model: nn.Module) -> list[MoESite]:
    modules = dict(model.named_modules())
    sites = []
    for path, mod in modules.items():
        if isinstance(mod, LazySwitch) or len(_projections(mod)) < 2:
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        if isinstance(parent, LazySwitch):  # already lazy
            continue
        layer = layer_index(path)
        if layer is None:
            continue
        n = {p.weight.shape[0] for p in _projections(mod).values()}
        if len(n) != 1:
            continue
        grand = modules.get(parent_path.rpartition(".")[0]) if parent_path else None
        sites.append(MoESite(layer, path, parent, attr, mod, parent, n.pop(), grand))
    return sorted(sites, key=lambda s: s.layer)


def find_router(block: nn.Module, num_experts: int):
    """The router of an MoE block: a linear layer with one output per expert, or
    a MoEGate-style module (``gate``) returning ``(indices, scores)``."""
    for name, child in block.children().items():
        if isinstance(child, (nn.Linear, nn.QuantizedLinear)) and child.weight.shape[0] == num_experts:
            return child
    gate = block.get("gate") if hasattr(block, "get") else None
    return gate if isinstance(gate, nn.Module) else None


def find_pre_expert_norm(site: MoESite):
    """The RMSNorm the decoder layer applies before its MoE block
    (``post_attention_layernorm`` in every mlx-lm MoE family), or None."""
    norm = site.layer_module.get("post_attention_layernorm") if site.layer_module is not None else None
    return norm if isinstance(norm, nn.RMSNorm) else None


def expert_parts(ckpt: Checkpoint, site: MoESite) -> list[Part]:
    parts = []
    for proj_name, proj in _projections(site.switch).items():
        for arr_name in _PROJ_ARRAYS:
            arr = proj.get(arr_name) if arr_name in proj else None
            if arr is None:
                continue
            extents = expert_extents(ckpt, site.path, proj_name, arr_name, site.num_experts)
            per = arr.shape[1:]
            want = int(np.prod(per)) * arr.dtype.size
            if extents[0].nbytes != want:
                raise ValueError(
                    f"{extents[0].file}: {extents[0].key!r} holds {extents[0].nbytes} bytes per expert, "
                    f"the model expects {want} ({arr.dtype} {per})"
                )
            parts.append(Part(f"{proj_name}.{arr_name}", tuple(per), arr.dtype, tuple(extents)))
    return parts


class LazySwitch(nn.Module):
    """Stands in for a stacked expert module; its projections compute over slots."""

    def __init__(self, inner: nn.Module, cache: LayerCache, manager: "ExpertManager"):
        super().__init__()
        self.inner = inner
        self._cache = cache
        self._manager = manager
        for name, arr in cache.slots.items():
            proj, arr_name = name.split(".")
            setattr(inner[proj], arr_name, arr)

    def __call__(self, x, indices):
        return self._manager.route(self._cache, self.inner, x, indices)


class ExpertManager:
    """Owns the layer caches and decides, per forward, how experts are found.

    ``decode_mode``: "speculative" (one readback when everything is resident,
    a redo otherwise), "sync" (a readback per MoE layer, never a redo), or
    "auto" (default): speculative while redos are rare (under a quarter of
    steps lately), else whichever mode has cost less per decode step lately,
    trying the other every 16th step. Prefill chunks always go speculative.
    """

    EXPLORE_EVERY = 16
    STEP_PARTS = ("prefetch", "build", "eval", "check", "record", "sync")

    def __init__(self, caches: list[LayerCache], sites: list[MoESite], reader: Reader, *, approximate: bool = False,
                 memory_budget: int | None = None, nonexpert_bytes: int = 0, decode_mode: str = "auto"):
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
        # where decode steps' time goes (seconds, summed): prefetcher hooks, building the
        # speculative pass's graph, waiting for its evaluation (the readback), the residency
        # check and bookkeeping (deferred: the previous pass's check, up to queueing this one),
        # recording a deferred pass's use while the next computes, sync passes (redos and
        # sync-mode steps, loads included)
        self.step_seconds = dict.fromkeys(self.STEP_PARTS, 0.0)
        self.always_check = False  # diagnostics: run the exactness scheme even when every expert is resident
        # set by a decode loop that checks each token's pass late (decode.py); see the module doc
        self.defer = False
        self.defer_checks = True  # whether decode.py may set it (off: every check inside its forward)
        self._pending: Pass | None = None
        self._redo: tuple[int, dict] | None = None
        self.forward_id = 0
        self.deferred = self.rollbacks = 0
        self.mode_cost = {"speculative": None, "sync": None}  # EWMA seconds per decode step
        self.mode_steps = {"speculative": 0, "sync": 0}
        # EWMA share of decode steps that found an expert missing: a redo in a speculative
        # step, a load at some layer in a sync step (the redo a speculative pass would have needed)
        self.redo_rate = 0.0
        self._step_missed = False
        self._top_k = 1  # experts per token, as last seen
        self.prefetcher = None
        self.collect = False  # count activations even when every expert is resident (profiling)
        self._collected: list = []
        self.model_path = None
        self.warm_start = False
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
        if mode == "speculative":
            y = inner(x, cache.lut()[indices])
            # the slot map as this pass reads it: the check must judge the pass by it, since loads
            # may be installed (or slots evicted) before a deferred pass is checked
            self._records.append((cache, indices, cache.slot_of.copy(), cache.evictions))
            self._outputs[order] = y
            if self.prefetcher is not None:
                self.prefetcher.trace(order, x, indices)
            return y
        if mode == "sync" and order < self._sync_from:
            # same input as in the speculative pass, all experts were there: reuse
            return self._outputs[order]
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
        mx.eval(indices, *[guess for _, guess, _ in ahead])
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
        pinned = np.array(sorted(cache.pinned & set(needed.tolist())), dtype=needed.dtype)
        others = np.setdiff1d(needed, pinned)
        room = cache.capacity - len(cache.pinned)  # pinned experts are always resident
        if len(others) <= room:
            self._load(cache, needed)
            return inner(x, cache.lut()[indices])
        # More distinct experts than slots (long prefill, big batch): compute in
        # groups that fit, resident ones first, each group evaluated before the
        # next overwrites its slots.
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

    def _pick_decode_mode(self) -> str:
        if self.decode_mode != "auto":
            return self.decode_mode
        spec, sync = self.mode_cost["speculative"], self.mode_cost["sync"]
        if spec is None or self.redo_rate < 0.25:  # misses are rare: one readback per token
            return "speculative"
        if sync is None:
            return "sync"
        best, other = ("speculative", "sync") if spec <= sync else ("sync", "speculative")
        return other if self.decode_steps % self.EXPLORE_EVERY == 0 else best

    def _forward(self, call, args, kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        cache = kwargs["cache"] if "cache" in kwargs else (args[1] if len(args) > 1 else None)
        ntok = inputs.shape[-1] if inputs is not None and inputs.ndim >= 1 else 0
        decode = ntok == 1
        redo, self._redo = self._redo, None  # armed by a rollback: this forward redoes a deferred pass
        self.forwards += 1
        self.forward_id += 1
        self.decode_steps += decode and redo is None
        self._step_readbacks = 0
        self._step_missed = False
        t0 = time.perf_counter()
        wait0 = self.wait_time
        used = None
        missed = False  # a redo, or a sync-mode step: the steps where how experts are found matters
        parts = dict.fromkeys(self.STEP_PARTS, 0.0)
        if self.prefetcher is not None:
            self.prefetcher.begin_forward(decode)
        t = time.perf_counter()
        parts["prefetch"] = t - t0
        try:
            if redo is not None:
                used, (self._sync_from, self._outputs) = "speculative", redo
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
                return self._approximate(call)
            else:
                trimmable = cache is None or all(c.is_trimmable() for c in cache)
                if decode and trimmable:
                    used = self._pick_decode_mode()
                elif trimmable and ntok * self._top_k <= min(c.capacity for c in self.caches):
                    used = "speculative"
                else:  # a long prefill chunk: some layer is bound to miss, skip the pass that would be thrown away
                    used = "sync"
                defer = self.defer and decode and trimmable and used == "speculative"
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
                    if first is None:
                        return out
                    t = time.perf_counter()
                    self._outputs, self._sync_from = self._undo(this, first), first
            missed = True
            self._mode, self._records = "sync", []
            out = call()
            mx.eval(out)
            if decode and used == "sync":  # a sync step that loaded nothing: speculative would have done
                self.redo_rate = 0.9 * self.redo_rate + 0.1 * self._step_missed
            parts["sync"] = time.perf_counter() - t
            self._count_readback()
            return out
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
                for k, v in parts.items():
                    self.step_seconds[k] += v
                if used is not None:
                    old = self.mode_cost[used]
                    self.mode_cost[used] = dt if old is None else 0.8 * old + 0.2 * dt
                    self.mode_steps[used] += 1

    def _count_readback(self):
        self.readbacks += 1
        self._step_readbacks += 1

    # -- the deferred check --------------------------------------------------
    def _pass(self, out, kv, ntok, inputs, call) -> Pass:
        """The speculative pass just built, for its check now or later."""
        routing = mx.concatenate([r[1].reshape(-1) for r in self._records]) if self._records else None
        pf = self.prefetcher
        return Pass(self.forward_id, out, self._records, self._outputs, kv, ntok, inputs, call, routing,
                    pf.take_traces() if pf is not None else [], pf is not None and pf.sampled)

    def _check(self, p: Pass, decode: bool = True, then=None) -> int | None:
        """Read an evaluated pass's routing back and record its use; the position
        of the first layer that missed, or None. ``then`` runs as soon as the pass
        is known to have missed nothing, before its use is recorded."""
        self._count_readback()
        seen, first = self._misses(p)
        if decode:
            self.redo_rate = 0.9 * self.redo_rate + 0.1 * (first is not None)
        if first is None and then is not None:
            then()
        self._note_pass(seen, first, p)
        return first

    def _settle(self, built_on: int = 0, queue=None) -> None:
        """Check the deferred pass, if any. ``built_on``: tokens fed since by a
        forward built on its output, not yet queued; ``queue`` queues it, once the
        check has passed (the bookkeeping then runs while it computes). On a miss
        both are undone (KV caches trimmed), the redo is armed and ``Rollback`` raised."""
        p, self._pending = self._pending, None
        if p is None:
            if queue is not None:
                queue()
            return
        mx.eval(p.out, p.routing)  # all of it: a load may overwrite a slot once the check has passed
        first = self._check(p, then=queue)
        if first is None:
            return
        self.rollbacks += 1
        self._redo = (first, self._undo(p, first, built_on))
        raise Rollback(p.id, p.inputs)

    def _undo(self, p: Pass, first: int, built_on: int = 0) -> dict:
        """Undo a pass that missed at layer position ``first``: its tokens (and
        ``built_on`` more) leave the KV caches. Returns the expert outputs of the
        layers before ``first``, which the redo reuses (same input, all resident)."""
        self.redos += 1
        if p.kv is not None:
            for c in p.kv:
                c.trim(p.ntok + built_on)
        return {o: y for o, y in p.outputs.items() if o < first}

    def verify_through(self, pass_id: int) -> None:
        """Check the deferred pass if it is ``pass_id`` or older (raises ``Rollback`` on a miss)."""
        with self._lock:
            if self._pending is not None and self._pending.id <= pass_id:
                self._settle()

    def finish(self) -> None:
        """End of a deferred decode: check the last pass; on a miss redo it, so the
        KV caches hold exactly what a checked decode would have left."""
        with self._lock:
            self._redo = None
            pending = self._pending
            try:
                self._settle()
            except Rollback:
                try:
                    mx.eval(pending.call())
                finally:  # a failed redo must not leave itself armed for another stream
                    self._redo = None

    def _misses(self, p: Pass) -> tuple[list, int | None]:
        """An evaluated pass's routing: per layer (position, cache, experts
        needed, experts that were not resident when the pass read its slots,
        routed ids), and the position of the first layer that missed. A layer
        that evicted anything since counts as missed: its slots may have changed."""
        seen = []
        flat = np.array(p.routing) if p.routing is not None else None
        start = 0
        for cache, ind, slot_of, evictions in p.records:
            ids = flat[start:start + ind.size].reshape(ind.shape)
            start += ind.size
            self._top_k = ids.shape[-1]
            needed = np.unique(ids)
            missing = needed[slot_of[needed] < 0]
            if cache.evictions != evictions and not len(missing):
                missing = needed
            seen.append((self._order[id(cache)], cache, needed, missing, ids))
        misses = [order for order, _, _, miss, _ in seen if len(miss)]
        return seen, (min(misses) if misses else None)

    def _note_pass(self, seen, first, p: Pass) -> None:
        """Record a checked pass's use. When something missed, loads for every
        layer's misses start now (the pass's choices are the best guess for the
        redo's) and the experts it used are kept from eviction until the forward ends."""
        pf = self.prefetcher
        if pf is not None:
            pf.absorb_traces(p.traces)
        for order, cache, needed, _, routed in seen:
            # layers from the first miss on are redone and record themselves then
            if first is None or order < first:
                cache.record(needed)
                cache.count(routed)
                if pf is not None:
                    pf.note_need(order, cache, needed, p.sampled)
            cache.in_use.update(needed.tolist())
        if pf is not None:
            pf.after_pass(seen, first)

    def _approximate(self, call):
        self._mode, self._records = "approximate", []
        out = call()
        mx.eval(out, [r[1] for r in self._records])
        self._count_readback()
        for cache, ind, _, _ in self._records:
            needed = np.unique(np.array(ind))
            cache.record(needed)
            missing = cache.missing(needed)
            if len(missing):  # for the next tokens; this one went without them
                ids = np.array(ind).ravel()
                self.skipped += int((cache.slot_of[ids] < 0).sum())
                # the most used first, as many as the unpinned slots hold
                counts = np.bincount(ids, minlength=cache.num_experts)
                room = cache.capacity - len(cache.pinned)
                keep = missing[np.argsort(-counts[missing], kind="stable")][:room]
                cache.ensure(keep)
        return out

    # -- reporting -----------------------------------------------------------
    def expert_bytes(self) -> int:
        return sum(c.capacity * c.expert_bytes for c in self.caches)

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
            "bytes_read": sum(c.bytes_read for c in self.caches),
            "load_time_s": round(sum(c.load_time for c in self.caches), 6),
            "resident": sum(int((c.slot_of >= 0).sum()) for c in self.caches),
            "slots": sum(c.capacity for c in self.caches),
            "forwards": self.forwards,
            "decode_steps": self.decode_steps,
            "readbacks": self.readbacks,
            "readbacks_per_token": self.decode_readbacks / self.decode_steps if self.decode_steps else None,
            "redos": self.redos,
            "deferred_checks": self.deferred,
            "rollbacks": self.rollbacks,
            "seeded": self.seeded,
            "decode_mode": self.decode_mode,
            "mode_steps": dict(self.mode_steps),
            "expert_wait_s": round(self.wait_time, 6),
            "decode_step_ms": {k: v / self.decode_steps * 1e3 for k, v in self.step_seconds.items()}
            if self.decode_steps else None,
            "expert_wait_share": (self.decode_wait / self.decode_time) if self.decode_time else None,
            "disk_bytes_per_token": (sum(c.bytes_read for c in self.caches) / self.decode_steps) if self.decode_steps else None,
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
        if self.warm_start and self.model_path is not None and not all(c.complete for c in self.caches):
            from .profile import save_state

            try:
                save_state(self, self.model_path)
            except OSError as e:
                log.warning("could not save warm-start state: %s", e)
        self.reader.close()


def _hook_forward(model: nn.Module, manager: ExpertManager) -> None:
    """Route every call of ``model`` through ``manager.forward`` (see module doc)."""
    cls = type(model)

    def __call__(self, *args, **kwargs):
        return manager.forward(lambda: cls.__call__(self, *args, **kwargs), args, kwargs)

    model.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "_moed_lazy": True})


def make_lazy(model: nn.Module, model_dir, capacity: int, *, approximate: bool = False, policy: str = "lfru",
              memory_budget: int | None = None, nonexpert_bytes: int = 0, ckpt: Checkpoint | None = None,
              decode_mode: str = "auto") -> ExpertManager:
    """Swap every expert module of ``model`` for a lazy one with ``capacity`` slots.

    Call before the expert arrays are evaluated (``load(lazy=True)``): the
    original expert arrays are dropped unread.
    """
    if getattr(model, "_moed_lazy", False):
        raise ValueError("this model's experts are lazy already")
    sites = find_moe_sites(model)
    if not sites:
        raise NotMoEError(f"{model_dir}: no mixture-of-experts layers found (a dense model cannot use expert offloading)")
    ckpt = ckpt or Checkpoint(model_dir)
    reader = Reader()
    caches = []
    for site in sites:
        parts = expert_parts(ckpt, site)
        caches.append(LayerCache(site.layer, site.num_experts, min(capacity, site.num_experts), parts, reader, policy))
    manager = ExpertManager(caches, sites, reader, approximate=approximate, memory_budget=memory_budget,
                            nonexpert_bytes=nonexpert_bytes, decode_mode=decode_mode)
    for site, cache in zip(sites, caches):
        setattr(site.parent, site.attr, LazySwitch(site.switch, cache, manager))
    _hook_forward(model, manager)
    return manager
