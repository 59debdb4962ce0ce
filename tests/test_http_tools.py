"""Tool calling and structured output through the gateway with the real SDKs (openai, anthropic,
langchain-openai), streaming and not, on a checkpoint whose chat template offers tools.

A tiny model calls no tool of its own accord, so the tests force the call with ``tool_choice``
(constrained decoding, moed/engine/structured.py); what turns its text into a call is the real
path: mlx-lm's json_tools parser behind the template's markers (moed/engine/tool_calls.py)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from moed.doors import http_token
from test_http import oai
from tool_model import make_tool_model

pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}}, "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now.", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCE = {"type": "function", "function": {"name": "get_weather"}}
MODEL = "tools-model"  # the checkpoint's directory name: the id the gateway serves it under


@pytest.fixture(scope="module")
def tool_model(test_model, tmp_path_factory):
    return make_tool_model(test_model, tmp_path_factory.mktemp("tools") / MODEL)


@pytest.fixture(scope="module")
def served(tool_model):
    from conftest import gateway_daemon

    with gateway_daemon(tool_model) as served:
        yield served


@pytest.fixture(scope="module")
def tokenizer(tool_model):
    from mlx_lm.tokenizer_utils import load

    return load(tool_model)


def claude(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, auth_token=http_token.load(), max_retries=0, timeout=60)


def test_openai_forced_call_whole_and_streamed(served):
    _, url = served
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=FORCE, max_tokens=60, temperature=0)
    got = oai(url).chat.completions.create(**kw)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) in ({"city": "Paris"}, {"city": "Oslo"})
    assert choice.message.content is None
    deltas, finish = [], None
    for chunk in oai(url).chat.completions.create(**kw, stream=True):
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [d.index for d in deltas] == [0]
    assert (deltas[0].function.name, deltas[0].function.arguments) == (call.function.name, call.function.arguments)


def test_required_picks_one_of_the_tools(served):
    _, url = served
    got = oai(url).chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=60, temperature=0)
    assert got.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in got.choices[0].message.tool_calls][0] in ("get_weather", "get_time")


def test_tool_results_go_through_the_template(served, tokenizer):
    _, url = served
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    got = oai(url).chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=3, temperature=0)
    rendered = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    want = tokenizer.apply_chat_template(rendered, tools=[WEATHER], add_generation_prompt=True)
    assert got.usage.prompt_tokens == len(want)
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in tokenizer.decode(want)


def test_anthropic_tool_use_whole_and_streamed(served, tokenizer):
    _, url = served
    tools = [{"name": "get_weather", "description": "The weather in a city.", "input_schema": WEATHER["function"]["parameters"]}]
    kw = dict(model=MODEL, max_tokens=60, messages=ASK, tools=tools, tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    got = claude(url).messages.create(**kw)
    assert got.stop_reason == "tool_use" and got.stop_sequence is None
    (use,) = [b for b in got.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input in ({"city": "Paris"}, {"city": "Oslo"})
    with claude(url).messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts[-1] == "tool_use" and any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    assert final.stop_reason == "tool_use" and [b.input for b in final.content if b.type == "tool_use"] == [use.input]
    # the call and its result back in the conversation, through the template
    history = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    again = claude(url).messages.create(model=MODEL, max_tokens=2, messages=history, tools=tools, extra_body={"temperature": 0})
    rendered = [*ASK, {"role": "assistant", "content": "", "tool_calls": [{"id": use.id, "type": "function", "function": {"name": use.name, "arguments": use.input}}]},
                {"role": "tool", "tool_call_id": use.id, "content": "sunny"}]
    assert again.usage.input_tokens == len(tokenizer.apply_chat_template(rendered, tools=[WEATHER], add_generation_prompt=True))


def test_langchain_bind_tools(served):
    from langchain_openai import ChatOpenAI

    _, url = served
    llm = ChatOpenAI(base_url=url + "/v1", api_key=http_token.load(), model=MODEL, temperature=0, max_tokens=60, max_retries=0, timeout=60)
    got = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    (call,) = got.tool_calls
    assert call["name"] == "get_weather" and call["args"] in ({"city": "Paris"}, {"city": "Oslo"})


def test_protocol_client_gets_calls(served):
    d, _ = served
    with d.client() as c:
        done = c.complete(messages=ASK, tools=[WEATHER], tool_choice={"name": "get_weather"}, max_tokens=60)
    assert done.finish_reason == "tool_calls" and [t["name"] for t in done.tool_calls] == ["get_weather"]
    assert "<tool_call>" not in done.text and json.loads(done.tool_calls[0]["arguments"])["city"] in ("Paris", "Oslo")


def test_no_tools_means_plain_text(served):
    _, url = served
    plain = oai(url).chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    none = oai(url).chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0)
    assert none.choices[0].message.content == plain.choices[0].message.content and not none.choices[0].message.tool_calls


def test_json_schema_response_format(served):
    _, url = served
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    got = oai(url).chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=40, temperature=0)
    value = json.loads(got.choices[0].message.content)
    assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)
    streamed = "".join(c.choices[0].delta.content or "" for c in oai(url).chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, max_tokens=40, temperature=0, stream=True) if c.choices)
    assert streamed == got.choices[0].message.content


def test_json_object_starts_an_object(served):
    _, url = served
    got = oai(url).chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=6, temperature=0)
    assert got.choices[0].message.content.startswith("{")


def test_a_template_without_tools_gets_400(test_model):
    from conftest import gateway_daemon

    with gateway_daemon(test_model) as (_, url):
        with pytest.raises(openai.BadRequestError) as e:
            oai(url).chat.completions.create(model="embedded", messages=ASK, tools=[WEATHER], max_tokens=4)
        assert "no tool calling support" in str(e.value)
        with pytest.raises(anthropic.BadRequestError) as e:
            claude(url).messages.create(model="embedded", max_tokens=4, messages=ASK, tools=[{"name": "f", "input_schema": {"type": "object"}}])
        assert "no tool calling support" in str(e.value)


@pytest.mark.parametrize("extra, words", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not one of 'tools'"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}}, "grammar for this request is invalid"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]},
     "not valid JSON"),
])
def test_bad_tool_fields_get_400(served, extra, words):
    _, url = served
    with pytest.raises(openai.BadRequestError) as e:
        oai(url).chat.completions.create(**{"model": MODEL, "messages": ASK, "tools": [WEATHER], "max_tokens": 4, **extra})
    assert words in str(e.value)


def test_moectl_run_json_schema(served, capsys, monkeypatch, tmp_path):
    from moed import cli

    d, _ = served
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(d.runtime_dir))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    assert cli.main(["run", "hi", "--max-tokens", "20", "--temperature", "0", "--json-schema", f"@{tmp_path / 's.json'}"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["ok"], bool)
    assert cli.main(["run", "hi", "--json-schema", "{not json"]) == 2
    assert "--json-schema" in capsys.readouterr().err


def test_a_wrong_model_is_model_not_found_in_each_apis_shape(served):
    _, url = served
    with pytest.raises(openai.NotFoundError) as e:
        oai(url).chat.completions.create(model="gpt-nope", messages=ASK, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "gpt-nope" in e.value.body["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        claude(url).messages.create(model="claude-nope", max_tokens=2, messages=ASK)
    assert e.value.body["error"]["type"] == "not_found_error" and "claude-nope" in e.value.body["error"]["message"]
    assert oai(url).completions.create(model=MODEL, prompt="x", max_tokens=1).choices  # its own name is fine


def test_constraints_hold_in_the_batch_too(served):
    """A constrained request that joins BatchGenerator (a second one arrives) decodes as it does solo."""
    import threading

    d, _ = served
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False}
    ask = dict(messages=ASK, response_format={"type": "json_schema", "schema": schema}, max_tokens=40)
    with d.client() as c:
        alone = c.complete(**ask)
    got = {}

    def run(i, **kw):
        with d.client() as c:
            got[i] = c.complete(**kw)

    threads = [threading.Thread(target=run, args=(0,), kwargs=ask),
               threading.Thread(target=run, args=(1,), kwargs=dict(messages=ASK, tools=[WEATHER], tool_choice={"name": "get_weather"}, max_tokens=60))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got[0].text == alone.text and json.loads(got[0].text)
    assert got[1].finish_reason == "tool_calls" and got[1].tool_calls[0]["name"] == "get_weather"
    assert max(got[0].timings["max_batch"], got[1].timings["max_batch"]) == 2  # they did decode together
