"""moed.experts.families: the one MoE detector, and every caller finding gpt_oss
through it (its experts are ``mlp.experts``, not a ``switch_mlp``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

mx = pytest.importorskip("mlx.core")
import families  # noqa: E402
import mlx_lm  # noqa: E402

from moed.experts import families as detect  # noqa: E402
from moed.experts import load_model, routing  # noqa: E402

LAYERS, EXPERTS = 2, 16  # tests/families.py's gpt_oss


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    return families.build("gpt_oss", tmp_path_factory.mktemp("gpt_oss") / "gpt_oss")


def test_sites_routers_and_norms_of_gpt_oss(gpt_oss):
    model, _ = mlx_lm.load(str(gpt_oss), lazy=True)
    sites = detect.find_moe_sites(model)
    assert [(s.layer, s.path, s.num_experts) for s in sites] == [
        (i, f"model.layers.{i}.mlp.experts", EXPERTS) for i in range(LAYERS)]
    assert detect.experts_per_layer(model) == EXPERTS
    for s in sites:
        assert detect.find_router(s.block, s.num_experts) is s.block.router
        assert detect.find_pre_expert_norm(s) is s.layer_module.post_attention_layernorm


def test_routing_statistics_find_gpt_oss(gpt_oss):
    model, _ = mlx_lm.load(str(gpt_oss))
    assert [i for i, _ in routing.moe_blocks(model)] == list(range(LAYERS))
    stats = routing.routing_statistics(model, [[1, 2, 3, 4, 5, 6]])
    assert [(l["layer"], l["experts"], l["tokens"]) for l in stats["layers"]] == [(i, EXPERTS, 6) for i in range(LAYERS)]
    # the recorder is gone again: the same sites are found
    assert [s.switch for s in detect.find_moe_sites(model)] == [layer.mlp.experts for layer in model.model.layers]


def test_lazy_experts_prefetcher_and_bench_find_gpt_oss(gpt_oss):
    from bench.experts_bench import experts_per_layer

    assert experts_per_layer(gpt_oss) == EXPERTS
    model, _, manager = load_model(gpt_oss, capacity=EXPERTS // 4, profile=None, warm_start=False)
    try:
        assert [c.layer for c in manager.caches] == list(range(LAYERS))
        assert all(r is not None for r in manager.prefetcher.routers)
        assert all(n is not None for n in manager.prefetcher.norms)
        # a lazy model's wrapped expert modules are not found a second time
        assert detect.find_moe_sites(model) == []
    finally:
        manager.close()


def test_a_dense_model_has_no_sites(tmp_path):
    model, _ = mlx_lm.load(str(families.build_dense(tmp_path / "dense")), lazy=True)
    assert detect.find_moe_sites(model) == [] and detect.experts_per_layer(model) == 0
    with pytest.raises(detect.NotMoEError):
        detect.require_moe_sites(model, "dense")
    with pytest.raises(detect.NotMoEError):
        with routing.record_routing(model):
            pass
