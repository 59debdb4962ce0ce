"""Expert profiles and warm-start state."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

mx = pytest.importorskip("mlx.core")
import numpy as np  # noqa: E402

from moed.experts import load_model  # noqa: E402
from moed.experts import profile as profiles  # noqa: E402
from moed.experts.profiling import run_profile  # noqa: E402
from test_experts import family_dir, greedy_tokens, private_state, reference  # noqa: E402,F401


@pytest.fixture(scope="module")
def profiled(family_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "qwen3_moe.json"
    calls = []
    prof = run_profile(family_dir["qwen3_moe"], ["the quick brown fox", "def main():", "hello world"], out,
                                progress=lambda stage, message, fraction=None: calls.append((stage, fraction)),
                                max_tokens=6)
    return out, prof, calls


def test_profile_contents(profiled, family_dir):
    out, prof, calls = profiled
    assert json.loads(out.read_text()) == prof
    assert prof["model_id"] == "qwen3_moe" and prof["revision"] == profiles.model_revision(family_dir["qwen3_moe"])
    assert prof["tool"] == "moed" and prof["tool_version"] and prof["prompt_mix"][0] == "the quick brown fox"
    assert len(prof["layers"]) == 3
    k = 4
    for layer in prof["layers"]:
        # every routed (token, k) pair is counted once: prompt tokens + generated tokens
        assert sum(layer["counts"]) % k == 0 and sum(layer["counts"]) > 0
        assert max(layer["prompts_using"]) <= 3
    assert [c[0] for c in calls][-1] == "done" and any(c[0] == "profile" for c in calls)


def test_universal_experts():
    counts = np.array([50, 1, 1, 1, 40, 1, 1, 1])
    presence = np.array([10, 2, 2, 2, 9, 1, 1, 1])
    assert profiles.universal_experts(counts, presence, 10) == [0, 4]
    assert profiles.universal_experts(np.full(8, 5), np.full(8, 10), 10) == []


def test_profile_is_applied(profiled, family_dir, reference, monkeypatch, tmp_path):
    out, prof, _ = profiled
    shutil.copy(out, tmp_path / "qwen3_moe.json")
    monkeypatch.setenv("MOED_PROFILE_DIR", str(tmp_path))
    model, tok, manager = load_model(family_dir["qwen3_moe"], capacity=8)
    try:
        assert manager.seeded["profile"] is True
        for cache, layer in zip(manager.caches, prof["layers"]):
            assert cache.pinned == set(layer["universal"][: cache.capacity // 4])
            top = [int(e) for e in np.argsort(-np.array(layer["counts"]), kind="stable")][:2]
            assert all(cache.slot_of[e] >= 0 for e in top)
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
        for cache in manager.caches:
            assert all(cache.slot_of[e] >= 0 for e in cache.pinned)
    finally:
        manager.close()


def test_profile_of_another_revision_is_ignored(profiled, family_dir, tmp_path, caplog):
    out, prof, _ = profiled
    stale = dict(prof, revision="0" * 16)
    path = tmp_path / "stale.json"
    path.write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="moed.experts.profile"):
        model, tok, manager = load_model(family_dir["qwen3_moe"], capacity=8, profile=path)
    try:
        assert manager.seeded["profile"] is False
        assert all(not c.pinned for c in manager.caches)
        assert "ignoring profile" in caplog.text and "0000000000000000" in caplog.text
    finally:
        manager.close()


def test_warm_start_restores_resident_set(family_dir, reference):
    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=4, profile=None)
    greedy_tokens(model, tok)
    before = [set(c.resident().tolist()) for c in manager.caches]
    manager.close()
    saved = profiles.state_path(path, 4)
    assert saved.is_file()
    model, tok, manager = load_model(path, capacity=4, profile=None)
    try:
        assert manager.seeded["warm_restored"] == sum(len(b) for b in before)
        assert [set(c.resident().tolist()) for c in manager.caches] == before
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
    finally:
        manager.close()
    # another capacity has its own state: nothing restored
    model, tok, manager = load_model(path, capacity=3, profile=None)
    assert manager.seeded["warm_restored"] == 0
    manager.close()


def test_stale_warm_state_is_discarded(family_dir, tmp_path, caplog):
    path = tmp_path / "m"
    shutil.copytree(family_dir["qwen3_moe"], path)
    model, tok, manager = load_model(path, capacity=4, profile=None)
    greedy_tokens(model, tok, n=3)
    manager.close()
    state = profiles.state_path(path, 4)
    assert state.is_file()
    cfg = json.loads((path / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5  # a new revision of the model
    (path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="moed.experts.profile"):
        model, tok, manager = load_model(path, capacity=4, profile=None, warm_start=True)
    try:
        assert manager.seeded["warm_restored"] == 0
        assert "discarding stale warm-start state" in caplog.text
        assert all(len(c.resident()) == 0 for c in manager.caches)
    finally:
        manager.close()


def test_shipped_profile_matches_embedded_model():
    """The profile shipped for the embedded model is for its current revision."""
    from moed.models import embedded_model_path

    model = embedded_model_path()
    shipped = profiles.PROFILES_DIR / profiles.profile_name(model)
    if not (model / "config.json").is_file():
        pytest.skip("no embedded model in this tree")
    fix = f"regenerate it: moectl profile --out {shipped} (with the embedded model configured)"
    assert shipped.is_file(), f"{shipped} is missing; {fix}"
    prof = profiles.read_profile(shipped, model)
    assert prof is not None, f"the shipped profile is for another revision of the embedded model; {fix}"
    assert prof["num_experts"] > 0 and prof["layers"]


def test_revision_sees_new_weights_of_the_same_shapes(family_dir, tmp_path):
    """A retrained model keeps config and header; its revision must still change."""
    path = tmp_path / "m"
    shutil.copytree(family_dir["qwen3_moe"], path)
    before = profiles.model_revision(path)
    shard = path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    for i in range(8 + n, len(data), 997):  # nudge bytes all over the data, as training would
        data[i] ^= 0x01
    shard.write_bytes(bytes(data))
    assert profiles.model_revision(path) != before
