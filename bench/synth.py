"""Random-weight MoE checkpoints with real expert shapes, at a chosen total size.

    python -m bench.synth --shape qwen3-next|mixtral --size 30GB --layout stacked|per-expert \\
        --routing random|uniform|skewed --out DIR

Shapes (4-bit affine, group 64; the number of layers is chosen to reach --size):
- ``qwen3-next``: mlx-lm's ``qwen3_moe`` class with Qwen3-Next-80B-A3B's expert
  shapes: hidden 2048, 512 experts of 3 x 2048x512 (1.77 MB with bf16 scales,
  1.97 MB with float32 scales), top-10.
- ``mixtral``: mlx-lm's ``mixtral`` class with Mixtral-8x7B's shapes: hidden 4096,
  8 experts of 3 x 4096x14336 (about 88 MB at 4 bits), top-2.
- ``tiny``, ``tiny-mixtral``: the same families in miniature (hidden 256) for tests.

Layouts: ``stacked`` is mlx-lm's own (``...switch_mlp.gate_proj.weight`` of shape
[experts, ...]); ``per-expert`` is the Hugging Face layout
(``block_sparse_moe.experts.{e}.w1/w2/w3`` for Mixtral), which mlx-lm stacks at
load time. mlx-lm's ``qwen3_moe`` stacks only the ``weight`` of per-expert
tensors, not quantization scales, so a per-expert quantized qwen3 checkpoint
is refused: no loader reads one.

Weights are random 4-bit codes with one affine scale per group chosen so each
weight is uniform in +-1/sqrt(fan_in), like mlx's Linear init; embeddings,
routers and the LM head stay in floating point. Nothing is ever quantized
from floats and tensors are generated and written one layer at a time (one
shard per layer), so a 30 GB checkpoint needs about one layer of memory.

Routing knobs (random weights do not route like trained models; see the
``routing`` block this tool writes into ``synth.json``, measured with
``moed.experts.routing`` unless ``--no-measure``):
- ``random``: plain random weights. Consecutive tokens reuse many experts
  (the residual stream changes slowly in a random network).
- ``uniform``: token embeddings scaled by ``--embed-scale`` (default 100), so
  each token's own embedding dominates the residual stream in every layer and
  routing follows the token: near-uniform expert use and token-to-token reuse
  near top_k/experts. The worst case for a cache.
- ``skewed``: a shared direction ``u`` is added to every token embedding
  (``--persist``, its weight relative to the embedding's own norm) and each
  router's row for the expert of popularity rank r (a random order per layer)
  gets ``-zipf * ln(r) * u / sqrt(hidden)``: routing logits carry a Zipf
  bias that is the same for every token, so a few experts per layer take
  most of the traffic and consecutive tokens keep them. ``--zipf`` sets the
  skew (0: none).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from bench import log
from bench.tokenizer import write_byte_tokenizer

GROUP_SIZE = 64
BITS = 4

_COMMON_QWEN = dict(
    model_type="qwen3_moe", decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1e6,
    tie_word_embeddings=False, max_position_embeddings=32768, norm_topk_prob=True,
)
SHAPES = {
    "qwen3-next": dict(_COMMON_QWEN, hidden_size=2048, intermediate_size=5120, num_attention_heads=16,
                       num_key_value_heads=2, head_dim=256, num_experts=512, num_experts_per_tok=10,
                       moe_intermediate_size=512),
    "mixtral": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                    rope_theta=1e6, tie_word_embeddings=False),
    "tiny": dict(_COMMON_QWEN, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
                 moe_intermediate_size=128),
    "tiny-mixtral": dict(model_type="mixtral", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                         rope_theta=1e6, tie_word_embeddings=False),
}
# Per-expert names on disk (Hugging Face layout) for the stacked projection names.
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
PER_EXPERT = {"mixtral": _MIXTRAL_NAMES, "tiny-mixtral": _MIXTRAL_NAMES}

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 30GB, 512MB)")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " "))


def _model(config: dict):
    """mlx-lm's own model object, quantized lazily: shapes and names only, no weight is computed."""
    import importlib

    import mlx.nn as nn

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    nn.quantize(model, group_size=GROUP_SIZE, bits=BITS,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith(".gate")
                and "embed_tokens" not in p and p != "lm_head")
    return model


def _layer_bytes(config: dict, scale_bytes: int) -> tuple[int, int, int]:
    """(bytes per layer, bytes outside the layers, bytes per expert) for ``config`` with one layer."""
    from mlx.utils import tree_flatten

    model = _model(dict(config, num_hidden_layers=1))
    per_layer = fixed = expert = 0
    for name, a in tree_flatten(model.parameters()):
        n = a.size * (scale_bytes if a.dtype != _uint32() else 4)
        if ".layers." in f".{name}":
            per_layer += n
            if "switch_mlp" in name:
                expert += n // a.shape[0]
        else:
            fixed += n
    return per_layer, fixed, expert


def _uint32():
    import mlx.core as mx

    return mx.uint32


def _values(name: str, shape: tuple, is_code: bool, dtype, hidden: int):
    """Random weights for one tensor: 4-bit codes, their affine scales/biases, or floats."""
    import mlx.core as mx

    if is_code:
        # Two 16-bit draws per word: randint's 32-bit draws leave the low bits (whole 4-bit codes) at zero.
        hi, lo = (mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32) for _ in range(2))
        return (hi << 16) | lo
    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype)
    if name.endswith(".scales") or name.endswith(".biases"):
        fan_in = shape[-1] * GROUP_SIZE
        a = 1 / math.sqrt(fan_in)
        # q in 0..15 maps to q*scale + bias, uniform over [-a, a]
        return mx.full(shape, 2 * a / (2**BITS - 1) if name.endswith(".scales") else -a, dtype)
    if "embed_tokens" in name:
        return (mx.random.normal(shape) * math.sqrt(1 / hidden)).astype(dtype)
    a = 1 / math.sqrt(shape[-1])
    return mx.random.uniform(-a, a, shape).astype(dtype)


def _route(weights: dict, routing: str, knobs: dict, u, hidden: int, dtype) -> None:
    """Apply the routing knob to the token embeddings and to every router (all in the routing shard)."""
    import mlx.core as mx

    emb = weights["model.embed_tokens.weight"].astype(mx.float32)
    if routing == "uniform":
        emb = emb * knobs["embed_scale"]
    elif routing == "skewed":
        own = mx.sqrt(mx.mean(mx.sum(emb * emb, axis=-1)))
        emb = emb + knobs["persist"] * own * u
    weights["model.embed_tokens.weight"] = emb.astype(dtype)
    if routing != "skewed" or knobs["zipf"] == 0:
        return
    for gate in sorted(k for k in weights if k.endswith(".gate.weight")):
        w = weights[gate].astype(mx.float32)
        rank = mx.random.permutation(w.shape[0]) + 1  # a different popular set in every layer
        bias = -knobs["zipf"] * mx.log(rank.astype(mx.float32))
        weights[gate] = (w + bias[:, None] * u[None, :] / math.sqrt(hidden)).astype(dtype)


def split_per_expert(weights: dict, names: dict) -> dict:
    """Stacked expert tensors (``...switch_mlp.{proj}.{weight,scales,biases}``, experts first)
    in the Hugging Face per-expert layout: ``...experts.{e}.{names[proj]}.{part}``."""
    out = {}
    for k, v in weights.items():
        m = re.fullmatch(r"(.*)\.switch_mlp\.(\w+)\.(weight|scales|biases)", k)
        if not m:
            out[k] = v
            continue
        prefix, proj, part = m.groups()
        for e in range(v.shape[0]):
            out[f"{prefix}.experts.{e}.{names[proj]}.{part}"] = v[e]
    return out


def generate(out: Path, *, shape: str = "qwen3-next", size: int | None = None, layers: int | None = None,
             layout: str = "stacked", routing: str = "random", embed_scale: float = 100.0, persist: float = 1.0,
             zipf: float = 1.0, dtype: str | None = None, seed: int = 0, variant_of: Path | None = None,
             progress=print) -> dict:
    """Write the checkpoint to ``out``; returns its description (also written to ``out/synth.json``).

    Embeddings and routers, the only tensors the routing knobs touch, go to the first shard; each
    layer's other tensors to a shard of its own, drawn from a seed of their own. ``variant_of``: a
    checkpoint made with the same shape, size, layout, dtype and seed whose layer shards are
    hard-linked instead of generated again (another routing of the same experts, at no disk cost).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from moed.models import expert_count

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    if layout == "per-expert" and shape not in PER_EXPERT:
        raise ValueError(f"per-expert layout is offered for {', '.join(PER_EXPERT)}: mlx-lm's {SHAPES[shape]['model_type']} "
                         "does not stack per-expert quantization scales, so no loader could read it")
    if layout not in ("stacked", "per-expert"):
        raise ValueError(f"unknown layout {layout!r}")
    if routing not in ("random", "uniform", "skewed"):
        raise ValueError(f"unknown routing {routing!r}")
    if dtype is None:
        # float32 scales on the CPU backend (bf16 there is 8-10x slower, FACTS.md); bf16 on GPUs.
        dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    fdt = getattr(mx, dtype)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tok = write_byte_tokenizer(out)
    config = dict(SHAPES[shape], vocab_size=tok["model_vocab"],
                  quantization={"group_size": GROUP_SIZE, "bits": BITS})
    per_layer, fixed, expert = _layer_bytes(config, fdt.size)
    if layers is None:
        if size is None:
            raise ValueError("give --size or --layers")
        layers = max(1, round((size - fixed) / per_layer))
    config["num_hidden_layers"] = layers
    model = _model(config)
    params = dict(tree_flatten(model.parameters()))
    hidden = config["hidden_size"]
    mx.random.seed(seed)
    u = mx.random.normal((hidden,))
    u = u / mx.linalg.norm(u)
    knobs = {"embed_scale": embed_scale, "persist": persist, "zipf": zipf}
    base = None
    if variant_of is not None:
        base = json.loads((Path(variant_of) / "synth.json").read_text())
        mine = {"shape": shape, "layout": layout, "float_dtype": dtype, "seed": seed, "layers": layers}
        if {k: base[k] for k in mine} != mine:
            raise ValueError(f"{variant_of} differs from this checkpoint in {mine} vs { {k: base[k] for k in mine} }")

    routing_keys = [k for k in params if ".layers." not in f".{k}" or k.endswith(".gate.weight")]
    groups = [routing_keys] + [[k for k in params if k.startswith(f"model.layers.{i}.") and k not in routing_keys]
                               for i in range(layers)]
    weight_map, total, t0 = {}, 0, time.perf_counter()
    for g, names in enumerate(groups):
        name = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        if g > 0 and base is not None:
            os.link(Path(variant_of) / name, out / name)
            keys = [k for k, f in json.loads((Path(variant_of) / "model.safetensors.index.json").read_text())["weight_map"].items() if f == name]
            weight_map.update(dict.fromkeys(keys, name))
            total += (out / name).stat().st_size
            continue
        mx.random.seed(seed * 1_000_003 + g)  # each shard's draws do not depend on the others
        weights = {k: _values(k, params[k].shape, params[k].dtype == mx.uint32, fdt, hidden) for k in names}
        if g == 0:
            _route(weights, routing, knobs, u, hidden, fdt)
        if layout == "per-expert":
            weights = split_per_expert(weights, PER_EXPERT[shape])
        mx.eval(weights)
        mx.save_safetensors(str(out / name), weights, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(weights, name))
        total += (out / name).stat().st_size
        del weights
        mx.clear_cache()
        if g == 0 or g == len(groups) - 1 or g % 4 == 0:
            rate = total / (time.perf_counter() - t0) / 1e9
            progress(f"synth: shard {g + 1}/{len(groups)}, {total / 1e9:.2f} GB written ({rate:.2f} GB/s)")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    experts = expert_count(config)
    info = {
        "shape": shape, "layout": layout, "routing": routing, "knobs": knobs, "seed": seed, "float_dtype": dtype,
        "layers": layers, "experts_per_layer": experts, "top_k": config["num_experts_per_tok"],
        "bytes": total, "expert_bytes": expert, "layer_bytes": per_layer, "non_expert_bytes": total - expert * experts * layers,
        "write_s": time.perf_counter() - t0,
    }
    (out / "synth.json").write_text(json.dumps(info, indent=1))
    return info


def measure_routing(model_dir: Path, tokens: int = 64, sequences: int = 4, seed: int = 0) -> dict:
    """Routing statistics (``moed.experts.routing``) of the checkpoint on random byte sequences."""
    import mlx.core as mx
    import mlx_lm

    try:
        from moed.experts.routing import routing_statistics
    except ImportError:
        return {"not_measured": "moed.routing missing"}
    model, tokenizer = mlx_lm.load(str(model_dir))
    vocab = model.args.vocab_size
    mx.random.seed(seed)
    seqs = [mx.random.randint(0, vocab, (tokens,)).tolist() for _ in range(sequences)]
    stats = routing_statistics(model, seqs)
    return stats["summary"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-next")
    ap.add_argument("--size", type=parse_size, help="total checkpoint size, e.g. 30GB (sets the number of layers)")
    ap.add_argument("--layers", type=int, help="number of layers (instead of --size)")
    ap.add_argument("--layout", choices=["stacked", "per-expert"], default="stacked")
    ap.add_argument("--routing", choices=["random", "uniform", "skewed"], default="random")
    ap.add_argument("--embed-scale", type=float, default=100.0, help="uniform: factor on token embeddings")
    ap.add_argument("--persist", type=float, default=1.0, help="skewed: weight of the shared direction in embeddings")
    ap.add_argument("--zipf", type=float, default=1.0, help="skewed: Zipf exponent of the router bias")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="scales, biases and float weights "
                    "(default: float32 on CPU, bfloat16 on a GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant-of", type=Path, help="hard-link the layer shards of this checkpoint (same shape, "
                    "size, layout, dtype, seed) and write only embeddings and routers for --routing")
    ap.add_argument("--no-measure", action="store_true", help="skip the routing statistics")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    info = generate(args.out, shape=args.shape, size=args.size, layers=args.layers, layout=args.layout,
                    routing=args.routing, embed_scale=args.embed_scale, persist=args.persist, zipf=args.zipf,
                    dtype=args.dtype, seed=args.seed, variant_of=args.variant_of, progress=log)
    if not args.no_measure:
        log("synth: measuring routing")
        info["routing_stats"] = measure_routing(args.out)
        (args.out / "synth.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
