"""Lazy experts: run an MoE model whose experts live on SSD, with exact output.

``load_model(path, capacity=...)`` builds the model with mlx-lm (lazily, so no
expert byte is read), swaps each MoE layer's expert tensors for a bounded slot
cache, and returns a manager that loads experts on demand. See docs/experts.md.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .families import NotMoEError, find_moe_sites, require_moe_sites
from .lazy import make_lazy
from .manager import ExpertManager
from .store import Checkpoint, StoreError

log = logging.getLogger("moed.experts")

__all__ = ["load_model", "parse_size", "ExpertManager", "NotMoEError", "StoreError"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text) -> int:
    """``"8GB"``, ``"512M"``, ``1e9`` -> bytes (binary units: 1 GB = 2**30 bytes)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (try 8GB or 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _capacity_for_budget(budget: int, nonexpert: int, baseline: int, per_layer_expert: list[int], num_experts: int) -> int:
    """Experts per layer that fit in ``budget`` beside the dense weights and the
    process's own footprint (interpreter, MLX, buffers) measured before loading,
    keeping 3% (at least 16 MiB) for the KV cache and activations."""
    reserve = max(16 << 20, budget * 3 // 100)  # KV cache, activations, allocator slack
    room = budget - nonexpert - baseline - reserve
    per_slot = sum(per_layer_expert)  # one slot in every MoE layer
    cap = room // per_slot if per_slot else num_experts
    if cap < 1:
        need = nonexpert + baseline + reserve + per_slot
        raise ValueError(
            f"memory budget {budget / 2**30:.2f} GiB is too small: dense weights {nonexpert / 2**30:.2f} GiB, "
            f"process {baseline / 2**30:.2f} GiB, one expert per layer {per_slot / 2**30:.3f} GiB "
            f"(need at least {need / 2**30:.2f} GiB)"
        )
    return int(min(cap, num_experts))


def load_model(path, *, capacity: int | None = None, memory_budget=None, approximate: bool = False,
               prefetch: bool = True, policy: str = "lfru", decode_mode: str = "auto", profile="auto",
               warm_start: bool = True, split=None):
    """Load an mlx-lm model; with ``capacity`` (experts per MoE layer) or
    ``memory_budget`` (bytes or "8GB") its experts stay on disk and a bounded
    cache per layer holds the ones in use. Returns ``(model, tokenizer, manager)``;
    manager is None for a plain load.

    ``profile``: "auto" (the model's profile if one is found, see profile.py),
    a path, or None. ``warm_start``: restore the experts resident at the last
    shutdown of this model at this capacity, and save them at ``close()``.

    ``split``: for one rank of a distributed job (moed.engine.pipeline), called with the
    lazily loaded model to keep only this rank's layers, before any weight is read. The
    experts then cover only those layers, and every forward finds them in sync mode
    (``lockstep``), since a redo would run the forward's pipeline transfers twice on this
    rank alone. The manifest still lists the whole model, so every rank agrees on it.
    """
    import mlx_lm

    path = Path(path)
    if capacity is None and memory_budget is None:
        ckpt = Checkpoint(path)
        model, tokenizer = mlx_lm.load(str(path), lazy=split is not None)
        pieces = expert_pieces(ckpt, model, path)
        if split is not None:
            split(model)
            mx.eval(model.parameters())
        _verified(path, ckpt, pieces, check=None)  # every tensor, once, at load
        return model, tokenizer, None

    from moed.platform import process_rss_bytes

    baseline = process_rss_bytes()
    ckpt = Checkpoint(path)  # before mlx-lm touches the shards: our errors name file and key
    model, tokenizer = mlx_lm.load(str(path), lazy=True)
    whole = expert_pieces(ckpt, model, path) if split is not None else None
    if split is not None:
        split(model)
        if not find_moe_sites(model):  # this rank's layers are all dense: nothing to make lazy
            mx.eval(model.parameters())
            _verified(path, ckpt, whole, check=None)
            return model, tokenizer, None
    sites = require_moe_sites(model, path)
    expert_ids = {id(a) for s in sites for _, a in tree_flatten(s.switch.parameters())}
    nonexpert = sum(a.nbytes for _, a in tree_flatten(model.parameters()) if id(a) not in expert_ids)
    per_layer = [sum(a.nbytes for _, a in tree_flatten(s.switch.parameters())) // s.num_experts for s in sites]
    num_experts = max(s.num_experts for s in sites)
    budget = parse_size(memory_budget) if memory_budget is not None else None
    if capacity is None:
        capacity = _capacity_for_budget(budget, nonexpert, baseline, per_layer, num_experts)
        log.info("memory budget %.2f GiB -> %d experts per layer", budget / 2**30, capacity)
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    manager = make_lazy(model, path, capacity, approximate=approximate, policy=policy,
                        memory_budget=budget, nonexpert_bytes=nonexpert, ckpt=ckpt, decode_mode=decode_mode)
    if split is not None:
        manager.lockstep()
    manager.reader.manifest = _verified(path, ckpt, whole or expert_pieces(ckpt, model, path, manager), check="dense")
    manager.baseline_rss = baseline
    manager.per_layer_expert_bytes = per_layer
    del sites
    mx.eval(model.parameters())
    for cache in manager.caches:
        if cache.capacity == cache.num_experts:  # everything fits: load once, run direct
            cache.ensure(range(cache.num_experts))
    if prefetch and not approximate and not all(c.complete for c in manager.caches):
        from .prefetch import attach_prefetcher

        attach_prefetcher(manager)
    manager.model_path, manager.warm_start = path, warm_start
    if not all(c.complete for c in manager.caches):
        _seed(manager, path, profile, warm_start)
    return model, tokenizer, manager


def expert_pieces(ckpt: Checkpoint, model, path: Path, manager=None) -> list:
    """Each expert's slice of every stacked expert tensor (moed.integrity.Piece), as lazy experts read them."""
    from moed.integrity import Piece

    if manager is not None:
        parts = [p for c in manager.caches for p in c.parts]
    else:  # a plain load: the same slices, so a later lazy load of this model finds them in the manifest
        from .lazy import expert_parts

        try:
            parts = [p for s in require_moe_sites(model, path) for p in expert_parts(ckpt, s)]
        except NotMoEError:
            parts = []
    return [Piece(x.file, x.key, x.offset, x.nbytes, f" (expert {e})" if x.nbytes != ckpt.get(x.key).nbytes else "")
            for p in parts for e, x in enumerate(p.extents)]


def _verified(path: Path, ckpt: Checkpoint, experts: list, check: str | None):
    """The model's manifest (moed/integrity.py), built on first load; checks every tensor
    (``check=None``) or the dense ones, whose experts the Reader checks as it reads them."""
    import time

    from moed.integrity import Piece, ensure_manifest

    in_experts = {p.key for p in experts}
    dense = [Piece(t.file, t.key, t.offset, t.nbytes) for t in ckpt.tensors.values() if t.key not in in_experts]
    t0 = time.perf_counter()
    manifest = ensure_manifest(path, dense + experts)
    checked = manifest.verify_pieces(dense if check == "dense" else dense + experts)
    log.info("integrity: %.1f MB checked against %s in %.2f s", checked / 1e6, manifest.path, time.perf_counter() - t0)
    return manifest


def _seed(manager, path: Path, profile, warm_start: bool) -> None:
    """Profile pins and priors, then the warm-start resident set, then the
    profile's most active experts, into whatever slots are left; with
    ``warm_start``, the resident set is saved again at ``close()``."""
    from . import profile as profiles

    if warm_start:
        manager.save_warm_start = lambda: profiles.save_state(manager, path)

    prof = None
    if profile == "auto":
        found = profiles.find_profile(path)
        prof = profiles.read_profile(found, path) if found else None
    elif profile is not None:
        prof = profiles.read_profile(profile, path)
    restored = profiles.restore_state(manager, path) if warm_start else 0
    applied = profiles.apply_profile(manager, prof) if prof else None
    manager.seeded = {"profile": bool(prof), "warm_restored": restored, **(applied or {})}
    if prof or restored:
        log.info("experts seeded: %s", manager.seeded)
