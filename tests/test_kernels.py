"""kernels.SameKernel: a lazy call padded or split into stock's kernel class keeps every pair's output.

On the CPU MLX has one gather kernel, so these tests check the mechanics (which
calls are changed, and that padding and splitting give each pair exactly its
unchanged output); the kernel choice itself is checked on a GPU by the
benchmarks' token agreement with stock.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from moed.experts.kernels import SameKernel, threshold


class Spy:
    """A switch module that records the pair count of every call it gets."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, indices):
        self.calls.append(indices.size)
        return self.inner(x, indices)


@pytest.fixture(scope="module")
def switch():
    mx.random.seed(3)
    glu = SwitchGLU(64, 32, 16)
    nn.quantize(glu, group_size=32, bits=4)
    mx.eval(glu.parameters())
    return glu


def test_thresholds_follow_mlx_dispatch():
    assert threshold("cpu", True, 512) is None
    assert threshold("cuda", True, 512) == 8
    assert threshold("cuda", False, 512) == 64
    assert threshold("metal", True, 512) == 2048
    assert threshold("metal", True, 8) == 64
    assert threshold("metal", False, 8) == 64


@pytest.mark.parametrize("backend_name, tokens, k, like, slots, padded, split", [
    ("cuda", 1, 2, 20, 16, True, False),   # a 2-pair piece of a 20-pair chunk: padded to 8 pairs
    ("cuda", 1, 2, None, 16, False, False),  # a 2-pair call alone: vector kernel like stock's
    ("cuda", 6, 2, None, 4, False, False),   # same pair count as stock: nothing to change
    ("metal", 40, 2, None, 4, False, True),  # 80 pairs over 4 slots would go rhs, over 512 experts not
    ("metal", 3, 1, 4096, 4, True, False),   # stock's chunk goes rhs, a 3-pair piece must too
    ("cpu", 3, 1, 4096, 4, False, False),
])
def test_pairs_keep_their_output(switch, backend_name, tokens, k, like, slots, padded, split):
    x = mx.random.normal((1, tokens, 64))
    indices = mx.array(np.random.default_rng(tokens).integers(0, 16, (1, tokens, k)).astype(np.uint32))
    spy = Spy(switch)
    same = SameKernel(spy, 512, slots, quantized=True, backend_name=backend_name)
    y = same(x, indices, like=like)
    mx.eval(y)
    assert y.shape == (1, tokens, k, 64)
    assert np.array_equal(np.array(y), np.array(switch(x, indices)))
    assert (same.padded, same.split) == (int(padded), int(split))
    at = threshold(backend_name, True, slots)
    if padded:
        assert spy.calls == [at if at % k == 0 else (at // k + 1) * k]
    if split:
        assert len(spy.calls) > 1 and max(spy.calls) < at
