"""Penalties and logit bias (issue 20.3): protocol v1 fields, honoured through mlx-lm's logits
processors with output equal to stock generate_step's, solo, batched, joined and after a prompt-cache hit;
and the same fields through the OpenAI gateway, moectl run and the editor socket."""

from __future__ import annotations

import pytest

from moed.engine.batch import Engine
from moed_client import protocol as P
from test_engine import PROMPTS, engine_args, request, run

PENALTIES = [
    {"repetition_penalty": 1.5},
    {"presence_penalty": 1.5},
    {"frequency_penalty": 1.0},
    {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "logit_bias": [[7, 3.0]]},
]


@pytest.fixture(scope="module")
def loaded(test_model):
    import mlx_lm

    return mlx_lm.load(str(test_model))


def stock(loaded, prompt: str, n: int, fields: dict) -> list[int]:
    """mlx_lm's generate_step with make_logits_processors, greedy, the same settings."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = loaded
    processors = make_logits_processors(logit_bias={t: b for t, b in fields.get("logit_bias", [])} or None,
                                        repetition_penalty=fields.get("repetition_penalty"), presence_penalty=fields.get("presence_penalty"),
                                        frequency_penalty=fields.get("frequency_penalty"))
    return [t for t, _ in generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=n, logits_processors=processors)]


@pytest.mark.parametrize("fields", PENALTIES, ids=lambda f: "+".join(f))
def test_solo_batch_and_join_equal_stock(loaded, fields):
    plain = stock(loaded, PROMPTS[0], 24, {})
    want = stock(loaded, PROMPTS[0], 24, fields)
    assert want != plain  # the setting does change this output, so equality below means it was applied
    solo = Engine(*loaded, None, engine_args())
    solo.submit(request(1, PROMPTS[0], 24, **fields))
    assert solo.solo is not None and run(solo, {1})[1]["ids"] == want
    # a prompt-cache hit: the penalties still see the whole prompt, cached part included
    repeated = "the the the the the the"
    want = stock(loaded, repeated, 12, fields)
    for seq in (2, 3):
        solo.submit(request(seq, repeated, 12, **fields))
        out = run(solo, {seq})
        assert out[seq]["ids"] == want
    assert out[3]["final"]["usage"]["cached_tokens"] > 0
    want = stock(loaded, PROMPTS[0], 24, fields)

    batch = Engine(*loaded, None, engine_args(no_solo=True))
    batch.submit(request(1, PROMPTS[0], 24, **fields))
    batch.submit(request(2, PROMPTS[1], 12))
    out = run(batch, {1, 2})
    assert out[1]["ids"] == want and out[2]["ids"] == stock(loaded, PROMPTS[1], 12, {})

    joined = Engine(*loaded, None, engine_args())
    joined.submit(request(1, PROMPTS[0], 24, **fields))
    events = run(joined, set(), steps=5)
    joined.submit(request(2, PROMPTS[2], 8))
    assert joined.solo is None
    assert run(joined, {1, 2}, events)[1]["ids"] == want


def test_logit_bias_forces_a_token_and_bad_ids_are_refused(loaded):
    engine = Engine(*loaded, None, engine_args())
    engine.submit(request(1, PROMPTS[1], 6, logit_bias=[[11, 100.0]]))
    assert run(engine, {1})[1]["ids"] == [11] * 6
    with pytest.raises(P.ProtocolError, match="outside the vocabulary"):
        engine.submit(request(2, PROMPTS[1], 6, logit_bias=[[10**9, 1.0]]))


@pytest.mark.parametrize("fields", [
    {"repetition_penalty": 0}, {"repetition_penalty": 11}, {"presence_penalty": 2.5}, {"frequency_penalty": -3},
    {"frequency_penalty": "x"}, {"logit_bias": {"1": 2}}, {"logit_bias": [[1]]}, {"logit_bias": [[-1, 1]]},
    {"logit_bias": [[1, 101]]}, {"logit_bias": [[1, float("nan")]]}, {"logit_bias": [[True, 1]]},
    {"logit_bias": [[i, 1] for i in range(P.MAX_LOGIT_BIAS + 1)]},
])
def test_protocol_refuses_bad_values(fields):
    with pytest.raises(P.ProtocolError) as e:
        P.parse_generate({"type": "generate", "id": "r", "prompt": "x", **fields})
    assert e.value.code == P.ErrorCode.INVALID_REQUEST


def test_protocol_defaults_are_off():
    s = P.parse_generate({"type": "generate", "id": "r", "prompt": "x"}).sampling
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.logit_bias) == (1.0, 0.0, 0.0, [])


# --------------------------------------------------------------------------
# Through the doors


@pytest.fixture(scope="module")
def served(test_model):
    from conftest import DaemonProcess

    d = DaemonProcess(test_model, ("--http", "127.0.0.1:0"))
    try:
        yield d, d.wait_ready()
    finally:
        d.kill()


def test_openai_fields_equal_the_protocol_client(served):
    from test_http import oai

    d, status = served
    client = oai(status["http"])
    fields = {"frequency_penalty": 1.0, "presence_penalty": 0.5}
    got = client.completions.create(model="embedded", prompt=PROMPTS[0], max_tokens=16, temperature=0, **fields)
    with d.client() as c:
        want = c.complete(PROMPTS[0], max_tokens=16, temperature=0, **fields)
        plain = c.complete(PROMPTS[0], max_tokens=16, temperature=0)
    assert got.choices[0].text == want.text != plain.text
    biased = client.completions.create(model="embedded", prompt=PROMPTS[0], max_tokens=4, temperature=0, logit_bias={"11": 100})
    with d.client() as c:
        assert biased.choices[0].text == c.complete(PROMPTS[0], max_tokens=4, temperature=0, logit_bias=[[11, 100]]).text
    again = client.chat.completions.create(model="embedded", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
                                           extra_body={"repetition_penalty": 1.3})
    assert again.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(__import__("openai").BadRequestError):
        client.completions.create(model="embedded", prompt="x", max_tokens=2, frequency_penalty=5)


def test_moectl_run_flags(served, capsys, monkeypatch):
    from moed import cli

    d, _ = served
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(d.runtime_dir))
    assert cli.main(["run", PROMPTS[0], "--max-tokens", "16", "--temperature", "0", "--repetition-penalty", "1.5", "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    with d.client() as c:
        assert out.rstrip("\n") == c.complete(PROMPTS[0], max_tokens=16, temperature=0, repetition_penalty=1.5, top_k=5).text.rstrip("\n")


def test_editor_socket_takes_the_fields(served):
    import socket

    import msgpack

    d, status = served
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(status["editor_socket"])
        s.sendall(msgpack.packb([0, 1, "generate", [{"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "frequency_penalty": 1.0}]]))
        unpacker = msgpack.Unpacker(raw=False)
        reply = None
        while reply is None:
            unpacker.feed(s.recv(65536))
            reply = next((m for m in unpacker if m[0] == 1), None)
    assert reply[2] is None, reply
    with d.client() as c:
        assert reply[3]["text"] == c.complete(PROMPTS[0], max_tokens=16, temperature=0, frequency_penalty=1.0).text


# --------------------------------------------------------------------------
# Through the deferred check's rollbacks (lazy experts at a quarter residency)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_penalties_survive_rollbacks(family, tmp_path):
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_logits_processors

    import families
    from moed.experts import load_model
    from moed.experts.decode import generate
    from test_experts import PROMPT, num_experts, private_state  # noqa: F401 (private_state: an autouse fixture there)

    path = families.build(family, tmp_path / family)
    processors = make_logits_processors(repetition_penalty=1.5, frequency_penalty=0.7)
    model, tok = mlx_lm.load(str(path))
    ids = mx.array(tok.encode(PROMPT))
    want = [t for t, _ in generate_step(ids, model, max_tokens=40, logits_processors=processors)]
    assert want != [t for t, _ in generate_step(ids, model, max_tokens=40)]
    model, tok, manager = load_model(path, capacity=max(1, num_experts(path) // 4), profile=None, warm_start=False, decode_mode="speculative")
    try:
        got = [t for t, _ in generate(ids, model, manager, max_tokens=40, prompt_cache=make_prompt_cache(model), logits_processors=processors)]
        assert manager.stats()["rollbacks"] > 0 and got == want
    finally:
        manager.close()
