"""The engine in process: a lone request decodes solo (generate_step), joins the
batch when another arrives, and every path gives mlx_lm.generate's tokens."""

from __future__ import annotations

import argparse

import pytest

from moed.channel import Submit
from moed.engine.batch import Engine
from moed.engine.loop import Outbox

PROMPTS = ("def main():", "hello world", "the quick brown fox")


def engine_args(**overrides) -> argparse.Namespace:
    args = dict(max_context=4096, prefill_step=2048, max_batch=8, prompt_cache_size=8, prompt_cache_bytes=1 << 30,
                no_solo=False)
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.fixture(scope="module")
def loaded(test_model):
    import mlx_lm

    return mlx_lm.load(str(test_model))


@pytest.fixture(scope="module")
def reference(loaded):
    """mlx_lm's greedy token ids for (prompt, n), ignoring EOS as the requests below do."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tokenizer = loaded
    memo = {}

    def ids(prompt: str, n: int) -> list[int]:
        if (prompt, n) not in memo:
            steps = generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=n)
            memo[prompt, n] = [t for t, _ in steps]
        return memo[prompt, n]

    return ids


def request(seq: int, prompt: str, max_tokens: int, **extra) -> Submit:
    return Submit.from_map(dict(seq=seq, prompt=prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0, min_p=0.0,
                                top_k=0, ignore_eos=True) | extra)


def run(engine: Engine, until_done: set[int], events: dict | None = None, steps: int | None = None) -> dict:
    """Step the engine; token ids and final events per seq."""
    events = events if events is not None else {}
    n = 0
    while engine.busy and (steps is None or n < steps):
        n += 1
        for e in engine.step():
            rec = events.setdefault(e["seq"], {"ids": [], "final": None})
            rec["ids"] += e["token_ids"]
            if "finish" in e:
                rec["final"] = e
    if steps is None:
        assert until_done <= {s for s, r in events.items() if r["final"]}
    return events


def test_lone_request_runs_solo_and_equals_mlx_lm(loaded, reference):
    engine = Engine(*loaded, None, engine_args())
    engine.submit(request(1, PROMPTS[0], 20))
    assert engine.solo is not None
    out = run(engine, {1})
    assert out[1]["ids"] == reference(PROMPTS[0], 20)
    _, tokenizer = loaded
    assert_cache_holds(engine, tokenizer.encode(PROMPTS[0]) + out[1]["ids"])
    assert out[1]["final"]["finish"] == "length"
    assert out[1]["final"]["max_batch"] == 1
    assert out[1]["final"]["engine_decode_tok_s"] > 0
    assert engine.solo_steps == 20 and not engine.gen._generation_batch.uids


def test_second_request_joins_mid_stream_and_both_stay_exact(loaded, reference):
    engine = Engine(*loaded, None, engine_args())
    engine.submit(request(1, PROMPTS[0], 24))
    events = run(engine, set(), steps=3)
    assert len(events[1]["ids"]) == 3 and engine.solo is not None
    engine.submit(request(2, PROMPTS[1], 12))
    assert engine.solo is None and len(engine.active) == 2  # the solo request moved into the batch
    out = run(engine, {1, 2}, events)
    assert out[1]["ids"] == reference(PROMPTS[0], 24)
    assert out[2]["ids"] == reference(PROMPTS[1], 12)
    assert out[1]["final"]["max_batch"] == 2
    assert out[1]["final"]["usage"]["completion_tokens"] == 24
    # the KV cache it left behind holds exactly its tokens (the joined token was not fed twice)
    _, tokenizer = loaded
    tokens = tokenizer.encode(PROMPTS[0]) + out[1]["ids"]
    assert_cache_holds(engine, tokens)


def assert_cache_holds(engine: Engine, tokens: list[int]) -> None:
    from moed.engine.batch import PROMPT_CACHE_MODEL_KEY

    cache, rest = engine.prompt_caches.fetch_nearest_cache(PROMPT_CACHE_MODEL_KEY, tokens)
    assert cache is not None
    assert [c.offset for c in cache] == [len(tokens) - len(rest)] * len(cache)


def test_join_before_the_first_token(loaded, reference):
    engine = Engine(*loaded, None, engine_args())
    for seq, p in enumerate(PROMPTS):
        engine.submit(request(seq, p, 10))
    out = run(engine, {0, 1, 2})
    assert engine.solo_steps == 0
    for seq, p in enumerate(PROMPTS):
        assert out[seq]["ids"] == reference(p, 10)


def test_no_solo_uses_the_batch_for_one_request(loaded, reference):
    engine = Engine(*loaded, None, engine_args(no_solo=True))
    engine.submit(request(1, PROMPTS[2], 12))
    assert engine.solo is None
    out = run(engine, {1})
    assert out[1]["ids"] == reference(PROMPTS[2], 12) and engine.solo_steps == 0


def test_cancelled_solo_request_leaves_its_cache_for_the_next(loaded, reference):
    engine = Engine(*loaded, None, engine_args())
    engine.submit(request(1, PROMPTS[0], 40))
    events = run(engine, set(), steps=5)
    final = engine.cancel(1)
    assert final["finish"] == "cancelled" and not engine.busy
    generated = events[1]["ids"]
    # the next turn extends the prompt and what was generated: only the new part is prefilled
    _, tokenizer = loaded
    follow = tokenizer.decode(tokenizer.encode(PROMPTS[0]) + generated) + " more"
    engine.submit(request(2, follow, 6))
    out = run(engine, {2})
    assert out[2]["final"]["usage"]["cached_tokens"] > len(tokenizer.encode(PROMPTS[0]))
    assert out[2]["ids"] == reference(follow, 6)


def test_solo_stops_at_eos_and_at_stop_strings(loaded, reference):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, None, engine_args())
    full = tokenizer.decode(reference(PROMPTS[1], 30))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    engine.submit(request(1, PROMPTS[1], 30, stop=[stop]))
    out = run(engine, {1})
    assert out[1]["final"]["finish"] == "stop"
    assert not engine.busy

    # EOS ends a request that does not ignore it, and is not part of the output
    expected = reference(PROMPTS[1], 30)
    engine.eos = {expected[3]}
    first = expected.index(expected[3])
    engine.submit(request(2, PROMPTS[1], 30, ignore_eos=False))
    out = run(engine, {2})
    assert out[2]["final"]["finish"] == "stop" and out[2]["ids"] == expected[:first]


class FakeChannel:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg.events)


def token(seq, text, ids):
    return {"seq": seq, "text": text, "token_ids": ids}


def test_outbox_sends_first_tokens_at_once_and_merges_the_rest():
    ch = FakeChannel()
    box = Outbox(ch, interval=10.0)
    box.add([token(1, "a", [1])])
    box.flush(now=100.0)
    assert ch.sent == [[token(1, "a", [1])]]  # a first token does not wait
    box.add([token(1, "b", [2])])
    box.flush(now=100.001)
    box.add([token(1, "c", [3]), token(2, "x", [9])])  # request 2's first token: everything goes now
    box.flush(now=100.002)
    assert ch.sent[1] == [token(1, "bc", [2, 3]), token(2, "x", [9])]
    box.add([token(2, "y", [10])])
    box.flush(now=105.0)
    assert len(ch.sent) == 2  # held: under the interval
    box.flush(now=110.1)
    assert ch.sent[2] == [token(2, "y", [10])]  # the interval passed


def test_outbox_final_event_carries_held_tokens_and_goes_at_once():
    ch = FakeChannel()
    box = Outbox(ch, interval=10.0)
    box.add([token(1, "a", [1])])
    box.flush(now=0.0)
    box.add([token(1, "b", [2])])
    box.flush(now=0.001)
    box.add([dict(token(1, "c", [3]), finish="length", usage={"completion_tokens": 3})])
    box.flush(now=0.002)
    assert ch.sent[-1] == [{"seq": 1, "text": "bc", "token_ids": [2, 3], "finish": "length", "usage": {"completion_tokens": 3}}]
    assert not box.pending and not box.streaming


def test_seeded_request_gives_the_same_tokens_alone_and_when_another_joins(loaded):
    """Issue 18 item 8: generate_step draws token n+1's key before it yields token n; a join must undraw it."""
    seeded = dict(temperature=0.8, seed=99)
    alone = Engine(*loaded, None, engine_args())
    alone.submit(request(1, PROMPTS[0], 16, **seeded))
    expected = run(alone, {1})[1]["ids"]

    engine = Engine(*loaded, None, engine_args())
    engine.submit(request(1, PROMPTS[0], 16, **seeded))
    events = run(engine, set(), steps=1)
    assert len(events[1]["ids"]) == 1 and engine.solo is not None
    engine.submit(request(2, PROMPTS[1], 8, **seeded))
    assert engine.solo is None
    assert run(engine, {1, 2}, events)[1]["ids"] == expected
