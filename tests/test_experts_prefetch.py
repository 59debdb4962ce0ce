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


def drain(pf, timeout: float = 5.0) -> None:
    """Settle every load still in flight (installed, or released on failure)."""
    pf.install_ready()
    deadline = time.monotonic() + timeout
    while pf.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
        pf.install_ready()


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
        drain(manager.prefetcher)
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


def test_payoff_runs_the_cheaper_arm_and_explores():
    from moed.experts.prefetch import Payoff

    meter = Payoff(explore_every=4, window=4, warmup=2)
    cost = {True: 0.009, False: 0.003}  # the work costs more than it saves
    arms = []
    for _ in range(40):
        arm = meter.choose()
        arms.append(arm)
        meter.record(arm, cost[arm])
    assert arms[:4] == [True, True, False, False]  # each arm measured first
    later = arms[4:]
    assert later.count(False) > later.count(True) > 0  # mostly off, still retried
    cost = {True: 0.001, False: 0.003}  # the regime changes: the work now pays
    arms = []
    for _ in range(40):
        arm = meter.choose()
        arms.append(arm)
        meter.record(arm, cost[arm])
    assert arms[-20:].count(True) > arms[-20:].count(False)
    stats = meter.stats()
    assert stats["arms"]["True"]["steps"] + stats["arms"]["False"]["steps"] == 80 and stats["best"] == "True"


def test_payoff_with_three_arms_explores_each_loser_in_turn():
    from moed.experts.prefetch import ARMS, Payoff

    meter = Payoff(ARMS, explore_every=4, window=4, warmup=1)
    cost = {"off": 0.004, "runahead": 0.002, "ahead": 0.006}
    arms = []
    for _ in range(60):
        arm = meter.choose()
        arms.append(arm)
        meter.record(arm, cost[arm])
    assert arms[:3] == list(ARMS)
    later = arms[3:]
    assert later.count("runahead") > 40 and later.count("off") >= 5 and later.count("ahead") >= 5
    assert meter.stats()["best"] == "runahead"


def test_meter_turns_prefetch_off_where_it_costs_more_than_it_saves(family_dir, reference, monkeypatch):
    """Every prefetch request made slow on purpose: the steps that miss cost
    more under the loading arms, and the meter settles on "off", which loads
    as on-demand does; tokens stay exact throughout."""
    from moed.experts.prefetch import Prefetcher

    real = Prefetcher.request

    def slow_request(self, *args, **kwargs):
        time.sleep(0.01)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Prefetcher, "request", slow_request)
    model, tok, manager = load_model(family_dir["qwen3_moe"], capacity=3, decode_mode="sync", profile=None)
    try:
        pf = manager.prefetcher
        pf.sample_every = 10**6  # no sampled steps: every step counts
        for _ in range(3):
            assert greedy_tokens(model, tok) == reference["qwen3_moe"]
        payoff = manager.stats()["prefetch"]["payoff"]
        assert payoff["best"] == "off", payoff
        assert payoff["arms"]["off"]["steps"] > payoff["arms"]["ahead"]["steps"]
    finally:
        manager.close()


def test_random_arms_and_jittered_reads_stay_exact(family_dir, reference, monkeypatch):
    """Reads take 0-4 ms at random and the prefetcher's arm is drawn at random, so
    installs, evictions for guesses and forwards interleave in many orders:
    every generation exact, maps consistent."""
    import random

    from moed.experts.prefetch import Payoff
    from moed.experts.store import Reader

    rng = random.Random(6)
    real = Reader.read_into

    def jittered(self, extent, buf):
        time.sleep(rng.random() * 0.004)
        return real(self, extent, buf)

    from mlx_lm.generate import generate_step

    from moed.experts.decode import generate
    from test_experts import PROMPT

    path = family_dir["qwen3_moe"]
    stock_model, stock_tok = mlx_lm.load(str(path))
    ids = mx.array(stock_tok.encode(PROMPT))
    stock = [t for t, _ in generate_step(ids, stock_model, max_tokens=24)]
    monkeypatch.setattr(Reader, "read_into", jittered)
    monkeypatch.setattr(Payoff, "choose", lambda self: rng.choice(self.arms))
    model, tok, manager = load_model(path, capacity=3, profile=None)
    try:
        manager.prefetcher.sample_every = 2
        for mode in ("auto", "sync", "speculative"):
            manager.decode_mode = mode
            assert greedy_tokens(model, tok) == reference["qwen3_moe"]
            # and with each token's check one token late (the engine's solo loop)
            assert [t for t, _ in generate(ids, model, manager, max_tokens=24)] == stock
            drain(manager.prefetcher)
            families.assert_slots_consistent(manager)
        stats = manager.stats()
        assert stats["prefetch"]["completed"] > 0 and stats["rollbacks"] > 0
    finally:
        manager.close()


def test_decode_step_breakdown_and_checked_full_residency(family_dir, reference):
    """All experts resident with the check forced on (the benchmark's
    checked-100): same tokens, one readback per token, time split reported."""
    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=num_experts(path), profile=None)
    try:
        manager.always_check = True
        assert greedy_tokens(model, tok) == reference["qwen3_moe"]
        stats = manager.stats()
        assert stats["readbacks_per_token"] == 1.0 and stats["redos"] == 0
        parts = stats["decode_step_ms"]
        assert set(parts) == {"prefetch", "build", "route", "eval", "check", "record", "sync"}
        assert parts["record"] == 0  # checks inside their forward: nothing recorded after queueing
        assert parts["eval"] > 0 and parts["build"] > parts["route"] > 0
    finally:
        manager.close()


def test_payoff_per_token_counts_the_rare_dear_steps_a_median_ignores():
    """A speculative decode step that misses makes no token of its own and costs several steps:
    per token the arm that sometimes redoes is dearer, though its median step is cheaper."""
    from moed.experts.payoff import Payoff

    def fill(meter):
        for i in range(32):
            meter.record("speculative", 0.010)
            if i % 4 == 0:
                meter.record("speculative", 0.040, tokens=0)  # the redo
            meter.record("sync", 0.016)

    per_token, median = Payoff(("speculative", "sync"), window=40, per_token=True), Payoff(("speculative", "sync"), window=40)
    fill(per_token), fill(median)
    assert per_token.best() == "sync" and per_token.cost("speculative") == pytest.approx(0.020, rel=0.05)
    assert median.best() == "speculative"


def test_payoff_explores_a_steady_loser_ever_more_rarely_and_resets_when_it_wins():
    from moed.experts.payoff import Payoff

    meter = Payoff(("a", "b"), explore_every=4, window=4, warmup=1, max_explore_every=32)
    cost = {"a": 0.001, "b": 0.010}
    explored = []
    for step in range(200):
        arm = meter.choose()
        if arm == "b":
            explored.append(step)
        meter.record(arm, cost[arm])
    gaps = [b - a for a, b in zip(explored, explored[1:])]
    assert explored[0] == 1 and gaps[1:5] == [4, 8, 16, 32] and set(gaps[5:]) == {32}, gaps  # [0]: its warm-up
    cost = {"a": 0.010, "b": 0.001}  # the regime changes: b wins when next tried, and the gap starts over
    arms, gaps = [], []
    for step in range(100):
        arm = meter.choose()
        arms.append(arm)
        gaps.append(meter.gap)
        meter.record(arm, cost[arm])
    assert min(gaps) == 4 and arms[-20:].count("b") > 15 and meter.best() == "b"
