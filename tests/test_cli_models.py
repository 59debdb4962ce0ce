"""moectl list, show, rm and ps against a Hugging Face cache built here (HF_HUB_CACHE)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moed import catalog, cli, models
from moed.cli import inventory
from test_cli import env  # noqa: F401 (fixture)

EMBEDDED = models.embedded_model_path()


def cache_repo(cache: Path, repo_id: str, source: Path, config_patch: dict | None = None) -> Path:
    """A snapshot laid out as huggingface_hub writes it: blobs by hash, snapshot files linking to them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        data = f.read_bytes()
        if f.name == "config.json" and config_patch is not None:
            config = {**json.loads(data), **config_patch}
            data = json.dumps({k: v for k, v in config.items() if v is not None}).encode()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


@pytest.fixture
def hub(env, monkeypatch, tmp_path):  # noqa: F811
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cache_repo(cache, "org/tiny-moe", EMBEDDED)
    # A dense model in the same cache: not listed (moed serves MoE models only).
    cache_repo(cache, "org/dense", EMBEDDED, {"num_experts": None, "num_experts_per_tok": None, "model_type": "qwen3"})
    return cache


def test_list_shows_the_embedded_and_cached_moe_models(hub, capsys):
    assert cli.main(["list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"embedded", "org/tiny-moe"}
    tiny = listed["org/tiny-moe"]
    assert (tiny["layers"], tiny["experts"], tiny["top_k"], tiny["quantization"]) == (4, 32, 2, "4-bit")
    assert tiny["size_bytes"] == sum(f.stat().st_size for f in EMBEDDED.glob("*.safetensors"))
    assert tiny["fits_in_ram"] is True
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "SIZE", "LAYERS"]
    assert any(line.startswith("org/tiny-moe") and " 32 " in line and "4-bit" in line for line in lines)


def test_fits_in_ram_follows_the_machine(hub):
    size = catalog.model_bytes(EMBEDDED)
    assert catalog.describe(EMBEDDED, ram=size).fits_in_ram is False
    assert catalog.describe(EMBEDDED, ram=2 * size).fits_in_ram is True


def test_show_reports_bytes_per_expert_and_a_budget(hub, capsys):
    assert cli.main(["show", "org/tiny-moe", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    # 3 projections (gate, up: 128x128; down: 128x128) at 4 bits with f32 scales and biases per 64 values.
    hidden, inter, groups = 128, 128, 128 * 128 // 64
    per_projection = hidden * inter // 2 + 2 * groups * 4
    assert shown["bytes_per_expert"] == 3 * per_projection
    assert shown["moe_layers"] == 4
    assert shown["expert_bytes"] == 3 * per_projection * 32 * 4
    assert shown["config"]["model_type"] == "qwen3_moe"
    assert shown["suggested_memory_budget"] is None  # it fits: no budget needed
    assert cli.main(["show", "org/tiny-moe"]) == 0
    assert "none needed" in capsys.readouterr().out


def test_a_model_too_big_for_ram_gets_a_budget(hub):
    info = catalog.describe(EMBEDDED, ram=1 << 20)
    figures = catalog.expert_figures(EMBEDDED, info, ram=1 << 20)
    floor = catalog.MIN_SLOTS_PER_TOP_K * 2 * 4 * figures["bytes_per_expert"]
    assert figures["suggested_memory_budget"] == floor  # 1 MiB of RAM leaves nothing: the floor
    ram = catalog.model_bytes(EMBEDDED)  # just too small to hold it all: what is left after the dense weights
    tight = catalog.expert_figures(EMBEDDED, catalog.describe(EMBEDDED, ram=ram), ram=ram)
    assert tight["suggested_memory_budget"] == max(floor, int(0.75 * ram) - tight["dense_bytes"])
    assert floor < tight["suggested_memory_budget"] < tight["expert_bytes"]


def test_show_of_an_unknown_model_says_how_to_get_one(hub, capsys):
    assert cli.main(["show", "org/missing"]) == 1
    assert "moectl pull org/missing" in capsys.readouterr().err


def test_rm_asks_then_removes_through_the_cache_api(hub, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cli.main(["rm", "org/tiny-moe"]) == 1
    assert (hub / "models--org--tiny-moe").exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert cli.main(["rm", "org/tiny-moe"]) == 0
    assert "removed org/tiny-moe" in capsys.readouterr().out
    assert not list((hub / "models--org--tiny-moe").glob("snapshots/*"))
    assert (hub / "models--org--dense").exists()
    assert cli.main(["list", "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["embedded"]


def test_rm_without_a_terminal_needs_yes(hub, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    assert cli.main(["rm", "org/tiny-moe"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert cli.main(["rm", "-y", "org/tiny-moe"]) == 0
    assert cli.main(["rm", "-y", "org/tiny-moe"]) == 1  # gone now
    assert cli.main(["rm", "embedded"]) == 2


def test_ps_when_not_running(env, capsys):  # noqa: F811
    assert cli.main(["ps"]) == 3
    assert "not running" in capsys.readouterr().out


def test_ps_formats_a_status_reply(monkeypatch, capsys, env):  # noqa: F811
    status = {"state": "ready", "model": {"name": "org/tiny-moe", "path": "/m"}, "clients": 2,
              "memory": {"rss_bytes": 3 << 30, "budget_bytes": 1 << 30}, "model_ready_at": 1e9,
              "experts": {"resident": 40, "slots": 64, "hit_rate": 0.9}, "requests": {"active": 1, "queued": 0}}
    monkeypatch.setattr(inventory, "query_status", lambda runtime: dict(status))
    assert cli.main(["ps"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("org/tiny-moe") and "3.0 GiB" in out[1] and "40/64 experts" in out[1] and " 2 " in out[1]
    assert cli.main(["ps", "--json"]) == 0
    (obj,) = json.loads(capsys.readouterr().out)
    assert (obj["model"], obj["since"], obj["clients"], obj["resident_experts"]) == ("org/tiny-moe", 1e9, 2, 40)


def test_model_commands_import_no_mlx(hub):
    code = ("import sys; from moed import cli; cli.main(['list', '--json']); cli.main(['show', 'embedded', '--json']); "
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'mlx' or n.startswith(('moed.experts', 'moed.engine'))), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stderr.strip().splitlines()[-1] == "[]"
