"""Cheap checks first: a prompt over the context is refused by bytes in the front
(moed/front/prompt_bound.py) or by its tokens in the engine, with
context_length_exceeded; prompts are tokenized off the engine loop (tokenizing.py)."""

from __future__ import annotations

import threading

import pytest
from moed_client import protocol as P

from moed.engine.batch import Engine
from moed.engine.loading import max_token_bytes
from moed.engine.tokenizing import Tokenizing
from moed.front.prompt_bound import check_context, fewest_tokens
from test_engine import engine_args, loaded, request, run  # noqa: F401  (fixtures)


def parsed(**m) -> P.GenerateRequest:
    return P.parse_generate(dict({"type": P.GENERATE, "id": "r", "max_tokens": 4}, **m), max_tokens_limit=1 << 20)


def test_bound_by_bytes_is_a_lower_bound_on_tokens(loaded):
    _, tokenizer = loaded
    most = max_token_bytes(tokenizer)
    assert most and most >= max(len(tokenizer.decode([i]).encode()) for i in range(len(tokenizer.get_vocab())))
    for text in ("hello world", "def main():\n    return 1\n" * 20, "ünïcödé ✓ " * 30, " " * 500):
        assert fewest_tokens(parsed(prompt=text), most) <= len(tokenizer.encode(text))
    chat = parsed(messages=[{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y" * 28}])
    assert fewest_tokens(chat, 64) == 2
    assert fewest_tokens(parsed(token_ids=[1, 2, 3]), None) == 3 and fewest_tokens(parsed(prompt="x" * 10), None) == 0


def test_check_context_refuses_what_cannot_fit():
    check_context(parsed(token_ids=[1] * 12), 16, None)  # 12 + 4 = 16: fits
    with pytest.raises(P.ProtocolError) as e:
        check_context(parsed(token_ids=[1] * 13), 16, None)
    assert e.value.code == P.ErrorCode.CONTEXT_LENGTH_EXCEEDED
    check_context(parsed(prompt="x" * 12 * 8), 16, 8)
    with pytest.raises(P.ProtocolError):
        check_context(parsed(prompt="x" * (12 * 8 + 1)), 16, 8)


def test_engine_one_token_under_and_over_the_context(loaded):
    _, tokenizer = loaded
    prompt = "the quick brown fox jumps over the lazy dog"
    n = len(tokenizer.encode(prompt))
    engine = Engine(*loaded, None, engine_args(max_context=n + 4))
    engine.submit(request(1, prompt, 4))  # exactly the context
    assert run(engine, {1})[1]["final"]["finish"] == "length"
    with pytest.raises(P.ProtocolError) as e:
        engine.submit(request(2, prompt, 5))  # one token over
    assert e.value.code == P.ErrorCode.CONTEXT_LENGTH_EXCEEDED and not engine.busy


def test_tokenizing_runs_off_the_loop_and_a_cancel_ends_it_there(loaded):
    engine = Engine(*loaded, None, engine_args())
    gate = threading.Event()
    real = engine.tokenize

    def slow(req, tokenizer=None):
        assert threading.current_thread() is not threading.main_thread()
        gate.wait(10)
        return real(req, tokenizer)

    engine.tokenize = slow
    tk = Tokenizing(engine)
    try:
        assert tk.tokenizer is not engine.tokenizer  # a copy: the loop's detokenizers keep the original
        tk.add(request(1, "hello world", 2))
        tk.add(request(2, "def main():", 2))
        assert tk.ready() == []  # the loop goes on while the prompt is being tokenized
        final = tk.cancel(1)
        assert final["seq"] == 1 and final["finish"] == "cancelled" and final["usage"]["completion_tokens"] == 0
        gate.set()
        tk.pool.submit(lambda: None).result(10)  # the worker has finished the queued job
        (msg, tokens), = tk.ready()
        assert msg.seq == 2 and tokens.result() == loaded[1].encode("def main():")
    finally:
        tk.close()
