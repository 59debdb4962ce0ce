"""The models on this machine: the embedded one and the MoE snapshots in the Hugging Face cache.

What ``moectl list`` and ``show`` print comes from config.json and the safetensors
headers alone (a JSON prefix of each file): nothing is loaded, MLX is never imported.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from moed import models, platform

# The whole model "fits" when it leaves a quarter of RAM for the OS, KV caches and the rest.
FIT_FRACTION = 0.75
# A suggested expert budget keeps this many times each layer's top-k experts resident, at least.
MIN_SLOTS_PER_TOP_K = 2
_EXPERT_TENSOR_MARKS = (".switch_mlp.", ".experts.", ".block_sparse_moe.")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token")


@dataclass
class ModelInfo:
    name: str  # "embedded" or the hub repo id
    path: str
    size_bytes: int
    model_type: str | None
    layers: int | None
    experts: int
    top_k: int | None
    quantization: str  # "4-bit", "bf16", ...
    fits_in_ram: bool | None

    def to_dict(self) -> dict:
        return asdict(self)


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, read now (its constants are fixed at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _section_value(config: dict, keys: tuple[str, ...]) -> int | None:
    for section in (config, config.get("text_config") or {}, config.get("language_config") or {}):
        if isinstance(section, dict):
            for key in keys:
                value = section.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
    return None


def quantization(config: dict) -> str:
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and isinstance(q.get("bits"), int):
        return f"{q['bits']}-bit"
    dtype = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("torch_dtype")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(str(dtype), str(dtype) if dtype else "?")


def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in the safetensors files of ``path``, from their headers."""
    sizes: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise models.ModelError(f"cannot read the safetensors header of {file}: {e}") from None
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                start, end = entry["data_offsets"]
                sizes[name] = end - start
    return sizes


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def describe(path: Path, name: str | None = None, ram: int | None = None) -> ModelInfo:
    config = models.read_config(path)
    size = model_bytes(path)
    ram = platform.total_memory_bytes() if ram is None else ram
    return ModelInfo(
        name=name or models.display_name(path),
        path=str(path),
        size_bytes=size,
        model_type=config.get("model_type"),
        layers=_section_value(config, _LAYER_KEYS),
        experts=models.expert_count(config),
        top_k=_section_value(config, _TOP_K_KEYS),
        quantization=quantization(config),
        fits_in_ram=None if not ram else size <= FIT_FRACTION * ram,
    )


def expert_figures(path: Path, info: ModelInfo, ram: int | None = None) -> dict:
    """Bytes per expert, what the experts and the rest weigh, and a suggested ``memory_budget``.

    The suggestion: no budget (the whole model in memory) when it fits; else what RAM
    leaves after the dense weights, at least MIN_SLOTS_PER_TOP_K x top-k experts per layer.
    """
    sizes = tensor_bytes(path)
    expert_total = sum(n for name, n in sizes.items() if any(m in name for m in _EXPERT_TENSOR_MARKS))
    moe_layers = len({name.split(".layers.", 1)[1].split(".", 1)[0] for name in sizes
                      if ".layers." in name and any(m in name for m in _EXPERT_TENSOR_MARKS)})
    per_expert = expert_total // (moe_layers * info.experts) if moe_layers and info.experts else None
    dense = sum(sizes.values()) - expert_total
    ram = platform.total_memory_bytes() if ram is None else ram
    suggested = None
    if per_expert and ram and not info.fits_in_ram:
        floor = MIN_SLOTS_PER_TOP_K * (info.top_k or 1) * moe_layers * per_expert
        suggested = max(floor, min(expert_total, int(FIT_FRACTION * ram) - dense))
    return {"bytes_per_expert": per_expert, "moe_layers": moe_layers, "expert_bytes": expert_total,
            "dense_bytes": dense, "ram_bytes": ram, "suggested_memory_budget": suggested}


def cached_repos() -> list:
    """huggingface_hub's view of the model repos in the cache (``CachedRepoInfo``), none if there is no cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        return []
    return sorted((r for r in info.repos if r.repo_type == "model"), key=lambda r: r.repo_id)


def newest_snapshot(repo) -> Path | None:
    revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
    return Path(revisions[0].snapshot_path) if revisions else None


def list_models(ram: int | None = None) -> list[ModelInfo]:
    """The embedded model, then every cached hub model whose config names routed experts."""
    found = [describe(models.embedded_model_path(), "embedded", ram)]
    for repo in cached_repos():
        snapshot = newest_snapshot(repo)
        if snapshot is None or not (snapshot / "config.json").is_file():
            continue
        try:
            info = describe(snapshot, repo.repo_id, ram)
        except models.ModelError:
            continue  # a broken config.json is not a model to list
        if info.experts:
            found.append(info)
    return found


def find(spec: str) -> tuple[Path, str]:
    """(directory, name) of a model named as moectl's users name it, without downloading anything."""
    if spec in ("", "embedded"):
        return models.embedded_model_path(), "embedded"
    local = Path(spec).expanduser()
    if local.is_dir():
        return local, models.display_name(local)
    for repo in cached_repos():
        if repo.repo_id == spec:
            snapshot = newest_snapshot(repo)
            if snapshot is not None:
                return snapshot, spec
    raise models.ModelError(f"no model {spec!r} on this machine (`moectl list` shows them; `moectl pull {spec}` downloads one)")


def delete_plan(repo_id: str):
    """(huggingface_hub's DeleteCacheStrategy for every revision of ``repo_id``, its size) for ``moectl rm``."""
    for repo in cached_repos():
        if repo.repo_id == repo_id:
            from huggingface_hub import scan_cache_dir

            strategy = scan_cache_dir(hub_cache_dir()).delete_revisions(*(r.commit_hash for r in repo.revisions))
            return strategy, repo.size_on_disk
    raise models.ModelError(f"{repo_id} is not in the Hugging Face cache ({hub_cache_dir()})")
