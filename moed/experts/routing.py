"""Routing statistics of an mlx-lm MoE model: how skewed and how persistent expert choice is.

Expert caching pays off when a few experts take most of the traffic (low
normalized entropy, high top-25% share) and prefetching pays off when the
experts of one token are mostly those of the previous one (high reuse).
Works on any mlx-lm MoE model families.py finds the experts of (``switch_mlp``,
``experts``, ...): the indices handed to each stacked expert module are recorded.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .families import NotMoEError, find_moe_sites


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, MoE block) for every MoE layer (families.find_moe_sites)."""
    return [(s.layer, s.block) for s in find_moe_sites(model)]


class _Recorder(nn.Module):
    """Stands in for a stacked expert module: notes the expert indices, then calls the real one."""

    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner = inner
        self._sink = _Sink(sink)

    def __call__(self, x, indices, *args, **kwargs):
        self._sink.items.append(indices)
        return self.inner(x, indices, *args, **kwargs)


class _Sink:
    """A plain holder, so the list is not mistaken for model parameters."""

    def __init__(self, items: list):
        self.items = items


@contextmanager
def record_routing(model: nn.Module) -> Iterator[dict[int, list[mx.array]]]:
    """Record the expert indices of every MoE layer while the block runs.

    Yields ``{layer index: [indices array per call]}``; each array has shape
    ``(..., tokens, top_k)``. The model's own expert modules are put
    back on exit, also after an error.
    """
    sites = find_moe_sites(model)
    if not sites:
        raise NotMoEError("model has no MoE layers")
    log: dict[int, list[mx.array]] = {s.layer: [] for s in sites}
    try:
        for s in sites:
            s.swap(_Recorder(s.switch, log[s.layer]))
        yield log
    finally:
        for s in sites:
            s.swap(s.switch)


def normalized_entropy(counts: np.ndarray) -> float:
    """Entropy of the usage distribution over log(number of experts): 1.0 is uniform."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0 or len(counts) < 2:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(counts)))


def top_share(counts: np.ndarray, fraction: float = 0.25) -> float:
    """Share of routed slots taken by the most used ``fraction`` of experts."""
    counts = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = counts.sum()
    if total == 0:
        return 0.0
    k = max(1, math.ceil(fraction * len(counts)))
    return float(counts[:k].sum() / total)


def token_reuse(sequence: np.ndarray) -> float:
    """Mean fraction of a token's experts that the previous token also used.

    ``sequence`` has shape ``(tokens, top_k)`` for one layer of one sequence.
    Uniform random routing gives about ``top_k / experts``.
    """
    seq = np.asarray(sequence)
    if len(seq) < 2:
        return float("nan")
    k = seq.shape[-1]
    prev, cur = seq[:-1, :, None], seq[1:, None, :]
    shared = (prev == cur).any(axis=1).sum(axis=-1)
    return float(shared.mean() / k)


def layer_statistics(sequences: list[np.ndarray], experts: int) -> dict:
    """Statistics of one layer over several sequences, each ``(tokens, top_k)``."""
    counts = np.zeros(experts, dtype=np.int64)
    reuse_sum, reuse_n = 0.0, 0
    for seq in sequences:
        counts += np.bincount(seq.reshape(-1), minlength=experts)[:experts]
        if len(seq) >= 2:
            reuse_sum += token_reuse(seq) * (len(seq) - 1)
            reuse_n += len(seq) - 1
    top_k = int(sequences[0].shape[-1]) if sequences else 0
    return {
        "experts": experts,
        "top_k": top_k,
        "tokens": int(sum(len(s) for s in sequences)),
        "normalized_entropy": normalized_entropy(counts),
        "top25_share": top_share(counts, 0.25),
        "token_reuse": reuse_sum / reuse_n if reuse_n else None,
        "uniform_reuse": top_k / experts if experts else None,
        "experts_used": int((counts > 0).sum()),
    }


def routing_statistics(model: nn.Module, token_sequences: Iterable[list[int]]) -> dict:
    """Per-layer routing statistics over teacher-forced token sequences (JSON-safe).

    Each sequence runs as one forward pass, so the indices seen are exactly
    those a token-by-token decode of the same tokens would route (same
    causal model), at a fraction of the cost.
    """
    experts = {s.layer: s.num_experts for s in find_moe_sites(model)}
    per_layer: dict[int, list[np.ndarray]] = {i: [] for i in experts}
    with record_routing(model) as log:
        for tokens in token_sequences:
            if len(tokens) == 0:
                continue
            for calls in log.values():
                calls.clear()
            mx.eval(model(mx.array(tokens)[None]))
            for i, calls in log.items():
                idx = np.concatenate([np.array(c).reshape(-1, c.shape[-1]) for c in calls])
                per_layer[i].append(idx)
    layers = [{"layer": i, **layer_statistics(per_layer[i], experts[i])} for i in sorted(experts)]
    entropies = [l["normalized_entropy"] for l in layers]
    reuses = [l["token_reuse"] for l in layers if l["token_reuse"] is not None]
    return {
        "layers": layers,
        "summary": {
            "moe_layers": len(layers),
            "mean_normalized_entropy": float(np.mean(entropies)),
            "layers_entropy_below_0.95": int(sum(e < 0.95 for e in entropies)),
            "mean_top25_share": float(np.mean([l["top25_share"] for l in layers])),
            "mean_token_reuse": float(np.mean(reuses)) if reuses else None,
        },
    }


def text_statistics(model: nn.Module, tokenizer, texts: Iterable[str], max_tokens: int = 256) -> dict:
    """``routing_statistics`` over texts, each cut to its first ``max_tokens`` tokens."""
    return routing_statistics(model, [tokenizer.encode(t)[:max_tokens] for t in texts])
