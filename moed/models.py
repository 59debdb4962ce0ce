"""Which model the daemon serves: the embedded default, a local path, or a hub repo id."""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "embedded" / "model"


class ModelError(Exception):
    """A model that cannot be served, with a message meant for a person."""


def embedded_model_path() -> Path:
    return EMBEDDED_DIR


def resolve_model(spec: str | None) -> Path:
    """A local directory holding config.json and safetensors for ``spec``.

    ``None`` means the embedded model. A path that exists is used as is;
    anything else is treated as a Hugging Face repo id.
    """
    if spec is None:
        path = embedded_model_path()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            path = _from_hub(spec)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not an mlx-lm model directory")
    return path


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]))
    except Exception as e:
        raise ModelError(f"cannot get model {repo_id!r}: {e}") from None


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
