"""Which model the daemon serves: the embedded default, a local path, or a hub repo id."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

EMBEDDED_DIR = Path(__file__).parent / "embedded" / "model"

# What mlx-lm needs to load and run a checkpoint; anything else in a repo (other weight formats, images) is skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]

# config.json keys that give the number of routed experts, across the families mlx-lm supports.
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_layer")

Progress = Callable[[str, "float | None"], None]  # (message, fraction done or None)


class ModelError(Exception):
    """A model that cannot be served, with a message meant for a person."""


def embedded_model_path() -> Path:
    return EMBEDDED_DIR


def resolve_model(spec: str | None, progress: Progress | None = None) -> Path:
    """A local directory holding config.json and safetensors of a Mixture-of-Experts model.

    ``None`` means the embedded model. A path that exists is used as is; a
    spec that looks like a path but does not exist is an error; anything else
    is a Hugging Face repo id, fetched (or found in the cache) with
    huggingface_hub. ``progress`` receives download progress; without it the
    hub's own progress bars go to stderr.
    """
    if spec is None or spec == "":
        path = embedded_model_path()
        if not path.is_dir():
            raise ModelError(f"the embedded model is missing from {path}: reinstall moed, or pass --model")
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            if _looks_like_path(spec):
                raise ModelError(f"no such model directory: {path}")
            path = download(spec, progress=progress)
    if not path.is_dir():
        raise ModelError(f"{path} is not a directory: a model is a directory with config.json and *.safetensors")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not an mlx-lm model directory")
    check_moe(path)
    return path


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything with more parts or a path prefix is meant as a path.
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1


def offline() -> bool:
    """Whether the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` or hub's own setting)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def download(repo_id: str, progress: Progress | None = None) -> Path:
    """The snapshot of ``repo_id`` in the Hugging Face cache, downloading what is missing unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    is_offline = offline()
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=HUB_PATTERNS,
                local_files_only=is_offline,
                tqdm_class=_tqdm_reporting_to(progress) if progress else None,
            )
        )
    except HFValidationError:
        raise ModelError(f"{repo_id!r} is neither an existing directory nor a Hugging Face repo id (org/name)") from None
    except GatedRepoError:
        raise ModelError(f"{repo_id} is gated: accept its terms on huggingface.co and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no such Hugging Face repo: {repo_id} (or it is private: log in with hf auth login)") from None
    except RevisionNotFoundError as e:
        raise ModelError(f"{repo_id}: {e}") from None
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x knows a snapshot lacks files
            raise ModelError(f"the cached copy of {repo_id} is incomplete; run `moectl pull {repo_id}` online ({e})") from None
        if is_offline:
            raise ModelError(
                f"{repo_id} is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE): "
                f"download it first with `moectl pull {repo_id}` where the hub is reachable"
            ) from None
        raise ModelError(f"cannot reach the Hugging Face hub to download {repo_id}, and it is not in the cache") from None
    except OSError as e:
        raise ModelError(f"cannot store {repo_id} in the Hugging Face cache: {e}") from None


def _tqdm_reporting_to(progress: Progress):
    """A tqdm class for huggingface_hub that hands its byte counts to ``progress`` instead of a terminal."""
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            if self.unit == "B":  # the byte bars; the per-file counter bar adds nothing a person needs
                fraction = self.n / self.total if self.total else None
                progress(f"downloading: {self.format_sizeof(self.n)}B of {self.format_sizeof(self.total or 0)}B", fraction)
            return True

        def close(self):
            try:
                super().close()
            finally:
                self.fp.close()

    return Reporting


def display_name(path: Path) -> str:
    """How a person names the model at ``path``: ``org/name`` for a hub snapshot, else the directory name."""
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--") :].replace("--", "/")
    if path.resolve() == embedded_model_path().resolve():  # however it was spelled (a relative path too)
        return "embedded"
    return path.name


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path / 'config.json'}: {e}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path / 'config.json'} is not a JSON object")
    return config


def expert_count(config: dict) -> int:
    """Routed experts per MoE layer according to config.json (0 for a dense model)."""
    for section in (config, config.get("text_config") or {}, config.get("language_config") or {}):
        if not isinstance(section, dict):
            continue
        for key in _EXPERT_COUNT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return value
    return 0


def check_moe(path: Path) -> None:
    config = read_config(path)
    if expert_count(config) == 0:
        model_type = config.get("model_type", "unknown type")
        raise ModelError(
            f"{path} ({model_type}) is not a Mixture-of-Experts model: its config.json names no routed experts "
            f"({', '.join(_EXPERT_COUNT_KEYS)}). moed serves MoE models only; use mlx-lm directly for dense ones."
        )
