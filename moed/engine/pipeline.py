"""The model split by layers across the ranks of an MLX distributed job (``mlx.launch``).

Rank r runs one contiguous slice of the decoder layers. As in mlx-lm's own
``pipeline()`` (DeepSeek, Qwen3-MoE, GLM-4 MoE...), the last rank runs the first
layers and rank 0 the last ones: a rank receives the hidden state from rank r+1
before its slice and sends its slice's output to rank r-1, and an all_gather
gives every rank rank 0's output, so every rank computes the same logits and
samples the same token. A model whose inner module has ``pipeline()`` is split
by it; any other family by ``_split_generic``, which keeps the model's own
forward and puts the same receive / send / all_gather around the slice's ends.

Two things mlx-lm's split leaves to its caller, done here for every family:
- the all_gather is tied into the KV cache (``_Tie``), so whatever evaluates a
  forward's cache (a prefill chunk evaluates only the cache) also runs that
  forward's collective. Each rank may evaluate a forward differently (a lazy
  expert layer reads its routing back inside the forward, a fully resident one
  does not), and a collective one rank skips would leave the others waiting.
- the bytes each rank hands to the backend per forward are counted (``Traffic``).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass
class Traffic:
    """Pipeline bytes this rank sends: the hidden state to the next stage (ranks > 0) and, in the
    ring's all_gather, its share of forwarding (size - 1 chunks of one hidden state each)."""

    rank: int
    size: int
    bytes_sent: int = 0
    tokens: int = 0  # positions forwarded (batch x length), summed over forwards
    activation_bytes: int = 0  # one position's hidden state, as last seen

    def count(self, h: mx.array) -> None:
        per = h.nbytes // max(1, h.size // h.shape[-1])
        self.activation_bytes = per
        self.tokens += h.size // h.shape[-1]
        self.bytes_sent += h.nbytes * ((self.rank != 0) + (self.size - 1))


@dataclass
class Slice:
    rank: int
    size: int
    start: int  # first layer this rank runs
    end: int  # one past its last
    num_layers: int
    generic: bool  # split by _split_generic rather than the model's own pipeline()
    traffic: Traffic

    def describe(self) -> dict:
        return {"rank": self.rank, "layers": [self.start, self.end], "num_layers": self.num_layers,
                "split": "generic" if self.generic else "mlx-lm pipeline()"}


def inner_model(model: nn.Module) -> nn.Module:
    """The module that holds the decoder layers and the final norm (``model.model``; one level
    deeper in wrappers such as Kimi's ``language_model``)."""
    todo = [model]
    while todo:
        m = todo.pop(0)
        if isinstance(getattr(m, "layers", None), list) and "norm" in m.children():
            return m
        todo += [getattr(m, a) for a in ("model", "language_model") if isinstance(getattr(m, a, None), nn.Module)]
    raise ValueError(f"cannot split {type(model).__name__} by layers: no module with decoder layers and a final norm")


def bounds(num_layers: int, rank: int, size: int) -> tuple[int, int]:
    """This rank's layers [start, end): an even split, the low ranks get the extra layers, and rank r runs
    the layers after those of ranks r+1 ... size-1 (mlx-lm's PipelineMixin rule)."""
    if num_layers < size:
        raise ValueError(f"{size} ranks for {num_layers} layers: each rank needs at least one layer")
    base, extra = divmod(num_layers, size)
    split = [base + (r < extra) for r in range(size)]
    start = sum(split[rank + 1:])
    return start, start + split[rank]


def split(model: nn.Module, group) -> Slice:
    """Keep only this rank's layers of ``model`` (call before its weights are evaluated:
    ``load(lazy=True)``, so other ranks' weights are never read)."""
    inner = inner_model(model)
    rank, size = group.rank(), group.size()
    n = len(inner.layers)
    start, end = bounds(n, rank, size)
    generic = not hasattr(inner, "pipeline")
    if generic:
        _split_generic(inner, rank, size, start, end)
    else:
        inner.pipeline(group)
        assert (inner.start_idx, inner.end_idx) == (start, end)
    traffic = Traffic(rank, size)
    gathered = _CountGathered(traffic)
    _hook(inner.norm, gathered)
    _hook(model, _Tie(gathered))
    return Slice(rank, size, start, end, n, generic, traffic)


# -- hooks: a module's __call__ wrapped in place (a subclass of its own class), so parameter
#    paths stay those of the checkpoint (lazy experts map them to tensors)


def _hook(module: nn.Module, wrap) -> None:
    cls = type(module)

    def __call__(self, *args, **kwargs):
        return wrap(lambda *a, **k: cls.__call__(self, *a, **k), *args, **kwargs)

    module.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def _layer_cache(args, kwargs):
    """A decoder layer's cache argument: ``layer(x, mask, cache)`` in every mlx-lm family."""
    return kwargs.get("cache", args[1] if len(args) > 1 else None)


class _CountGathered:
    """On the final norm: its input is the gathered hidden state. Counted, and kept for ``_Tie``
    (here, not on the module: an array set on an mlx Module becomes one of its parameters)."""

    def __init__(self, traffic: Traffic):
        self.traffic = traffic
        self.last: mx.array | None = None

    def __call__(self, call, h, *args, **kwargs):
        self.traffic.count(h)
        self.last = h
        return call(h, *args, **kwargs)


class _Tie:
    """On the model: the forward's gathered hidden state becomes part of its last KV cache."""

    def __init__(self, gathered: _CountGathered):
        self.gathered = gathered

    def __call__(self, call, *args, **kwargs):
        out = call(*args, **kwargs)
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        h, self.gathered.last = self.gathered.last, None
        if cache and h is not None and getattr(cache[-1], "keys", None) is not None:
            cache[-1].keys = mx.depends(cache[-1].keys, h)
        return out


class Skipped(nn.Module):
    """A layer another rank runs: the hidden state passes through; its KV cache grows by zero-width
    keys, so its offset (which masks and positions are built from) stays the model's."""

    def __call__(self, x, *args, **kwargs):
        cache = _layer_cache(args, kwargs)
        if cache is not None:
            z = mx.zeros((x.shape[0], 1, x.shape[1], 0), dtype=x.dtype)
            cache.update_and_fetch(z, z)
        return x


def _split_generic(inner: nn.Module, rank: int, size: int, start: int, end: int) -> None:
    """mlx-lm's pipeline() for a family without one: the other ranks' layers become ``Skipped`` (their
    weights dropped unread), and the slice's ends and the last layer carry the communication."""
    n = len(inner.layers)
    for i in range(n):
        if not start <= i < end:
            inner.layers[i] = Skipped()

    def stage(i: int):
        recv = i == start and rank < size - 1
        send = i == end - 1 and rank != 0
        gather = i == n - 1 and size > 1

        def wrap(call, x, *args, **kwargs):
            if recv:
                x = mx.distributed.recv_like(x, rank + 1)
            h = call(x, *args, **kwargs)
            if send:
                h = mx.distributed.send(h, rank - 1)
                cache = _layer_cache(args, kwargs)
                if cache is not None:  # a prefill chunk evaluates only the cache: the send must be in it
                    cache.keys = mx.depends(cache.keys, h)
            if gather:
                h = mx.distributed.all_gather(h)[: h.shape[0]]
            return h

        return wrap

    for i in {start, end - 1, n - 1}:
        _hook(inner.layers[i], stage(i))
