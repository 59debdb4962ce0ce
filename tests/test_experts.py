"""Lazy experts: exact tokens against stock mlx-lm for every family at full, half
and quarter capacity; store, cache, sync scheme, budget and bad input."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import families  # noqa: E402

mx = pytest.importorskip("mlx.core")
import mlx_lm  # noqa: E402
import numpy as np  # noqa: E402

from moed.experts import NotMoEError, StoreError, load_model, parse_size  # noqa: E402
from moed.experts.lazy import make_lazy  # noqa: E402

PROMPT = "hello world, the quick brown fox"
NEW_TOKENS = 10


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    """Warm-start state and profiles go to this test's own dirs, never the user's."""
    monkeypatch.setenv("MOED_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MOED_PROFILE_DIR", str(tmp_path / "profiles"))


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: families.build(f, root / f) for f in families.FAMILIES}


def greedy_tokens(model, tokenizer, prompt=PROMPT, n=NEW_TOKENS):
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n)]


@pytest.fixture(scope="session")
def reference(family_dir):
    out = {}
    for fam, path in family_dir.items():
        model, tok = mlx_lm.load(str(path))
        out[fam] = greedy_tokens(model, tok)
    return out


def num_experts(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in cfg:
            return cfg[key]
    raise KeyError("expert count")


@pytest.mark.parametrize("share", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("family", families.FAMILIES)
def test_exact_tokens(family, share, family_dir, reference):
    path = family_dir[family]
    cap = max(1, int(num_experts(path) * share))
    model, tok, manager = load_model(path, capacity=cap, prefetch=False)
    try:
        assert greedy_tokens(model, tok) == reference[family]
        stats = manager.stats()
        for layer in stats["layers"]:
            assert layer["resident"] <= layer["capacity"] == cap
        if share < 1.0:
            assert stats["misses"] > 0 and stats["bytes_read"] > 0, "the test must exercise loads"
            assert stats["readbacks"] > 0
        else:
            assert stats["readbacks"] == 0 and stats["misses"] == 0
    finally:
        manager.close()


def test_plain_load_without_capacity(family_dir):
    model, tok, manager = load_model(family_dir["qwen3_moe"])
    assert manager is None


@pytest.mark.parametrize("prefetch", [False, True])
def test_batched_generation_exact(family_dir, prefetch):
    """Two prompts decoded together by mlx-lm's BatchGenerator, at 25% capacity."""
    from mlx_lm.generate import BatchGenerator

    path = family_dir["qwen3_moe"]
    prompts = ["the quick brown fox jumps", "def main():\n    return"]

    def run(model, tok):
        gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=2, prefill_batch_size=2)
        uids = gen.insert([tok.encode(p) for p in prompts], max_tokens=[8, 8])
        out = {u: [] for u in uids}
        while any(len(v) < 8 for v in out.values()):
            result = gen.next()
            responses = result[1] if isinstance(result, tuple) else result
            for r in responses:
                out[r.uid].append(r.token)
        gen.close()
        return [out[u] for u in uids]

    ref = run(*mlx_lm.load(str(path)))
    model, tok, manager = load_model(path, capacity=4, prefetch=prefetch)
    try:
        assert run(model, tok) == ref
        assert manager.stats()["misses"] > 0
    finally:
        manager.close()


def test_one_readback_per_token_when_resident(family_dir):
    """With every routed expert resident a decode step costs exactly one readback."""
    path = family_dir["qwen3_moe"]
    model, tok = mlx_lm.load(str(path), lazy=True)
    manager = make_lazy(model, path, capacity=num_experts(path))  # full size but not preloaded
    mx.eval(model.parameters())
    try:
        greedy_tokens(model, tok)  # warm: everything used gets loaded
        for c in manager.caches:  # what is left, so no layer can miss
            c.ensure(range(c.num_experts))
            c.capacity = c.num_experts + 1  # keep the speculative path (not "complete")
        manager.readbacks = manager.decode_readbacks = manager.decode_steps = manager.redos = 0
        # the speculative pass's check (auto, having measured sync mode cheaper during the
        # warm-up's misses, keeps running it until a retried speculative step wins)
        manager.decode_mode = "speculative"
        greedy_tokens(model, tok)
        assert manager.decode_steps > 0 and manager.redos == 0
        assert manager.decode_readbacks == manager.decode_steps
    finally:
        manager.close()


def test_slots_hold_the_checkpoint_bytes(family_dir):
    """A loaded slot equals the expert's slice of the stacked tensor mlx-lm loads."""
    for fam in ("qwen3_moe", "mixtral"):
        path = family_dir[fam]
        full, _ = mlx_lm.load(str(path))
        model, _, manager = load_model(path, capacity=3, prefetch=False)
        try:
            cache, site = manager.caches[1], manager.sites[1]
            cache.ensure([5, 2])
            ref = dict(full.named_modules())[site.path]
            for part in cache.parts:
                proj, arr = part.name.split(".")
                want = np.array(ref[proj][arr])
                got = np.array(cache.slots[part.name])
                for e in (5, 2):
                    assert np.array_equal(got[cache.slot_of[e]], want[e]), (fam, part.name, e)
        finally:
            manager.close()


def test_lru_and_pinning(family_dir):
    model, _, manager = load_model(family_dir["qwen3_moe"], capacity=3, policy="lru", prefetch=False)
    try:
        c = manager.caches[0]
        c.pin([7])
        for e in (1, 2):
            c.ensure([e])
            c.record([e])
        c.record([1])  # 2 is now least recently used
        c.ensure([3])
        assert set(c.resident().tolist()) == {7, 1, 3}
        for e in (4, 5, 6, 8):
            c.ensure([e])
            c.record([e])
        assert 7 in c.resident().tolist(), "pinned experts are never evicted"
        assert c.evictions >= 5
    finally:
        manager.close()


def test_frequency_recency_keeps_frequent(family_dir):
    model, _, manager = load_model(family_dir["qwen3_moe"], capacity=3, policy="lfru", prefetch=False)
    try:
        c = manager.caches[0]
        c.ensure([1, 2, 3])
        for _ in range(5):
            c.record([1])
        c.record([2])
        c.record([3])  # 2 and 3 recent once each; 1 used often
        c.ensure([4])
        assert 1 in c.resident().tolist()
        assert 4 in c.resident().tolist()
    finally:
        manager.close()


def test_memory_budget_sets_capacity(family_dir):
    from moed.experts import _capacity_for_budget

    per_slot, dense, process = 1 << 20, 100 << 20, 200 << 20
    budget = 1 << 30
    reserve = budget * 3 // 100
    assert _capacity_for_budget(budget, dense, process, [per_slot // 2] * 2, 1024) == (budget - dense - process - reserve) // per_slot
    assert _capacity_for_budget(budget, dense, process, [per_slot // 2] * 2, 16) == 16
    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=4, prefetch=False)
    per_layer = manager.per_layer_expert_bytes
    nonexpert = manager.nonexpert_bytes
    manager.close()
    from moed.platform import process_rss_bytes

    # room for ~6 slots plus the process's RSS drift since (other tests' arrays)
    budget = process_rss_bytes() + (64 << 20) + nonexpert + (16 << 20) + 6 * sum(per_layer)
    model, tok, manager = load_model(path, memory_budget=budget, prefetch=False)
    try:
        stats = manager.stats()
        mem = stats["memory"]
        want = _capacity_for_budget(budget, nonexpert, mem["baseline_rss_bytes"], per_layer, 16)
        assert stats["capacity"] == want and 1 <= want <= 16
        assert mem["expert_bytes"] <= budget and mem["budget_bytes"] == budget
        assert mem["process_rss_bytes"] > 0
    finally:
        manager.close()
    with pytest.raises(ValueError, match="too small"):
        load_model(path, memory_budget=1000)


def test_parse_size():
    assert parse_size("8GB") == 8 << 30
    assert parse_size("512 MiB") == 512 << 20
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size("lots")


def test_dense_model_is_refused(tmp_path):
    path = families.build_dense(tmp_path / "dense")
    with pytest.raises(NotMoEError, match="no mixture-of-experts"):
        load_model(path, capacity=2)


def test_approximate_mode_skips_and_default_never_does(family_dir, reference):
    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=4, approximate=True, prefetch=False)
    try:
        greedy_tokens(model, tok)
        stats = manager.stats()
        assert stats["skipped_expert_uses"] > 0 and stats["redos"] == 0
    finally:
        manager.close()
    model, tok, manager = load_model(path, capacity=4, prefetch=False)
    try:
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
        assert manager.skipped == 0
    finally:
        manager.close()


# -- bad input -----------------------------------------------------------------

def _copy(family_dir, fam, tmp_path) -> Path:
    dst = tmp_path / fam
    shutil.copytree(family_dir[fam], dst)
    return dst


def test_truncated_shard_at_load(family_dir, tmp_path):
    path = _copy(family_dir, "qwen3_moe", tmp_path)
    shard = path / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 1000)
    with pytest.raises(StoreError, match=r"model\.safetensors.*truncated"):
        load_model(path, capacity=4)


def test_corrupted_header(family_dir, tmp_path):
    path = _copy(family_dir, "qwen3_moe", tmp_path)
    shard = path / "model.safetensors"
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{")
    from moed.experts.store import read_header

    with pytest.raises(StoreError, match="corrupted safetensors header"):
        read_header(shard)


def test_missing_index(family_dir, tmp_path):
    path = _copy(family_dir, "mixtral", tmp_path)  # two shards
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(StoreError, match="model.safetensors.index.json is missing"):
        load_model(path, capacity=4)


def test_expert_key_absent_from_index(family_dir, tmp_path):
    path = _copy(family_dir, "mixtral", tmp_path)
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = "model.layers.1.block_sparse_moe.experts.3.w2.scales"
    del data["weight_map"][key]
    index.write_text(json.dumps(data))
    with pytest.raises(StoreError, match=r"experts\.3\.w2\.scales"):
        load_model(path, capacity=4)


def test_shard_truncated_while_serving(family_dir, reference, tmp_path):
    """A read failing mid-generation raises for that call, leaves no slot
    claiming the expert, and the next call (file restored) is exact."""
    path = _copy(family_dir, "qwen3_moe", tmp_path)
    shard = path / "model.safetensors"
    good = shard.read_bytes()
    model, tok, manager = load_model(path, capacity=4, prefetch=False)
    try:
        os.truncate(shard, 4096)
        with pytest.raises(StoreError, match=r"model\.safetensors.*truncated"):
            greedy_tokens(model, tok)
        families.assert_slots_consistent(manager)
        shard.write_bytes(good)
        # the error may have left the caller's KV cache half-written; a new request starts fresh
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
    finally:
        manager.close()


def test_pinned_experts_with_grouped_prefill(family_dir, reference):
    """Pins take slots for good; a prompt needing more experts than the rest
    still computes exactly, in groups."""
    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=4, prefetch=False, profile=None)
    try:
        for c in manager.caches:
            c.pin([0])
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
        assert all(c.slot_of[0] >= 0 and c.pinned == {0} for c in manager.caches)
    finally:
        manager.close()


def test_full_cache_loaded_out_of_order_still_maps(family_dir, reference):
    """Capacity = all experts but loaded in another order: slot ids differ from
    expert ids, so the lookup must stay on."""
    path = family_dir["qwen3_moe"]
    model, tok = mlx_lm.load(str(path), lazy=True)
    manager = make_lazy(model, path, capacity=16)
    mx.eval(model.parameters())
    try:
        for c in manager.caches:
            c.ensure(list(range(15, -1, -1)))
            assert not c.complete
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
    finally:
        manager.close()
