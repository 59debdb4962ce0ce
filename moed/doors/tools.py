"""Tools in the HTTP APIs' shapes: OpenAI's and Anthropic's tools, tool choices, calls and
results as protocol v1 fields, and the daemon's calls back in each API's shape.

The daemon renders the tools through the model's chat template and parses the
calls with mlx-lm's tool parser (moed/engine/tool_calls.py); a protocol call is
{id, name, arguments (JSON text)}. Here they only change shape.
"""

from __future__ import annotations

import json

from moed.doors.bodies import BadRequest


def _arguments(text, where: str) -> dict:
    """A call's arguments as the map chat templates expect (APIs send them as JSON text)."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text) if isinstance(text, str) and text.strip() else {}
    except ValueError:
        raise BadRequest(f"{where}: 'arguments' is not valid JSON", "messages") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: 'arguments' must be a JSON object", "messages")
    return value


def _protocol_call(call_id, name, arguments, where: str) -> dict:
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}: a tool call needs a 'name'", "messages")
    return {"id": call_id if isinstance(call_id, str) else "", "type": "function",
            "function": {"name": name, "arguments": _arguments(arguments, where)}}


# -- OpenAI ------------------------------------------------------------------------

def openai_tools(body: dict) -> dict:
    """``tools`` and ``tool_choice`` as generate arguments (none when the body offers no tools)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise BadRequest("'tool_choice' needs 'tools'", "tool_choice")
        return {}
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                                              for t in tools):
        raise BadRequest("'tools' must be an array of {type: 'function', function: {name, description, parameters}}", "tools")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise BadRequest("'tool_choice' must be none, auto, required or {type: 'function', function: {name}}", "tool_choice")
        choice = {"name": name}
    return {"tools": [{"type": "function", "function": t["function"]} for t in tools], "tool_choice": choice or "auto"}


def openai_message(m: dict, i: int, content: str) -> dict:
    """One OpenAI chat message (role already checked) as a protocol message."""
    out = {"role": m["role"], "content": content}
    if m["role"] == "assistant" and m.get("tool_calls"):
        calls = m["tool_calls"]
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
            raise BadRequest(f"messages[{i}].tool_calls must be an array of {{id, type, function: {{name, arguments}}}}", "messages")
        out["tool_calls"] = [_protocol_call(c.get("id"), c["function"].get("name"), c["function"].get("arguments"), f"messages[{i}]")
                             for c in calls]
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise BadRequest(f"messages[{i}]: a tool message needs its 'tool_call_id'", "messages")
        out["tool_call_id"] = m["tool_call_id"]
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def openai_calls(calls: list[dict], first_index: int | None = None) -> list[dict]:
    """Protocol calls as OpenAI's ``tool_calls``; streamed ones carry their ``index``."""
    out = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
    if first_index is not None:
        out = [dict(c, index=first_index + n) for n, c in enumerate(out)]
    return out


# -- Anthropic ---------------------------------------------------------------------

ANTHROPIC_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def anthropic_tools(body: dict) -> dict:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, {}) and (choice or {}).get("type") not in ("auto", "none"):
            raise BadRequest("'tool_choice' needs 'tools'", "tool_choice")
        return {}
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise BadRequest("'tools' must be an array of {name, description, input_schema}", "tools")
    for t in tools:
        if t.get("type") not in (None, "custom"):
            raise BadRequest(f"tool {t['name'][:50]!r}: server tools ({str(t['type'])[:50]}) are not supported by moed", "tools")
    out = [{"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                              "parameters": t.get("input_schema") or {"type": "object"}}} for t in tools]
    kind = (choice or {}).get("type", "auto") if isinstance(choice, (dict, type(None))) else None
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise BadRequest("'tool_choice' of type tool needs a 'name'", "tool_choice")
        return {"tools": out, "tool_choice": {"name": choice["name"]}}
    if kind not in ANTHROPIC_CHOICES:
        raise BadRequest("'tool_choice' must be {type: auto | any | tool | none}", "tool_choice")
    return {"tools": out, "tool_choice": ANTHROPIC_CHOICES[kind]}


def _result_text(content, where: str) -> str:
    if isinstance(content, str) or content is None:
        return content or ""
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise BadRequest(f"{where}: a tool_result's content must be a string or text blocks", "messages")


def anthropic_message(role: str, content, i: int, text_of) -> list[dict]:
    """One Anthropic message as protocol messages: an assistant's ``tool_use`` blocks become its
    ``tool_calls``; a user's ``tool_result`` blocks become ``tool`` messages ahead of its text."""
    if not isinstance(content, list):
        return [{"role": role, "content": text_of(content, f"messages[{i}].content")}]
    kinds = {"assistant": "tool_use", "user": "tool_result"}
    special = [b for b in content if isinstance(b, dict) and b.get("type") == kinds[role]]
    text = text_of([b for b in content if b not in special], f"messages[{i}].content")
    if role == "assistant":
        out = {"role": "assistant", "content": text}
        if special:
            out["tool_calls"] = [_protocol_call(b.get("id"), b.get("name"), b.get("input") or {}, f"messages[{i}]") for b in special]
        return [out]
    results = [{"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")), "content": _result_text(b.get("content"), f"messages[{i}]")}
               for b in special]
    return results + ([{"role": "user", "content": text}] if text or not results else [])


def anthropic_tool_use(call: dict) -> dict:
    try:
        arguments = json.loads(call["arguments"])
    except ValueError:  # a parser that passes text through: the text, as the only field
        arguments = {"arguments": call["arguments"]}
    return {"type": "tool_use", "id": call["id"], "name": call["name"], "input": arguments}
