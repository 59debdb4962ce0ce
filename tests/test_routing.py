"""moed.routing: the statistics themselves, the recorder, and the shipped model's routing."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from moed.experts import routing  # noqa: E402
from moed.models import embedded_model_path  # noqa: E402

TEXTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n        if os.path.exists(arg):\n            print(arg)\n    return 0\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
]


@pytest.fixture(scope="module")
def loaded():
    return mlx_lm.load(str(embedded_model_path()))


def test_entropy_and_top_share_on_known_counts():
    assert routing.normalized_entropy(np.ones(16)) == pytest.approx(1.0)
    assert routing.normalized_entropy(np.eye(16)[3] * 50) == 0.0
    half = np.array([1] * 8 + [0] * 8)
    assert routing.normalized_entropy(half) == pytest.approx(math.log(8) / math.log(16))
    assert routing.top_share(np.ones(16)) == pytest.approx(0.25)
    assert routing.top_share(np.array([10, 0, 0, 0, 0, 0, 0, 0])) == 1.0
    assert routing.top_share(np.array([4, 3, 2, 1, 0, 0, 0, 0])) == pytest.approx(0.7)


def test_token_reuse_counts_shared_experts():
    seq = np.array([[0, 1], [1, 2], [3, 4], [4, 3]])
    # shared with the previous token: {1} -> 1/2, {} -> 0, {3, 4} -> 1
    assert routing.token_reuse(seq) == pytest.approx((0.5 + 0 + 1) / 3)
    assert math.isnan(routing.token_reuse(seq[:1]))


def test_recorder_is_removed_afterwards_even_after_an_error(loaded):
    model, _ = loaded
    before = [block.switch_mlp for _, block in routing.moe_blocks(model)]
    with pytest.raises(RuntimeError):
        with routing.record_routing(model) as log:
            model(mx.array([[1, 2, 3]]))
            assert all(len(calls) == 1 and calls[0].shape == (1, 3, calls[0].shape[-1]) for calls in log.values())
            raise RuntimeError("boom")
    assert [block.switch_mlp for _, block in routing.moe_blocks(model)] == before


def test_teacher_forced_routing_matches_token_by_token_decode(loaded):
    model, tokenizer = loaded
    tokens = tokenizer.encode(TEXTS[0])[:24]
    with routing.record_routing(model) as log:
        model(mx.array(tokens)[None])
        forced = {i: np.array(calls[0]).reshape(len(tokens), -1) for i, calls in log.items()}
        for calls in log.values():
            calls.clear()
        cache = make_prompt_cache(model)
        for t in tokens:
            mx.eval(model(mx.array([[t]]), cache=cache))
        stepped = {i: np.concatenate([np.array(c).reshape(1, -1) for c in calls]) for i, calls in log.items()}
    agree = [np.mean([set(a) == set(b) for a, b in zip(forced[i], stepped[i])]) for i in forced]
    assert min(agree) >= 0.9, agree


def test_shipped_model_routing_is_skewed_and_persistent(loaded):
    model, tokenizer = loaded
    stats = routing.text_statistics(model, tokenizer, TEXTS)
    layers = stats["layers"]
    assert len(layers) >= 4
    for layer in layers:
        assert layer["experts"] >= 16 and 2 <= layer["top_k"] <= 4
        assert layer["tokens"] == sum(len(tokenizer.encode(t)) for t in TEXTS)
        assert 0.0 < layer["normalized_entropy"] <= 1.0
        assert layer["experts_used"] > 1  # no collapse onto one expert
    below = sum(layer["normalized_entropy"] < 0.95 for layer in layers)
    assert below > len(layers) / 2, [l["normalized_entropy"] for l in layers]
    assert stats["summary"]["mean_token_reuse"] > layers[0]["uniform_reuse"]
    import json

    json.dumps(stats)  # JSON-safe for status and bench output
