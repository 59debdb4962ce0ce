"""The engine's tool-call splitter (with mlx-lm's own json_tools parser) and the constrained-decoding
processor, in process: markers split across pieces, unparsable calls, rollback, llguidance absent."""

from __future__ import annotations

import json

import pytest

from moed.engine import structured
from moed.engine.tool_calls import ToolCalls
from moed_client import protocol as P


def json_tools() -> ToolCalls:
    from mlx_lm.tool_parsers import json_tools as parser

    return ToolCalls(parser.tool_call_start, parser.tool_call_end, parser.parse_tool_call, [])


def split(text: str, size: int) -> tuple[str, list[dict]]:
    calls, out = [], ""
    tc = json_tools()
    for i in range(0, len(text), size):
        t, c = tc.feed(text[i:i + size])
        out, calls = out + t, calls + c
    t, c = tc.flush()
    return out + t, calls + c


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_calls_are_cut_out_of_the_text_whatever_the_pieces(size):
    text = 'Sure. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call> done <tool'
    out, calls = split(text, size)
    assert out == "Sure. \n done <tool"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("f", {"x": 1}), ("g", {})]
    assert len({c["id"] for c in calls}) == 2


def test_an_unparsable_call_stays_text_and_an_open_one_is_parsed_at_the_end():
    assert split("<tool_call>not json</tool_call>", 4) == ("<tool_call>not json</tool_call>", [])
    out, calls = split('<tool_call>{"name": "f", "arguments": {}}', 5)
    assert out == "" and [c["name"] for c in calls] == ["f"]
    assert split("<tool_call>{\"name\": ", 5) == ("<tool_call>{\"name\": ", [])


def request(**fields) -> P.GenerateRequest:
    return P.parse_generate({"id": "1", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_without_llguidance_constraints_get_invalid_request(monkeypatch):
    monkeypatch.setattr(structured, "available", lambda: False)
    with pytest.raises(P.ProtocolError) as e:
        structured.grammar(request(response_format={"type": "json_object"}), None)
    assert e.value.code == P.ErrorCode.INVALID_REQUEST and "llguidance" in e.value.message
    assert structured.grammar(request(), None) is None  # nothing to constrain: no llguidance needed


def test_constrained_processor_masks_and_rolls_back(test_model):
    pytest.importorskip("llguidance")
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load

    tok = load(test_model)
    grammars = structured.Grammars(tok, 4096)
    proc = grammars.processor(request(response_format={"type": "json_schema", "schema": {"enum": ["yes", "no"]}}))
    prompt = mx.array([1, 2, 3])
    allowed = lambda logits: [i for i, v in enumerate(logits[0].tolist()) if v != float("-inf")]  # noqa: E731
    first = allowed(proc(prompt, mx.zeros((1, 4096))))
    quote = tok.encode('"', add_special_tokens=False)
    assert quote[0] in first and tok.encode("{", add_special_tokens=False)[0] not in first
    y = tok.encode('"y', add_special_tokens=False)
    after_y = allowed(proc(mx.concatenate([prompt, mx.array(y)]), mx.zeros((1, 4096))))
    assert tok.encode("n", add_special_tokens=False)[0] not in after_y
    # rolled back to the prompt: the first mask again
    assert allowed(proc(prompt, mx.zeros((1, 4096)))) == first


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("fields, words", [
    ({"tools": [{"type": "function"}]}, "each tool"),
    ({"tools": [TOOL] * (P.MAX_TOOLS + 1)}, "at most"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"name": "g"}}, "not one of 'tools'"),
    ({"tool_choice": "required"}, "needs 'tools'"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]}, "tool call"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 3}]}, "tool_call_id"),
])
def test_protocol_refuses_bad_chat_fields(fields, words):
    with pytest.raises(P.ProtocolError) as e:
        request(**fields)
    assert e.value.code == P.ErrorCode.INVALID_REQUEST and words in e.value.message


def test_protocol_keeps_the_chat_fields():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    req = request(messages=[{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "1", "tool_call_id": "c1"}],
                  tools=[TOOL], tool_choice={"name": "f"}, response_format={"type": "json_object"})
    assert req.messages[0]["tool_calls"] == [call] and req.messages[1]["tool_call_id"] == "c1"
    assert (req.tools, req.tool_choice, req.sampling.response_format) == ([TOOL], {"name": "f"}, {"type": "json_object"})
    with pytest.raises(P.ProtocolError):
        P.parse_generate({"id": "1", "prompt": "x", "tools": [TOOL]})  # tools need the chat template
