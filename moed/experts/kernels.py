"""Making a lazy expert call run the gather kernel stock mlx-lm's call runs.

Exact output needs more than the right experts: MLX picks one of several
``gather_qmm`` / ``gather_mm`` kernels from the call's shape, and they do not
round alike. Stock computes a layer's (token, k) pairs in one call over all E
experts; moed computes them over E' cache slots (token-major) or a piece at a
time (expert-major prefill, streaming.py), so a kernel picked from the pair
count or from the pairs per expert can differ from stock's. Measured on an
H100: pieces of under 8 pairs took ``gather_qmv`` where stock's chunk took the
tiled kernel, and greedy output drifted from stock's after about 50 tokens.

MLX 0.32's choice, per backend (mlx/backend/*/quantized.cpp, matmul.cpp), with
``sorted`` meaning mlx-lm's SwitchGLU/SwitchMLP sorted the pairs (64 or more):

- CPU: one kernel.
- CUDA, quantized: ``gather_qmv`` under 8 pairs, else the tiled kernel.
- Metal, quantized: ``gather_qmm_rhs`` when sorted and pairs // E >= 4, else ``gather_qmv``.
- CUDA and Metal, unquantized: the grouped (rhs) kernel when sorted, else ``gather_mv``.

Every rule is "at least so many pairs" (over so many experts), so a call is
put in stock's class by padding it with copies of its first token (results
dropped) or by splitting it into calls below the threshold. Each pair's
arithmetic is then the one stock's call does. The CUDA rule was checked on an
H100 (bench/results); the Metal rules are read from MLX's source, not run here.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx

SORT_AT = 64  # mlx-lm's SwitchGLU / SwitchMLP sort the pairs at this many


def backend() -> str:
    """The backend the default device computes on: "cpu", "cuda" or "metal". ``MOED_STOCK_KERNELS=off``
    (diagnostics: to measure what the matching is for) treats every backend as the CPU's."""
    if mx.default_device().type != mx.DeviceType.gpu or os.environ.get("MOED_STOCK_KERNELS") == "off":
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def threshold(backend_name: str, quantized: bool, experts: int) -> int | None:
    """The fewest pairs at which a call over ``experts`` experts takes the batched kernel
    (None: one kernel whatever the count)."""
    if backend_name == "cpu":
        return None
    if not quantized:
        return SORT_AT
    if backend_name == "cuda":
        return 8
    return max(SORT_AT, 4 * experts)  # metal: sorted and pairs // experts >= 4


class SameKernel:
    """A switch module's forward whose calls over cache slots pick the kernel that
    stock's call over every expert picks. ``like``: the pairs of stock's call
    (default: the call's own)."""

    def __init__(self, inner, num_experts: int, slots: int, quantized: bool, backend_name: str | None = None):
        self.inner = inner
        self.backend = backend_name or backend()
        self.stock_at = threshold(self.backend, quantized, num_experts)
        self.slots_at = threshold(self.backend, quantized, slots)
        self.padded = self.split = 0  # calls changed (the tests read them)

    def __call__(self, x, indices, like: int | None = None):
        if self.stock_at is None:
            return self.inner(x, indices)
        pairs = indices.size
        want = (pairs if like is None else like) >= self.stock_at
        if (pairs >= self.slots_at) == want:
            return self.inner(x, indices)
        k = indices.shape[-1]
        xs, ids = x.reshape(-1, x.shape[-1]), indices.reshape(-1, k)
        rows = ids.shape[0]
        if want:  # too few pairs for the batched kernel: pad with copies of the first token
            self.padded += 1
            extra = math.ceil(self.slots_at / k) - rows
            head = mx.zeros((extra,), dtype=mx.uint32)
            y = self.inner(mx.concatenate([xs, xs[head]]), mx.concatenate([ids, ids[head]]))[:rows]
        else:  # too many for the vector kernel: calls of fewer pairs each
            self.split += 1
            step = max(1, (self.slots_at - 1) // k)
            y = mx.concatenate([self.inner(xs[i:i + step], ids[i:i + step]) for i in range(0, rows, step)])
        return y.reshape(*indices.shape, y.shape[-1])
