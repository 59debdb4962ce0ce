"""moed serve end to end on the shared test daemon: streaming, exactness against
in-process mlx-lm, concurrency, cancel, stop strings, prefix reuse, sampling."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from moed_client import RequestError, protocol as P

PROMPTS = ["hello world", "the quick brown fox", "def main():", "user assistant"]


@pytest.fixture(scope="module")
def reference(test_model):
    """Greedy outputs of in-process mlx_lm.generate, the ground truth the daemon must equal."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(test_model))
    cache = {}

    def generate(prompt, max_tokens):
        key = (prompt if isinstance(prompt, str) else tuple(prompt), max_tokens)
        if key not in cache:
            cache[key] = mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens)
        return cache[key]

    generate.tokenizer = tokenizer
    return generate


def test_hello_status_ping(shared_daemon):
    with shared_daemon.client() as c:
        assert c.server["version"][0] == P.PROTOCOL_VERSION[0]
        assert c.server["instance_id"]
        status = c.status()
        for key in ("state", "pid", "uptime_s", "model", "memory", "requests", "clients", "recent_tok_s", "experts",
                    "editor_socket", "progress", "instance_id", "version"):
            assert key in status, key
        assert status["state"] == "ready"
        assert status["pid"] == shared_daemon.pid
        assert status["instance_id"] == c.server["instance_id"]
        assert status["model"]["model_type"]
        assert status["memory"]["rss_bytes"] > 0
        assert c.ping() < 5


def test_status_shows_the_prefill_speed_measured_at_start(shared_daemon):
    deadline = time.monotonic() + 10  # the engine's stats reach the front once a second
    with shared_daemon.client() as c:
        while not (prefill := c.status().get("prefill")) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert prefill["target_ms"] == 200.0
    forwards = prefill["calibration"]["forwards"]
    assert forwards[0]["tokens"] == 16 and all(f["ms"] > 0 for f in forwards)
    assert prefill["calibration"]["first_chunk"] >= 16


def test_socket_permissions(shared_daemon):
    assert stat.S_IMODE(os.stat(shared_daemon.runtime_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(shared_daemon.socket).st_mode) == 0o600


def test_greedy_stream_equals_mlx_lm(shared_daemon, reference):
    with shared_daemon.client() as c:
        stream = c.generate(PROMPTS[0], max_tokens=24)
        chunks = list(stream)
    assert len(chunks) > 1, "the answer must stream in several chunks"
    assert "".join(ch.text for ch in chunks) == reference(PROMPTS[0], 24)
    assert stream.finish_reason in ("length", "stop")
    assert stream.usage["prompt_tokens"] > 0
    assert stream.usage["completion_tokens"] == sum(len(ch.token_ids) for ch in chunks)
    assert stream.timings["max_batch"] == 1
    assert stream.timings["ttft_s"] > 0
    assert stream.timings["engine_decode_tok_s"] > 0


def test_four_concurrent_clients_equal_mlx_lm(shared_daemon, reference):
    """Four clients at once share the batch and each still gets exactly mlx_lm's greedy text."""
    max_tokens = 96
    results, batch, errors = {}, {}, []
    barrier = threading.Barrier(len(PROMPTS))

    def run(prompt):
        try:
            with shared_daemon.client() as c:
                barrier.wait()
                stream = c.generate(prompt, max_tokens=max_tokens)
                results[prompt] = "".join(ch.text for ch in stream)
                batch[prompt] = stream.timings["max_batch"]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for p in PROMPTS:
        assert results[p] == reference(p, max_tokens), f"{p!r}: batched output differs from mlx_lm.generate"
    # They really shared decode steps (the engine reports the largest batch each request was in).
    assert max(batch.values()) == len(PROMPTS), batch
    assert min(batch.values()) >= 2, batch


def test_chat_messages_use_template(shared_daemon, reference):
    messages = [{"role": "user", "content": "hello world"}]
    ids = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    with shared_daemon.client() as c:
        out = c.chat(messages, max_tokens=16).collect()
    assert out.text == reference(list(ids), 16)
    assert out.usage["prompt_tokens"] == len(ids)


def test_token_ids_prompt(shared_daemon, reference):
    ids = reference.tokenizer.encode("the quick brown fox")
    with shared_daemon.client() as c:
        out = c.complete(token_ids=list(ids), max_tokens=12)
    assert out.text == reference(list(ids), 12)


def test_max_tokens_gives_length(shared_daemon):
    with shared_daemon.client() as c:
        out = c.complete("hello world", max_tokens=5)
    assert out.finish_reason in ("length", "stop")
    if out.finish_reason == "length":
        assert out.usage["completion_tokens"] == 5
        assert len(out.token_ids) == 5


def test_stop_string_cuts_output(shared_daemon, reference):
    full = reference(PROMPTS[1], 40)
    # A stop string taken from the middle of the greedy output.
    cut = len(full) // 2
    stop = full[cut : cut + 3]
    if len(stop.strip()) == 0 or not stop:
        pytest.skip("greedy output too short for a stop string")
    with shared_daemon.client() as c:
        out = c.complete(PROMPTS[1], max_tokens=40, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    assert stop not in out.text


def test_prefix_reuse_reports_cached_tokens(shared_daemon, reference):
    """A follow-up whose prompt extends an earlier one reuses its KV cache, and stays exact."""
    first = "the lazy dog and the quick brown fox"
    with shared_daemon.client() as c:
        a = c.complete(first, max_tokens=8)
        follow = first + a.text + " hello"
        b = c.complete(follow, max_tokens=16)
    assert b.usage["cached_tokens"] > 0
    assert b.usage["cached_tokens"] < b.usage["prompt_tokens"]
    assert b.text == reference(follow, 16)


def test_seeded_sampling_is_reproducible(shared_daemon):
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95, top_k=50)
    with shared_daemon.client() as c:
        a = c.complete("hello world", seed=1234, **kw)
        b = c.complete("hello world", seed=1234, **kw)
        others = {c.complete("hello world", seed=s, **kw).text for s in (1, 2, 3)}
    assert a.token_ids == b.token_ids
    assert len(others | {a.text}) > 1, "different seeds should not all give the same text"


def test_leaving_the_loop_cancels(shared_daemon):
    with shared_daemon.client() as c:
        for i, _ in enumerate(c.generate("hello world", max_tokens=5000, ignore_eos=True)):
            if i == 2:
                break
        deadline = time.monotonic() + 5
        while c.status()["requests"]["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.status()["requests"] == {"active": 0, "queued": 0}
        # The connection is still good.
        assert c.complete("hello", max_tokens=3).token_ids


def test_cancel_message_gives_cancelled_done(shared_daemon):
    with shared_daemon.client() as c:
        stream = c.generate("hello world", max_tokens=5000, ignore_eos=True)
        next(stream)
        c._send({"type": P.CANCEL, "id": stream.id})
        rest = list(stream)
        assert stream.finish_reason == "cancelled"
        assert len(rest) < 4990
        # Every token was sent exactly once, and usage counts what was sent.
        assert len(stream.token_ids) == stream.usage["completion_tokens"]


def test_status_and_ping_answered_while_decoding(shared_daemon):
    with shared_daemon.client() as c, shared_daemon.client() as probe:
        stream = c.generate("hello world", max_tokens=5000, ignore_eos=True)
        next(stream)
        status = probe.status()
        assert status["requests"]["active"] == 1
        assert probe.ping() < 2.0
        stream.close()


def test_many_requests_on_one_client(shared_daemon, reference):
    with shared_daemon.client() as c:
        streams = [c.generate(p, max_tokens=10) for p in PROMPTS]
        texts = [s.collect().text for s in streams]
    assert texts == [reference(p, 10) for p in PROMPTS]


def test_long_prompt_equals_mlx_lm(shared_daemon, reference):
    long_prompt = " ".join(f"{i} the quick brown fox" for i in range(150))
    assert len(reference.tokenizer.encode(long_prompt)) > 600
    with shared_daemon.client() as c:
        out = c.complete(long_prompt, max_tokens=16)
    assert out.text == reference(long_prompt, 16)


def test_ignore_eos_runs_to_max_tokens(shared_daemon):
    with shared_daemon.client() as c:
        out = c.complete("hello world", max_tokens=40, ignore_eos=True)
        with pytest.raises(RequestError, match="ignore_eos"):
            c.complete("hello", ignore_eos="yes")
    assert out.finish_reason == "length"
    assert out.usage["completion_tokens"] == 40 == len(out.token_ids)


def test_new_request_joins_the_running_batch(shared_daemon):
    """A request arriving mid-stream is decoded alongside it, not after it."""
    with shared_daemon.client() as c, shared_daemon.client() as other:
        long = c.generate("hello world", max_tokens=5000, ignore_eos=True)
        next(long)
        short = other.complete("the quick brown fox", max_tokens=8, ignore_eos=True)
        assert short.timings["max_batch"] == 2
        assert long.finish_reason is None  # still running
        long.close()


def test_seeded_request_same_alone_and_in_a_batch(shared_daemon):
    """A seed's draws come from the request's own key, so batching with others does not change them."""
    kw = dict(max_tokens=32, temperature=1.0, top_p=0.9, seed=7)
    with shared_daemon.client() as c, shared_daemon.client() as other:
        alone = c.complete("hello world", **kw)
        background = other.generate("the quick brown fox", max_tokens=5000, ignore_eos=True)
        next(background)
        batched = c.complete("hello world", **kw)
        background.close()
    assert batched.timings["max_batch"] >= 2
    assert batched.token_ids == alone.token_ids
