"""Prefetcher: exact output with loads racing the forward, per-request faults,
metrics, shutdown."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import families  # noqa: E402

mx = pytest.importorskip("mlx.core")
import mlx_lm  # noqa: E402

from moed.experts import StoreError, load_model  # noqa: E402
from test_experts import family_dir, greedy_tokens, num_experts, private_state, reference  # noqa: E402,F401


@pytest.mark.parametrize("mode", ["auto", "speculative", "sync"])
@pytest.mark.parametrize("share", [0.5, 0.25])
@pytest.mark.parametrize("family", families.FAMILIES)
def test_exact_with_prefetch(family, share, mode, family_dir, reference):
    path = family_dir[family]
    cap = max(1, int(num_experts(path) * share))
    model, tok, manager = load_model(path, capacity=cap, decode_mode=mode)
    try:
        assert manager.prefetcher is not None
        assert greedy_tokens(model, tok) == reference[family]
        stats = manager.stats()
        json.dumps(stats)  # JSON-safe, as status needs it
        pf = stats["prefetch"]
        assert stats["recall"] == pf["recall"]
        assert pf["requested"] > 0 and pf["needed"] > 0
        assert 0.0 <= pf["recall"] <= 1.0
        for c in manager.caches:
            assert not c.in_use
            assert (c.slot_of >= 0).sum() <= c.capacity
    finally:
        manager.close()


def test_sync_mode_uses_gate_lookahead(family_dir, reference):
    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=4, decode_mode="sync")
    try:
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
        pred = manager.stats()["prefetch"]["predictors"]
        assert pred["gate+1"]["needed"] > 0 and pred["gate+1"]["recall"] is not None
        assert pred["persistence"]["needed"] > 0
    finally:
        manager.close()


def test_failed_prefetch_leaves_no_slot_in_use(family_dir, reference, tmp_path):
    """Reads that fail in the I/O pool: the forward needing the expert gets a
    clear error, slots stay consistent, and a later request is exact again."""
    path = tmp_path / "m"
    shutil.copytree(family_dir["qwen3_moe"], path)
    shard = path / "model.safetensors"
    good = shard.read_bytes()
    model, tok, manager = load_model(path, capacity=4)
    try:
        os.truncate(shard, 4096)
        with pytest.raises(StoreError, match="truncated"):
            greedy_tokens(model, tok)
        pf = manager.prefetcher
        pf.install_ready()
        deadline = time.monotonic() + 5
        while pf.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
            pf.install_ready()
        families.assert_slots_consistent(manager)
        shard.write_bytes(good)
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
    finally:
        manager.close()


def test_loads_race_forwards_under_load(family_dir, reference):
    """Many generations back to back at a tiny capacity while the pool streams
    experts: every one exact."""
    path = family_dir["kimi"]
    model, tok, manager = load_model(path, capacity=2, decode_mode="speculative")
    try:
        for _ in range(4):
            assert greedy_tokens(model, tok) == reference["kimi"]
        assert manager.stats()["prefetch"]["completed"] > 0
    finally:
        manager.close()


def test_close_joins_threads_within_a_second(family_dir):
    model, tok, manager = load_model(family_dir["qwen3_moe"], capacity=4)
    greedy_tokens(model, tok, n=3)
    pool_threads = list(manager.prefetcher.pool._threads)
    t0 = time.monotonic()
    manager.close()
    assert time.monotonic() - t0 < 1.0
    assert not any(t.is_alive() for t in pool_threads)
    assert not [t for t in threading.enumerate() if t.name.startswith("moed-prefetch")]


@pytest.mark.parametrize("mode", ["speculative", "sync"])
def test_slow_disk_loads_overlap_forwards_exactly(family_dir, reference, monkeypatch, mode):
    """Every read takes 3 ms, so prefetches are still in flight while later
    forwards run and evict: installs and evictions must never reach a slot the
    model is reading (tokens exact, maps consistent)."""
    from moed.experts.store import Reader

    real = Reader.read_into

    def slow(self, extent, buf):
        time.sleep(0.003)
        return real(self, extent, buf)

    monkeypatch.setattr(Reader, "read_into", slow)
    for family in ("glm4_moe",):
        model, tok, manager = load_model(family_dir[family], capacity=3, decode_mode=mode, profile=None)
        try:
            manager.prefetcher.depth = 3
            for _ in range(2):
                assert greedy_tokens(model, tok) == reference[family]
            pf = manager.stats()["prefetch"]
            assert pf["completed"] > 0
            for c in manager.caches:
                for s, e in enumerate(c.expert_in):
                    assert e < 0 or c.slot_of[e] == s
                assert (c.slot_of >= 0).sum() <= c.capacity
        finally:
            manager.close()


def test_speculative_passes_score_gate_guesses(family_dir, reference):
    model, tok, manager = load_model(family_dir["qwen3_moe"], capacity=12, decode_mode="speculative", profile=None)
    try:
        manager.prefetcher.sample_every = 1
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
        gate = manager.stats()["prefetch"]["predictors"]["gate+1"]
        assert gate["needed"] > 0 and gate["recall"] is not None
    finally:
        manager.close()
