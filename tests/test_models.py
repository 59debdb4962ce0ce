"""Model resolution: local paths, the embedded model, and a Hugging Face cache laid out as the hub lays it out."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moed import models
from moed.models import ModelError, resolve_model

ROOT = Path(__file__).resolve().parents[1]
MOE_CONFIG = {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "hidden_size": 64}
DENSE_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128}
REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_model_dir(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A hub cache entry: blobs named by hash, refs/main naming the commit, snapshot files linking to blobs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot


def resolve_in_subprocess(spec: str, hf_home: Path, offline: bool = True) -> subprocess.CompletedProcess:
    """Resolve with the hub environment a user would set; huggingface_hub reads it at import time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), PYTHONPATH=str(ROOT))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    code = (
        "import sys\n"
        "from moed.models import resolve_model, ModelError\n"
        "try:\n"
        "    print(resolve_model(sys.argv[1]))\n"
        "except ModelError as e:\n"
        "    print('ModelError:', e, file=sys.stderr); sys.exit(2)\n"
    )
    return subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True, timeout=60)


def test_local_moe_directory_is_used_as_is(tmp_path):
    path = make_model_dir(tmp_path / "m", MOE_CONFIG)
    assert resolve_model(str(path)) == path


def test_dense_model_is_refused_with_a_clear_message(tmp_path):
    path = make_model_dir(tmp_path / "dense", DENSE_CONFIG)
    with pytest.raises(ModelError, match="not a Mixture-of-Experts model"):
        resolve_model(str(path))


@pytest.mark.parametrize(
    "config, experts",
    [
        ({"num_local_experts": 8}, 8),  # mixtral, gpt-oss
        ({"n_routed_experts": 64}, 64),  # deepseek, glm4_moe
        ({"text_config": {"num_local_experts": 16}}, 16),  # llama4-style nested config
        ({"num_experts": 0}, 0),  # qwen3 dense configs may carry a zero
        ({}, 0),
    ],
)
def test_expert_count_across_families(config, experts):
    assert models.expert_count(config) == experts


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        resolve_model(str(tmp_path / "nope"))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_broken_config_json_is_a_model_error(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        resolve_model(str(path))


def test_none_means_the_embedded_model(monkeypatch, tmp_path):
    embedded = make_model_dir(tmp_path / "embedded", MOE_CONFIG)
    monkeypatch.setattr(models, "EMBEDDED_DIR", embedded)
    assert resolve_model(None) == embedded
    monkeypatch.setattr(models, "EMBEDDED_DIR", tmp_path / "gone")
    with pytest.raises(ModelError, match="embedded model is missing"):
        resolve_model(None)


def test_repo_id_found_in_offline_hub_cache(tmp_path):
    snapshot = make_hub_cache(
        tmp_path / "hf" / "hub",
        "org/tiny-moe",
        {"config.json": json.dumps(MOE_CONFIG).encode(), "model.safetensors": b"\0" * 16},
    )
    result = resolve_in_subprocess("org/tiny-moe", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot
    assert json.loads((Path(result.stdout.strip()) / "config.json").read_text()) == MOE_CONFIG


def test_dense_repo_in_hub_cache_gets_the_moe_error(tmp_path):
    make_hub_cache(tmp_path / "hf" / "hub", "org/dense", {"config.json": json.dumps(DENSE_CONFIG).encode()})
    result = resolve_in_subprocess("org/dense", tmp_path / "hf")
    assert result.returncode == 2
    assert "not a Mixture-of-Experts model" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_repo_offline_is_a_clear_error(tmp_path):
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    result = resolve_in_subprocess("org/absent", tmp_path / "hf")
    assert result.returncode == 2
    assert "not in the Hugging Face cache and offline mode is on" in result.stderr
    assert "moectl pull org/absent" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_repo_id_is_a_clear_error(tmp_path):
    result = resolve_in_subprocess("not a repo!", tmp_path / "hf")
    assert result.returncode == 2
    assert "neither an existing directory nor a Hugging Face repo id" in result.stderr


def test_download_progress_is_reported_through_the_callback():
    seen = []
    cls = models._tqdm_reporting_to(lambda message, fraction: seen.append((message, fraction)))
    bar = cls(total=2048, unit="B", unit_scale=True, mininterval=0)
    bar.update(1024)
    bar.update(1024)
    bar.close()
    assert seen and seen[-1][1] == 1.0
    assert any(f == 0.5 for _, f in seen)
    assert "downloading" in seen[-1][0]


def test_display_names(tmp_path):
    snapshot = make_hub_cache(tmp_path / "hub", "org/tiny-moe", {"config.json": b"{}"})
    assert models.display_name(snapshot) == "org/tiny-moe"
    assert models.display_name(tmp_path / "my-model") == "my-model"
    assert models.display_name(models.embedded_model_path()) == "embedded"


def test_the_embedded_model_by_a_relative_path_keeps_its_name_and_profile(monkeypatch):
    """`--model ./moed/embedded/model` is still the embedded model: same name, so its
    shipped profile is found."""
    from moed.experts.profile import PROFILES_DIR, find_profile

    embedded = models.embedded_model_path()
    monkeypatch.chdir(embedded.parent)
    relative = Path(embedded.name)
    assert not relative.is_absolute()
    assert models.display_name(relative) == "embedded"
    assert find_profile(relative) == PROFILES_DIR / "embedded.json"
