"""Make the experts of an mlx-lm MoE model lazy: bounded slot caches read from disk.

Each stacked expert module that families.py finds keeps its projections'
class and compute; only their weight arrays are swapped for cache slots, and
the module is wrapped (``LazySwitch``) so expert ids become slot ids. The
model's forward is wrapped too, so the ``ExpertManager`` (manager.py) decides
per forward how experts are found. Routers, shared experts and dense layers
are untouched.
"""

from __future__ import annotations

import mlx.nn as nn
import numpy as np

from .cache import LayerCache, Part
from .families import MoESite, projections, require_moe_sites
from .kernels import SameKernel
from .manager import ExpertManager
from .store import Checkpoint, Reader, expert_extents

_PROJ_ARRAYS = ("weight", "scales", "biases", "bias")


def expert_parts(ckpt: Checkpoint, site: MoESite) -> list[Part]:
    parts = []
    for proj_name, proj in projections(site.switch).items():
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

    wraps_experts = True  # families.find_moe_sites skips it and the module it wraps

    def __init__(self, inner: nn.Module, cache: LayerCache, manager: "ExpertManager"):
        super().__init__()
        self.inner = inner
        self._cache = cache
        self._manager = manager
        for name, arr in cache.slots.items():
            proj, arr_name = name.split(".")
            setattr(inner[proj], arr_name, arr)
        quantized = any("scales" in proj for proj in projections(inner).values())
        self._same_kernel = SameKernel(inner, cache.num_experts, cache.capacity, quantized)

    def __call__(self, x, indices):
        return self._manager.route(self._cache, self._same_kernel, x, indices)


def _hook_forward(model: nn.Module, manager: ExpertManager) -> None:
    """Route every call of ``model`` through ``manager.forward`` (manager.py says why)."""
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
    sites = require_moe_sites(model, model_dir)
    ckpt = ckpt or Checkpoint(model_dir)
    reader = Reader()
    caches = []
    for site in sites:
        parts = expert_parts(ckpt, site)
        caches.append(LayerCache(site.layer, site.num_experts, min(capacity, site.num_experts), parts, reader, policy))
    manager = ExpertManager(caches, sites, reader, approximate=approximate, memory_budget=memory_budget,
                            nonexpert_bytes=nonexpert_bytes, decode_mode=decode_mode)
    for site, cache in zip(sites, caches):
        site.swap(LazySwitch(site.switch, cache, manager))
    _hook_forward(model, manager)
    return manager
