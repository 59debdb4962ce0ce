"""Where the experts are in an mlx-lm MoE model: the one detector everyone uses
(lazy experts, the prefetcher, routing statistics, profiles, the benchmarks).

Detection is structural, so every mlx-lm MoE family is found without a table of
names: any module holding two or more (Quantized)SwitchLinear children with the
same number of experts is a stacked expert module (``switch_mlp`` in
Qwen/DeepSeek/GLM/Kimi, ``block_sparse_moe.switch_mlp`` in Mixtral, ``experts``
in GPT-OSS/Llama 4). Its parent is the MoE block (router + experts), and the
block's parent the decoder layer.

The same count read from config.json, with no MLX, is ``moed.models.expert_count``:
the front and ``moectl`` need it and never import MLX.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .store import layer_index


class NotMoEError(ValueError):
    """The model has no expert layers to make lazy."""


@dataclass
class MoESite:
    layer: int
    path: str  # module path of the stacked expert module
    parent: nn.Module
    attr: str
    switch: nn.Module
    block: nn.Module  # the MoE block (router + experts)
    num_experts: int
    layer_module: nn.Module | None = None  # the decoder layer holding the block

    def swap(self, module: nn.Module) -> None:
        """Put ``module`` where the expert module is (a wrapper, or the original back)."""
        setattr(self.parent, self.attr, module)


def projections(module) -> dict[str, nn.Module]:
    """The stacked expert projections of an expert module, by name."""
    return {k: v for k, v in module.children().items() if isinstance(v, (SwitchLinear, QuantizedSwitchLinear))}


def find_moe_sites(model: nn.Module) -> list[MoESite]:
    """Every stacked expert module of ``model``, in layer order. Modules already
    wrapped by moed (a class with ``wraps_experts`` set) are skipped."""
    modules = dict(model.named_modules())
    sites = []
    for path, mod in modules.items():
        if getattr(type(mod), "wraps_experts", False) or len(projections(mod)) < 2:
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        if getattr(type(parent), "wraps_experts", False):
            continue
        layer = layer_index(path)
        if layer is None:
            continue
        n = {p.weight.shape[0] for p in projections(mod).values()}
        if len(n) != 1:
            continue
        grand = modules.get(parent_path.rpartition(".")[0]) if parent_path else None
        sites.append(MoESite(layer, path, parent, attr, mod, parent, n.pop(), grand))
    return sorted(sites, key=lambda s: s.layer)


def require_moe_sites(model: nn.Module, where) -> list[MoESite]:
    """``find_moe_sites``, or ``NotMoEError`` naming ``where`` for a dense model."""
    sites = find_moe_sites(model)
    if not sites:
        raise NotMoEError(f"{where}: no mixture-of-experts layers found (a dense model cannot use expert offloading)")
    return sites


def experts_per_layer(model: nn.Module) -> int:
    """The most experts any MoE layer of ``model`` has (0 for a dense model)."""
    return max((s.num_experts for s in find_moe_sites(model)), default=0)


def find_router(block: nn.Module, num_experts: int):
    """The router of an MoE block: a linear layer with one output per expert, or
    a MoEGate-style module (``gate``) returning ``(indices, scores)``."""
    for name, child in block.children().items():
        if isinstance(child, (nn.Linear, nn.QuantizedLinear)) and child.weight.shape[0] == num_experts:
            return child
    gate = block.get("gate") if hasattr(block, "get") else None
    return gate if isinstance(gate, nn.Module) else None


def find_pre_expert_norm(site: MoESite):
    """The RMSNorm the decoder layer applies before its MoE block
    (``post_attention_layernorm`` in every mlx-lm MoE family), or None."""
    norm = site.layer_module.get("post_attention_layernorm") if site.layer_module is not None else None
    return norm if isinstance(norm, nn.RMSNorm) else None
