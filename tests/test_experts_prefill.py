"""Expert-major prefill (moed/experts/streaming.py): chunked prefill at partial
residency equals stock mlx-lm for every family, and no expert is read twice for
one layer of one forward."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import families  # noqa: E402

mx = pytest.importorskip("mlx.core")
import mlx_lm  # noqa: E402

from moed.experts import load_model  # noqa: E402
from test_experts import family_dir, num_experts, private_state  # noqa: E402,F401  (fixtures)

PROMPT = "the quick brown fox jumps over the lazy dog while " * 4
CHUNK = 16  # prefill tokens per forward: several chunks, each routing to many experts
NEW_TOKENS = 6


def run(model, tokenizer):
    """Greedy tokens and the logprobs of the first one (the prefill's output)."""
    out = list(mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=NEW_TOKENS, prefill_step_size=CHUNK))
    return [r.token for r in out], out[0].logprobs


@pytest.fixture(scope="module")
def reference(family_dir):
    return {f: run(*mlx_lm.load(str(p))) for f, p in family_dir.items()}


def top_k(path: Path) -> int:
    import json

    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return cfg.get("num_experts_per_tok") or cfg["experts_per_token"]


def count_reads(manager) -> Counter:
    """(layer, forward, expert) -> reads, by wrapping every cache's fill."""
    reads = Counter()
    for cache in manager.caches:
        fill = cache.fill

        def counted(slot, expert, _fill=fill, _layer=cache.layer):
            reads[(_layer, manager.forward_id, int(expert))] += 1
            return _fill(slot, expert)

        cache.fill = counted
    return reads


@pytest.mark.parametrize("share", [1.0, 0.5, 0.25, "below-top-k"])
@pytest.mark.parametrize("family", families.FAMILIES)
def test_chunked_prefill_exact_and_reads_once(family, share, family_dir, reference):
    path = family_dir[family]
    cap = max(1, top_k(path) - 1) if share == "below-top-k" else max(1, int(num_experts(path) * share))
    model, tok, manager = load_model(path, capacity=cap, prefetch=False, profile=None)
    try:
        reads = count_reads(manager)
        tokens, logprobs = run(model, tok)
        ref_tokens, ref_logprobs = reference[family]
        assert tokens == ref_tokens
        assert mx.array_equal(logprobs, ref_logprobs)  # same per-token arithmetic, bit for bit
        assert not reads or max(reads.values()) == 1, [k for k, n in reads.items() if n > 1][:5]
        if share not in (1.0,):
            assert manager.stats()["prefill_stream"]["streamed_experts"] > 0  # the path under test ran
    finally:
        manager.close()


def test_prefetcher_loads_are_not_read_again(family_dir, reference):
    """With the prefetcher on, its loads for a layer land before the layer streams its misses."""
    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=4, prefetch=True, profile=None)
    try:
        reads = count_reads(manager)
        assert run(model, tok)[0] == reference["qwen3_moe"][0]
        assert max(reads.values()) == 1
    finally:
        manager.close()


@pytest.mark.parametrize("backend_name", ["cuda", "metal"])
def test_streamed_pieces_take_stock_kernel_class(backend_name, family_dir, reference, monkeypatch):
    """With a GPU backend's kernel rule (kernels.py), no streamed piece is left in another kernel
    class than stock's whole-chunk call, and the output stays stock's."""
    import moed.experts.kernels as kernels
    from moed.experts.lazy import LazySwitch

    monkeypatch.setattr(kernels, "backend", lambda: backend_name)
    path = family_dir["qwen3_moe"]
    model, tok, manager = load_model(path, capacity=max(1, num_experts(path) // 4), prefetch=False, profile=None)
    try:
        calls = []
        for m in model.modules():
            if isinstance(m, LazySwitch):
                same, inner = m._same_kernel, m._same_kernel.inner
                same.inner = lambda x, idx, _inner=inner: calls.append(idx.size) or _inner(x, idx)
        assert run(model, tok)[0] == reference["qwen3_moe"][0]
        switches = [m._same_kernel for m in model.modules() if isinstance(m, LazySwitch)]
        assert sum(s.padded + s.split for s in switches) > 0  # the rule changed some calls
        if backend_name == "cuda":  # under 8 pairs only where stock has them too: a decode step's top-k
            assert {n for n in calls if n < 8} <= {top_k(path)}, sorted(calls)[:10]
    finally:
        manager.close()


def stock_chunked(path: Path, chunk: int):
    model, tok = mlx_lm.load(str(path))
    out = list(mlx_lm.stream_generate(model, tok, PROMPT, max_tokens=NEW_TOKENS, prefill_step_size=chunk))
    return [r.token for r in out], out[0].logprobs


@pytest.mark.parametrize("share", [0.5, 0.25])
@pytest.mark.parametrize("family", families.FAMILIES)
def test_two_token_chunks_exact(family, share, family_dir):
    """Chunks as short as the engine's clock may ask for at partial residency (MIN_CHUNK), where a
    chunk's pairs often fit the slots and the manager picks speculative or sync per chunk."""
    path = family_dir[family]
    model, tok, manager = load_model(path, capacity=max(1, int(num_experts(path) * share)), prefetch=False, profile=None)
    try:
        reads = count_reads(manager)
        out = list(mlx_lm.stream_generate(model, tok, PROMPT, max_tokens=NEW_TOKENS, prefill_step_size=2))
        ref_tokens, ref_logprobs = stock_chunked(path, 2)
        assert [r.token for r in out] == ref_tokens
        assert mx.array_equal(out[0].logprobs, ref_logprobs)
        assert max(reads.values()) == 1
        modes = manager.stats()["chunk_modes"]
        assert modes["sync"] > modes["speculative"]  # chunks that miss are not computed twice, chunk after chunk
    finally:
        manager.close()


def test_chunk_speculates_only_after_two_chunks_that_hit(family_dir):
    """A prefill chunk runs speculatively only if neither of the two chunks before it found an
    expert missing (chunk_miss_rate, weight 1/2, under 1/4): one miss sends chunks to sync mode,
    where they still tell whether they would have missed, so speculation comes back."""
    from mlx_lm.models.cache import make_prompt_cache

    path = family_dir["qwen3_moe"]
    # all experts but one: some chunks route to the missing one, some do not
    model, tok, manager = load_model(path, capacity=num_experts(path) - 1, prefetch=False, profile=None)
    try:
        cache = make_prompt_cache(model)
        ids = tok.encode(PROMPT * 2)
        seen = []
        for i in range(0, len(ids) - 1, 2):
            before = dict(manager.chunk_modes), sum(c.misses for c in manager.caches)
            model(mx.array(ids[i:i + 2])[None], cache=cache)
            mx.eval([c.state for c in cache])
            mode = next(m for m, n in manager.chunk_modes.items() if n > before[0][m])
            seen.append((mode, sum(c.misses for c in manager.caches) > before[1]))
        for t, (mode, _) in enumerate(seen):
            hit_lately = not any(missed for _, missed in seen[max(0, t - 2):t])
            assert (mode == "speculative") == hit_lately, seen[max(0, t - 2):t + 1]
        speculative = [missed for mode, missed in seen if mode == "speculative"]
        assert True in speculative and False in speculative and len(speculative) < len(seen)  # each case ran
    finally:
        manager.close()
