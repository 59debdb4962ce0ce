"""Anthropic Messages (``POST /v1/messages``) with the official ``anthropic`` SDK, and LangChain's
``ChatOpenAI``, against a real daemon's gateway on loopback, streaming and not."""

from __future__ import annotations

import anthropic
import pytest

from moed.doors import http_token
from test_http import raw

SYSTEM = "You are terse."
USER = [{"role": "user", "content": "hello there"}]
GREEDY = {"temperature": 0}  # the SDK (2.x) has no sampling arguments of its own; the API still takes them


@pytest.fixture(scope="module")
def served(test_model):
    from conftest import gateway_daemon

    with gateway_daemon(test_model) as served:
        yield served


def claude(url: str, **kwargs) -> anthropic.Anthropic:
    """The SDK with the gateway's token as a bearer token (``auth_token``; ``api_key`` sends x-api-key, also accepted)."""
    kwargs.setdefault("auth_token", http_token.load())
    return anthropic.Anthropic(base_url=url, max_retries=0, timeout=60, **kwargs)


def protocol_answer(d, **kwargs):
    with d.client() as c:
        return c.complete(messages=[{"role": "system", "content": SYSTEM}, *USER], **kwargs)


def test_messages_match_the_protocol_client(served):
    d, url = served
    got = claude(url).messages.create(model="embedded", system=SYSTEM, messages=USER, max_tokens=12, extra_body=GREEDY)
    want = protocol_answer(d, max_tokens=12, temperature=0)
    assert got.type == "message" and got.role == "assistant" and got.id.startswith("msg_")
    assert [b.type for b in got.content] == ["text"] and got.content[0].text == want.text
    assert got.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[want.finish_reason]
    assert got.usage.input_tokens == want.usage["prompt_tokens"] and got.usage.output_tokens == want.usage["completion_tokens"]


def test_system_as_blocks_and_sampling_fields(served):
    d, url = served
    got = claude(url).messages.create(model="embedded", system=[{"type": "text", "text": SYSTEM}], max_tokens=8,
                                      extra_body={"temperature": 0.7, "top_p": 0.9, "top_k": 5}, messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}])
    want = protocol_answer(d, max_tokens=8, temperature=0.7, top_p=0.9, top_k=5, seed=None)
    assert got.usage.input_tokens == want.usage["prompt_tokens"]


def test_stop_sequences_and_max_tokens(served):
    d, url = served
    whole = claude(url).messages.create(model="embedded", system=SYSTEM, messages=USER, max_tokens=16, extra_body=GREEDY).content[0].text
    assert len(whole) > 2
    stop = whole[1:3]
    got = claude(url).messages.create(model="embedded", system=SYSTEM, messages=USER, max_tokens=16, extra_body=GREEDY, stop_sequences=[stop])
    assert got.content[0].text == protocol_answer(d, max_tokens=16, temperature=0, stop=[stop]).text
    assert stop not in got.content[0].text and got.stop_reason == "stop_sequence" and got.stop_sequence == stop
    with claude(url).messages.stream(model="embedded", system=SYSTEM, messages=USER, max_tokens=16, extra_body=GREEDY, stop_sequences=["\x00never", stop]) as s:
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", stop, got.content[0].text)
    plain = claude(url).messages.create(model="embedded", system=SYSTEM, messages=USER, max_tokens=16, extra_body=GREEDY, stop_sequences=["\x00never"])
    assert plain.stop_sequence is None and plain.stop_reason in ("end_turn", "max_tokens")


def test_streaming_events_equal_the_whole_message(served):
    _, url = served
    client = claude(url)
    whole = client.messages.create(model="embedded", system=SYSTEM, messages=USER, max_tokens=12, extra_body=GREEDY)
    with client.messages.stream(model="embedded", system=SYSTEM, messages=USER, max_tokens=12, extra_body=GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_raw_stream_has_anthropics_event_lines(served):
    _, url = served
    import http.client
    import json
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"model": "embedded", "max_tokens": 4, "messages": USER, "stream": True}
    conn.request("POST", "/v1/messages", json.dumps(body), {"Content-Type": "application/json", "x-api-key": http_token.load()})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    lines = resp.read().decode().split("\n")
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[0] == "message_start" and "ping" in events and events[-1] == "message_stop"
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == events


@pytest.mark.parametrize("body, param", [
    ({"messages": USER}, "max_tokens"),
    ({"max_tokens": 4, "messages": []}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages"),
    ({"max_tokens": 4, "messages": USER, "tools": [{"name": "f", "input_schema": {}}]}, "tools"),
    ({"max_tokens": 4, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"max_tokens": 4, "messages": USER, "stop_sequences": [1]}, "stop_sequences"),
])
def test_bad_bodies_get_anthropics_error_shape(served, body, param):
    _, url = served
    status, reply = raw(url, "POST", "/v1/messages", __import__("json").dumps(body).encode())
    assert status == 400 and reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error", reply
    assert param in reply["error"]["message"] or param == "messages"


def test_sdk_errors(served):
    _, url = served
    with pytest.raises(anthropic.BadRequestError) as e:
        claude(url).messages.create(model="embedded", messages=USER, max_tokens=10**9)
    assert "max_tokens" in str(e.value)
    with pytest.raises(anthropic.AuthenticationError):
        claude(url, auth_token="wrong").messages.create(model="embedded", messages=USER, max_tokens=2)
    got = claude(url, auth_token=None, api_key=http_token.load()).messages.create(model="embedded", messages=USER, max_tokens=2)
    assert got.usage.output_tokens >= 1 or got.stop_reason == "end_turn"


def test_langchain_invoke_and_stream(served):
    from langchain_openai import ChatOpenAI

    d, url = served
    llm = ChatOpenAI(base_url=url + "/v1", api_key=http_token.load(), model="embedded", temperature=0, max_tokens=12, max_retries=0, timeout=60)
    messages = [("system", SYSTEM), ("human", "hello there")]
    got = llm.invoke(messages)
    assert got.content == protocol_answer(d, max_tokens=12, temperature=0).text
    assert "".join(chunk.content for chunk in llm.stream(messages)) == got.content
