"""Approximate mode: a forward runs on whatever is resident, missing experts
contributing nothing (route() masks them out), and what it missed is loaded
for the next tokens. Not exact; off unless asked for (``approximate=True``)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def approximate_forward(manager, call):
    """Run ``call`` (the model's forward) in approximate mode on ``manager``'s caches."""
    manager._mode, manager._records = "approximate", []
    out = call()
    mx.eval(out, [r[1] for r in manager._records])
    manager._count_readback()
    for cache, ind, _, _ in manager._records:
        needed = np.unique(np.array(ind))
        cache.record(needed)
        missing = cache.missing(needed)
        if len(missing):  # for the next tokens; this one went without them
            ids = np.array(ind).ravel()
            manager.skipped += int((cache.slot_of[ids] < 0).sum())
            # the most used first, as many as the unpinned slots hold
            counts = np.bincount(ids, minlength=cache.num_experts)
            room = cache.capacity - len(cache.pinned)
            keep = missing[np.argsort(-counts[missing], kind="stable")][:room]
            cache.ensure(keep)
    return out
