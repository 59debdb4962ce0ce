"""moed/channel.py: each front<->engine message survives its msgpack map, and every engine
setting has one default that `moed serve`, the engine and moed.config all use."""

from __future__ import annotations

from dataclasses import fields

import pytest

from moed import config
from moed.channel import (Cancel, EngineOptions, Events, Failed, Fatal, Progress, Ready, SendStats, Shutdown, Stats,
                          Submit, decode, encode)
from moed.front import main
from moed_client import protocol as P

REQUEST = P.parse_generate({"type": "generate", "id": "r1", "prompt": "hi", "max_tokens": 7, "temperature": 0.5,
                            "seed": 3, "stop": ["\n"], "ignore_eos": True})


@pytest.mark.parametrize("msg", [
    Submit(4, REQUEST),
    Submit(5, P.parse_generate({"type": "generate", "id": "r2", "messages": [{"role": "user", "content": "x"}]})),
    Cancel(4), SendStats(), Shutdown(), Progress("loading", "loading m", 0.0), Ready({"name": "m"}, 123),
    Events([{"seq": 4, "text": "a", "token_ids": [1]}, {"seq": 4, "text": "", "token_ids": [], "finish": "stop",
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0}}], 1.5),
    Failed(4, P.ErrorCode.ENGINE_ERROR, "boom"), Stats({"active": 1, "experts": None}), Fatal("no model"),
])
def test_every_message_survives_its_map(msg):
    assert decode(encode(msg)) == msg


def test_a_submit_carries_the_typed_request_whole():
    back = decode(encode(Submit(9, REQUEST)))
    assert isinstance(back.request, P.GenerateRequest) and back.request == REQUEST
    assert back.request.sampling.stop == ["\n"] and back.request.sampling.seed == 3


def test_the_engine_and_moed_serve_share_each_default():
    engine, rest = EngineOptions.parse(["--channel", "ipc:///x", "--model", "/m"])
    assert engine == EngineOptions() and rest.model == "/m"
    serve = vars(main.build_parser().parse_args(["serve"]))
    for f in fields(EngineOptions):
        if f.name in main.FROM_CONFIG:
            assert serve[f.name] is None and config.BY_NAME[f.name].default == f.default
        else:
            assert serve[f.name] == f.default, f.name
    assert config.BY_NAME["approximate"].default is EngineOptions.approximate
    assert config.BY_NAME["prefetch"].default is (not EngineOptions.no_prefetch)


def test_options_travel_to_the_engine_unchanged():
    options = EngineOptions(capacity=3, memory_budget=1 << 30, approximate=True, no_prefetch=True, max_batch=2,
                            stream_interval=0.0, prompt_cache_bytes=1 << 20, debug=True)
    argv = options.to_argv()
    assert "--max-context" not in argv  # left at its default
    assert EngineOptions.parse(["--channel", "ipc:///x", "--model", "/m", *argv])[0] == options
