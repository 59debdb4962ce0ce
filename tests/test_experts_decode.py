"""The deferred residency check (moed.experts.decode): token n's pass is checked
after token n+1's graph is built; a miss rolls both back. Output stays stock
mlx-lm's, greedy and seeded, whatever the cache holds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import families  # noqa: E402

mx = pytest.importorskip("mlx.core")
import mlx_lm  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache  # noqa: E402

from moed.engine.sampling import make_request_sampler  # noqa: E402
from moed_client.protocol import SamplingParams  # noqa: E402
from moed.experts import load_model  # noqa: E402
from moed.experts.decode import generate  # noqa: E402
from moed.experts.deferred import Rollback  # noqa: E402
from test_experts import PROMPT, family_dir, num_experts, private_state  # noqa: E402,F401

TOKENS = 40


def seeded(seed=11):
    return make_request_sampler(SamplingParams(temperature=0.8, top_p=1.0, min_p=0.0, top_k=0, seed=seed))


@pytest.fixture(scope="module")
def stock(family_dir):
    """Stock mlx-lm's tokens per family: greedy and with a seeded sampler."""
    out = {}
    for fam, path in family_dir.items():
        model, tok = mlx_lm.load(str(path))
        ids = mx.array(tok.encode(PROMPT))
        out[fam] = {"greedy": [t for t, _ in generate_step(ids, model, max_tokens=TOKENS)],
                    "seeded": [t for t, _ in generate_step(ids, model, max_tokens=TOKENS, sampler=seeded())]}
    return out


def assert_greedy_and_seeded_are_stock(model, tok, manager, stock_tokens):
    """Decode PROMPT greedy, then seeded, through ``generate``; both must be stock's. Returns the greedy run's KV cache."""
    ids = mx.array(tok.encode(PROMPT))
    cache = make_prompt_cache(model)
    assert [t for t, _ in generate(ids, model, manager, max_tokens=TOKENS, prompt_cache=cache)] == stock_tokens["greedy"]
    assert [t for t, _ in generate(ids, model, manager, max_tokens=TOKENS, sampler=seeded())] == stock_tokens["seeded"]
    return cache


@pytest.mark.parametrize("share", [0.5, 0.25])
@pytest.mark.parametrize("family", families.FAMILIES)
def test_deferred_decode_equals_stock(family, share, family_dir, stock):
    path = family_dir[family]
    model, tok, manager = load_model(path, capacity=max(1, int(num_experts(path) * share)), profile=None,
                                     warm_start=False, decode_mode="speculative")
    try:
        cache = assert_greedy_and_seeded_are_stock(model, tok, manager, stock[family])
        stats = manager.stats()
        if can_trim_prompt_cache(cache):  # trimmable to the end (a sliding window that filled up is not)
            # the deferred path ran, and so did its rollbacks: the test can tell a wrong redo
            assert stats["deferred_checks"] > 0 and stats["rollbacks"] > 0
            # a passed check queues the next pass before recording its own use
            assert stats["decode_step_ms"]["record"] > 0
        assert not manager._defer and manager._pending is None and manager._redo is None
    finally:
        manager.close()


@pytest.mark.parametrize("prompt_len", [1, 2, 3])
def test_short_prompts_prefill_unchecked_one_token_chunks_safely(prompt_len, family_dir):
    """generate_step prefills all but the last prompt token first: with two tokens
    that is a one-token forward that looks like a decode step but makes no token.
    From a cold cache it misses; it must be checked in its forward, not late."""
    path = family_dir["qwen3_moe"]
    stock_model, tok = mlx_lm.load(str(path))
    ids = mx.array(tok.encode(PROMPT)[:prompt_len])
    want = [t for t, _ in generate_step(ids, stock_model, max_tokens=12)]
    model, _, manager = load_model(path, capacity=3, profile=None, warm_start=False, decode_mode="speculative")
    try:
        assert [t for t, _ in generate(ids, model, manager, max_tokens=12)] == want
    finally:
        manager.close()


def test_a_pass_whose_experts_arrived_before_its_check_is_still_rolled_back(family_dir):
    """The check judges a pass by the slots it read: experts that were missing then
    (their ids read slot 0) and are resident by the time of the check must still
    roll the pass back."""
    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=6, profile=None, warm_start=False, prefetch=False,
                                     decode_mode="speculative")
    try:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([tok.encode(PROMPT)]), cache=cache))
        # decode forwards until one misses somewhere, each checked late
        manager.token_sampled()  # the decode passes that follow are checked late
        token = mx.array([[tok.encode(PROMPT)[-1]]])
        for _ in range(20):
            model(token, cache=cache)
            p = manager._pending
            mx.eval(p.out, p.routing)
            seen, first = manager._misses(p)
            if first is not None:
                break
        assert first is not None, "no forward missed: the test cannot tell"
        for _, layer_cache, needed, missing, _ in seen:
            layer_cache.ensure(missing, protect=needed)  # installed after the pass read its slots
            assert not len(layer_cache.missing(needed))
        offset = cache[0].offset
        with pytest.raises(Rollback):
            manager.check_through(p.id)
        assert cache[0].offset == offset - 1  # its token trimmed back
        assert manager._redo is not None
    finally:
        manager.check_in_forward()
        manager._redo = None
        manager.close()


def test_closing_mid_stream_leaves_the_kv_cache_exact(family_dir):
    """A stream closed while its last pass is unchecked (the engine does that on
    cancel and when a request joins a batch) checks it, and redoes it if it missed:
    the KV cache ends as stock mlx-lm's for the same tokens."""
    path = family_dir["qwen3_moe"]
    stock_model, tok = mlx_lm.load(str(path))
    model, _, manager = load_model(path, capacity=2, profile=None, warm_start=False, decode_mode="speculative")
    ids = mx.array(tok.encode(PROMPT))
    redone = 0
    try:
        for n in range(3, 15):
            cache = make_prompt_cache(model)
            steps = generate(ids, model, manager, max_tokens=TOKENS, prompt_cache=cache)
            got = [next(steps)[0] for _ in range(n)]
            redos = manager.redos
            steps.close()
            redone += manager.redos > redos
            ref = make_prompt_cache(stock_model)
            mx.eval(stock_model(mx.array([tok.encode(PROMPT) + got]), cache=ref))
            for c, r in zip(cache, ref):
                assert c.offset == r.offset
                for a, b in zip(c.state, r.state):
                    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=1e-3)
        assert redone, "no close found its last pass missing: the redo at close went untested"
    finally:
        manager.close()


# -- the engine's solo request, with lazy experts --------------------------------

def test_engine_solo_with_deferred_checks_stays_exact_through_join_and_cancel(family_dir):
    """A solo request decodes with late checks; a second request makes it join the
    batch mid-stream; a cancelled one leaves an exact KV cache for the next turn."""
    from test_engine import assert_cache_holds, engine_args, request, run

    from moed.engine.batch import Engine

    path = family_dir["qwen3_moe"]
    stock_model, tok = mlx_lm.load(str(path))

    def ref(prompt, n, sampler=None):
        return [t for t, _ in generate_step(mx.array(tok.encode(prompt)), stock_model, max_tokens=n, sampler=sampler)]

    model, _, manager = load_model(path, capacity=4, profile=None, warm_start=False, decode_mode="speculative")
    try:
        engine = Engine(model, tok, manager, engine_args())
        # alone, greedy and seeded
        engine.submit(request(1, PROMPT, 30))
        out = run(engine, {1})
        assert out[1]["ids"] == ref(PROMPT, 30) and engine.solo_steps == 30
        engine.submit(request(2, "the quick", 30, temperature=0.8, seed=5))
        out = run(engine, {2})
        assert out[2]["ids"] == ref("the quick", 30, seeded(5))
        rollbacks = manager.rollbacks
        assert manager.deferred > 0 and rollbacks > 0
        # joined mid-stream
        engine.submit(request(3, "brown fox jumps", 24))
        events = run(engine, set(), steps=5)
        engine.submit(request(4, "hello", 10))
        assert engine.solo is None and not manager._defer
        out = run(engine, {3, 4}, events)
        assert out[3]["ids"] == ref("brown fox jumps", 24) and out[4]["ids"] == ref("hello", 10)
        assert_cache_holds(engine, tok.encode("brown fox jumps") + out[3]["ids"])
        # cancelled, then extended: the next turn reuses its cache and stays exact
        engine.submit(request(5, "world", 40))
        events = run(engine, set(), steps=7)
        engine.cancel(5)
        follow = tok.decode(tok.encode("world") + events[5]["ids"]) + " again"
        engine.submit(request(6, follow, 12))
        out = run(engine, {6})
        assert out[6]["final"]["usage"]["cached_tokens"] > 1
        assert out[6]["ids"] == ref(follow, 12)
    finally:
        manager.close()


def test_dropping_a_failed_solo_request_survives_a_failing_close(family_dir, monkeypatch):
    """After a failed step the engine drops every request; closing the solo one
    checks (and may redo) its last pass, which can fail the same way: the drop
    must still finish, so the engine goes on."""
    from test_engine import engine_args, request, run

    from moed.engine.batch import Engine
    from moed.experts.store import StoreError

    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=4, profile=None, warm_start=False, decode_mode="speculative")
    try:
        engine = Engine(model, tok, manager, engine_args())
        engine.submit(request(1, PROMPT, 30))
        run(engine, set(), steps=4)
        assert engine.solo is not None

        finish = manager.finish

        def fail():
            finish()
            raise StoreError("shard truncated")  # as a redo's read at close would

        monkeypatch.setattr(manager, "finish", fail)
        assert engine.drop_all() == [1]
        assert engine.solo is None and not engine.busy
        monkeypatch.undo()
        engine.submit(request(2, PROMPT, 8))
        assert run(engine, {2})[2]["ids"] == [t for t, _ in generate_step(
            mx.array(tok.encode(PROMPT)), mlx_lm.load(str(path))[0], max_tokens=8)]
    finally:
        manager.close()


@pytest.mark.parametrize("redo_mode", ["resume", "sync"])
@pytest.mark.parametrize("share", [0.5, 0.25, "below-top-k"])
@pytest.mark.parametrize("family", families.FAMILIES)
def test_each_redo_mode_equals_stock(family, share, redo_mode, family_dir, stock):
    """A pass that missed is finished from its missed layer, resumed speculatively or layer by
    layer in sync: stock's tokens either way, and resumed passes do run."""
    import json

    path = family_dir[family]
    config = json.loads((path / "config.json").read_text())
    top_k = config.get("num_experts_per_tok") or config["text_config"]["num_experts_per_tok"]
    cap = top_k - 1 if share == "below-top-k" else max(1, int(num_experts(path) * share))
    model, tok, manager = load_model(path, capacity=cap, profile=None, warm_start=False, decode_mode="speculative")
    manager.redo_mode = redo_mode
    try:
        cache = assert_greedy_and_seeded_are_stock(model, tok, manager, stock[family])
        stats = manager.stats()
        assert stats["redo_mode"] == redo_mode
        if not can_trim_prompt_cache(cache):  # not trimmable to the end: sync steps, no redo to take
            return
        assert stats["redos"] > 0 and stats["ms_per_redo"] > 0
        # moed's own per-layer Python is shown apart, as a part of building the graph
        assert 0 < stats["decode_step_ms"]["route"] < stats["decode_step_ms"]["build"]
        if redo_mode == "sync":
            assert stats["resumes"] == 0
        elif share != "below-top-k":
            assert stats["resumes"] > 0
    finally:
        manager.close()


def test_a_restart_after_a_rollback_keeps_the_buffer_cache(family_dir, stock, monkeypatch):
    """generate_step empties MLX's buffer cache after its first token; a restart after a rollback
    must not (every later step would allocate afresh), and the tokens stay stock's. With
    MOED_RESTART_CLEARS_CACHE=1 each restart clears it again: the count tells the two apart."""
    fam = families.FAMILIES[0]
    path = family_dir[fam]
    clears = []
    real = mx.clear_cache
    monkeypatch.setattr(mx, "clear_cache", lambda: (clears.append(1), real())[1])

    def run(restarts_clear: bool) -> tuple[int, int]:
        if restarts_clear:
            monkeypatch.setenv("MOED_RESTART_CLEARS_CACHE", "1")
        else:
            monkeypatch.delenv("MOED_RESTART_CLEARS_CACHE", raising=False)
        model, tok, manager = load_model(path, capacity=max(1, num_experts(path) // 4), profile=None,
                                         warm_start=False, decode_mode="speculative")
        try:
            clears.clear()
            ids = mx.array(tok.encode(PROMPT))
            assert [t for t, _ in generate(ids, model, manager, max_tokens=TOKENS)] == stock[fam]["greedy"]
            return len(clears), manager.rollbacks
        finally:
            manager.close()

    kept, rollbacks = run(False)
    cleared, rollbacks_again = run(True)
    assert rollbacks > 0 and rollbacks_again == rollbacks
    # one clear per restart that got past its first token (the last may end the stream there): what the change removes
    assert rollbacks - 1 <= cleared - kept <= rollbacks
    assert sys.modules["mlx_lm.generate"].mx is mx


def _auto_decode(path, monkeypatch, stock_tokens, slow, share):
    """Decode at ``share`` of the experts in auto mode with ``slow`` (redos or sync steps) made 30 ms
    dearer: the mode steps each ran, and the tokens, which must be stock's whatever mode ran."""
    import time

    from moed.experts.manager import ExpertManager
    from moed.experts.redo import Redos

    def slowed(real):
        def run(*args, **kwargs):
            time.sleep(0.03)
            return real(*args, **kwargs)
        return run

    if slow == "redos":
        monkeypatch.setattr(Redos, "_redo_from", slowed(Redos._redo_from))
    else:
        monkeypatch.setattr(ExpertManager, "_count_readback", slowed(ExpertManager._count_readback))
    model, tok, manager = load_model(path, capacity=max(1, int(num_experts(path) * share)), profile=None,
                                     warm_start=False, decode_mode="auto")
    try:
        ids = mx.array(tok.encode(PROMPT))
        tokens = []
        for _ in range(3):
            tokens = [t for t, _ in generate(ids, model, manager, max_tokens=TOKENS)]
            assert tokens == stock_tokens
        return manager.stats()
    finally:
        manager.close()


def test_auto_mode_runs_sync_where_redos_cost_more(family_dir, stock, monkeypatch):
    """Auto picks the decode mode by measured cost per token, redos included: with every redo made
    dear it settles on sync (which never redoes), still retrying speculative now and then."""
    stats = _auto_decode(family_dir["qwen3_moe"], monkeypatch, stock["qwen3_moe"]["greedy"], "redos", 0.25)
    steps = stats["mode_steps"]
    assert steps["sync"] > 2 * steps["speculative"] > 0, steps
    assert stats["mode_costs"]["best"] == "sync"


def test_auto_mode_stays_speculative_where_readbacks_cost_more(family_dir, stock, monkeypatch):
    """The other way round (a GPU's regime): every readback made dear and misses rare (14 of 16
    experts resident; with misses on most steps sync wins even so, as it should), auto settles on
    speculative, still retrying sync (test_experts_prefetch.py checks the growing gap)."""
    stats = _auto_decode(family_dir["qwen3_moe"], monkeypatch, stock["qwen3_moe"]["greedy"], "readbacks", 0.875)
    steps = stats["mode_steps"]
    assert steps["speculative"] > 4 * steps["sync"] > 0, steps
    assert stats["mode_costs"]["best"] == "speculative"
