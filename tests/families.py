"""Small random checkpoints of the MoE families moed supports, in their real
on-disk layouts, built with mlx-lm's own model classes.

| name       | mlx-lm class | expert module              | on disk                                   | router    |
|------------|--------------|----------------------------|-------------------------------------------|-----------|
| qwen3_moe  | qwen3_moe    | mlp.switch_mlp             | stacked, 4-bit, 1 shard                   | linear    |
| mixtral    | mixtral      | block_sparse_moe.switch_mlp| per expert experts.{e}.w1/w2/w3, 4-bit, 2 shards + index | linear |
| glm4_moe   | glm4_moe     | mlp.switch_mlp             | per expert experts.{e}.gate_proj.., float32, dense layer 0, shared expert | MoEGate |
| kimi       | kimi_k25 (deepseek_v3) | language_model.model.layers.N.mlp.switch_mlp | stacked, 4-bit, dense layer 0, shared expert | MoEGate |
| gpt_oss    | gpt_oss      | mlp.experts (with biases)  | stacked, 4-bit, sliding-window layers     | linear (biased) |

Scales are float32 (4-bit with bf16 scales is ~10x slower on MLX's CPU backend).
Routing of random weights collapses onto a few experts, so builders scale the
router weights up until tokens spread over most experts, which is what makes
the 25% / 50% capacity tests actually miss.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

FAMILIES = ("qwen3_moe", "mixtral", "glm4_moe", "kimi", "gpt_oss")

from bench.synth import split_per_expert  # noqa: E402  (one expert splitting for tests and bench)
from bench.tokenizer import write_tokenizer  # noqa: E402  (one tokenizer recipe for tests and bench)


def _configs(tok: dict) -> dict:
    common = dict(vocab_size=tok["vocab_size"], eos_token_id=tok["eos_token_id"], rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=512)
    return {
        "qwen3_moe": dict(common, model_type="qwen3_moe", hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
                          num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=64,
                          norm_topk_prob=True),
        "mixtral": dict(common, model_type="mixtral", hidden_size=64, num_hidden_layers=3, intermediate_size=64,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
        "glm4_moe": dict(common, model_type="glm4_moe", hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                         moe_intermediate_size=32, norm_topk_prob=True, num_attention_heads=4, n_group=1,
                         head_dim=16, topk_group=1, n_shared_experts=1, n_routed_experts=16,
                         routed_scaling_factor=2.5, num_experts_per_tok=4, first_k_dense_replace=1,
                         num_key_value_heads=2, rope_scaling=None, use_qk_norm=True, attention_bias=False,
                         partial_rotary_factor=0.5),
        "kimi": dict(model_type="kimi_k25", tie_word_embeddings=False, eos_token_id=tok["eos_token_id"],
                     text_config=dict(model_type="deepseek_v3", vocab_size=tok["vocab_size"], hidden_size=64,
                                      intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                                      n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=32,
                                      q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16,
                                      n_group=1, topk_group=1, num_experts_per_tok=4, first_k_dense_replace=1,
                                      max_position_embeddings=512, rope_scaling=None)),
        "gpt_oss": dict(common, model_type="gpt_oss", num_hidden_layers=2, num_local_experts=16,
                        num_experts_per_tok=4, hidden_size=64, intermediate_size=64, head_dim=16,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
    }


# which layout each family is stored in, and its per-expert projection names
_PER_EXPERT = {"mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
               "glm4_moe": {"gate_proj": "gate_proj", "down_proj": "down_proj", "up_proj": "up_proj"}}
_QUANTIZED = {"qwen3_moe", "mixtral", "kimi", "gpt_oss"}
_SHARDS = {"mixtral": 2}


def _spread_routing(model: nn.Module, scale: float) -> None:
    """Sharpen routers so random tokens use many different experts."""
    for path, mod in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if name in ("gate", "router") and "weight" in mod and mod.weight.ndim == 2 and not isinstance(mod, nn.QuantizedLinear):
            if "e_score_correction_bias" in mod:  # MoEGate starts at zeros: give it a real choice
                mod.weight = mx.random.normal(mod.weight.shape) * 0.5
            else:
                mod.weight = mod.weight * scale


def save_shards(out: Path, weights: dict, shards: int = 1) -> None:
    keys = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[i::shards]}
        mx.save_safetensors(str(out / name), part, metadata={"format": "mlx"})
        weight_map.update({k: name for k in part})
    total = sum(v.nbytes for v in weights.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def build(family: str, out: Path, seed: int = 0) -> Path:
    from mlx_lm.utils import _get_classes, quantize_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out)
    config = _configs(tok)[family]
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    _spread_routing(model, 8.0)
    if family in _QUANTIZED:
        model, config = quantize_model(model, config, group_size=32, bits=4)
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    if family in _PER_EXPERT:
        weights = split_per_expert(weights, _PER_EXPERT[family])
    save_shards(out, weights, _SHARDS.get(family, 1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def build_dense(out: Path) -> Path:
    """A tiny dense llama: no experts at all."""
    from mlx_lm.utils import _get_classes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out)
    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=tok["vocab_size"],
                  rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=tok["eos_token_id"])
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    save_shards(out, dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def assert_slots_consistent(manager) -> None:
    """No slot left reserved by a failed load, and every filled slot is the one its expert maps to."""
    for c in manager.caches:
        assert not c.loading.any(), "a failed read left a slot reserved"
        for s, e in enumerate(c.expert_in):
            if e >= 0:
                assert c.slot_of[e] == s
