"""Chunked, interleaved prefill (moed/engine/prefill.py): a long prompt is fed a chunk
per engine step, others decode in between, cancel lands within a chunk, and the
tokens stay mlx-lm's."""

from __future__ import annotations

import pytest

from moed.engine.batch import Engine
from moed.engine.prefill import MIN_CHUNK, ChunkClock
from test_engine import engine_args, loaded, request, run  # noqa: F401  (fixtures)

LONG = "the quick brown fox jumps over the lazy dog. " * 40
CHUNK = 32


def chunked_engine(loaded, **kw):
    # chunks of a fixed count so the test knows how many steps a prompt takes
    return Engine(*loaded, None, engine_args(prefill_step=CHUNK, prefill_chunk_ms=0, **kw))


def stock(loaded, prompt: str, n: int, step: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tokenizer = loaded
    return [t for t, _ in generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=n, prefill_step_size=step)]


@pytest.mark.parametrize("no_solo", [False, True])
def test_chunked_prompt_equals_mlx_lm(loaded, no_solo):
    engine = chunked_engine(loaded, no_solo=no_solo)
    engine.submit(request(1, LONG, 8))
    n_prompt = len(loaded[1].encode(LONG))
    assert engine.prefilling and engine.solo is None and not engine.active
    steps = 0
    while engine.prefilling:
        assert not engine.step()  # a prefill chunk makes no token
        steps += 1
    assert steps == -(-(n_prompt - 1) // CHUNK)  # all but the last token, a chunk per step
    out = run(engine, {1})
    assert out[1]["ids"] == stock(loaded, LONG, 8, CHUNK)
    assert out[1]["final"]["usage"]["prompt_tokens"] == n_prompt


def test_cancel_mid_prefill_frees_the_engine_within_a_chunk(loaded):
    engine = chunked_engine(loaded)
    engine.submit(request(1, LONG, 8))
    run(engine, set(), steps=2)
    assert engine.prefilling
    final = engine.cancel(1)
    assert final["finish"] == "cancelled" and final["usage"]["completion_tokens"] == 0
    assert not engine.busy  # nothing more of it runs
    # what was fed stays as a prompt cache: the same prompt again reuses those chunks, and stays exact
    engine.submit(request(2, LONG, 4))
    out = run(engine, {2})
    assert out[2]["final"]["usage"]["cached_tokens"] == 2 * CHUNK
    assert out[2]["ids"] == stock(loaded, LONG, 4, CHUNK)


def test_short_request_is_served_while_a_long_prompt_prefills(loaded):
    engine = chunked_engine(loaded)
    engine.submit(request(1, LONG * 2, 4))
    run(engine, set(), steps=1)
    engine.submit(request(2, "hello world", 3))
    events = {}
    while not (events.get(2) or {}).get("final"):
        run(engine, set(), events, steps=1)
    assert engine.prefilling and not events.get(1, {}).get("ids")  # the long one is still being fed
    assert events[2]["ids"] == stock(loaded, "hello world", 3, CHUNK)
    run(engine, {1}, events)
    assert events[1]["ids"] == stock(loaded, LONG * 2, 4, CHUNK)


def test_two_long_prompts_take_turns(loaded):
    engine = chunked_engine(loaded)
    engine.submit(request(1, LONG, 2))
    engine.submit(request(2, LONG + " and more", 2))
    start = {p.active.seq: len(p.todo) for p in engine.prefilling}
    for _ in range(4):
        engine.step()
    now = {p.active.seq: len(p.todo) for p in engine.prefilling}
    assert now == {1: start[1] - 2 * CHUNK, 2: start[2] - 2 * CHUNK}  # a chunk each, in turn


def test_chunk_clock_sizes_chunks_by_time():
    clock = ChunkClock(0.25, 2048)
    assert clock.size() == 128  # nothing measured yet
    for n in (128, 64, 256):
        clock.record(n, 0.01 + n * 0.001)  # 10 ms fixed, 1 ms a token
    fixed, per = clock.fit()
    assert fixed == pytest.approx(0.01) and per == pytest.approx(0.001)
    assert clock.size() == 240  # (250 - 10) ms / 1 ms
    slow = ChunkClock(0.25, 2048)
    for n in (16, 32, 64):
        slow.record(n, 1.0 + n * 0.002)  # a second of expert reads whatever the length
    assert slow.size() == 128  # grows (at most doubling) until compute matches the fixed cost, not to the minimum
    slow.record(128, 1.0 + 128 * 0.002)
    slow.record(256, 1.0 + 256 * 0.002)
    assert slow.size() == 500
    fast = ChunkClock(0.25, 512)
    fast.record(100, 0.001)
    assert fast.size() == 200 and ChunkClock(0.0, 64).size() == 64  # doubling, then the --prefill-step cap
    noisy = ChunkClock(0.25, 2048)
    for n, s in ((100, 0.30), (300, 0.25), (200, 0.28)):  # longer chunks looked cheaper: no trust in the slope
        noisy.record(n, s)
    assert noisy.size() == int(0.25 / (0.83 / 600))
    tiny = ChunkClock(0.25, 2048)
    tiny.record(100, 10.0)
    assert tiny.size() == MIN_CHUNK
