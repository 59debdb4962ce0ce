"""The chat fields of a protocol v1 ``generate``: tool calls and results in messages, ``tools`` and
``tool_choice``, ``response_format``. Checked here (ValueError), wrapped as ``invalid_request``
by protocol.parse_generate, which re-exports the names; no other import."""

from __future__ import annotations

MAX_TOOLS = 128  # tools offered in one request, and tool calls in one message
TOOL_CHOICES = ("auto", "none", "required")  # or {"name": NAME}: call that tool


def message_fields(m) -> dict:
    """One chat message: string ``role`` and ``content``; an assistant's ``tool_calls``
    ([{id, type, function: {name, arguments: map}}]); a tool result's ``tool_call_id`` and ``name``."""
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
        raise ValueError("each message must be a map with string 'role' and 'content'")
    out = {"role": m["role"], "content": m["content"]}
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
            raise ValueError(f"a message's 'tool_calls' must be a list of at most {MAX_TOOLS} calls")
        for c in calls:
            f = c.get("function") if isinstance(c, dict) else None
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), dict)
                    and isinstance(c.get("id", ""), str)):
                raise ValueError("each tool call must be {id, function: {name: string, arguments: map}}")
        out["tool_calls"] = [{"id": c.get("id", ""), "type": "function", "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                             for c in calls]
    for name in ("tool_call_id", "name"):
        if m.get(name) is not None:
            if not isinstance(m[name], str):
                raise ValueError(f"a message's '{name}' must be a string")
            out[name] = m[name]
    return out


def tools_fields(msg: dict) -> tuple[list[dict] | None, str | dict]:
    tools, choice = msg.get("tools"), msg.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise ValueError(f"'tools' must be a list of at most {MAX_TOOLS} tools")
        for t in tools:
            f = t.get("function") if isinstance(t, dict) else None
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"] and isinstance(f.get("parameters", {}), dict)):
                raise ValueError("each tool must be {type: 'function', function: {name, description, parameters (a JSON schema map)}}")
        tools = tools or None
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        if not isinstance(choice.get("name"), str):
            raise ValueError("'tool_choice' as a map must be {name: TOOL}")
        choice = {"name": choice["name"]}
        if not any(t["function"]["name"] == choice["name"] for t in tools or []):
            raise ValueError(f"'tool_choice' names {choice['name'][:100]!r}, which is not one of 'tools'")
    elif choice not in TOOL_CHOICES:
        raise ValueError(f"'tool_choice' must be one of {', '.join(TOOL_CHOICES)} or {{name: TOOL}}")
    if choice == "required" and not tools:
        raise ValueError("'tool_choice' required needs 'tools'")
    return tools, choice


def response_format_field(msg: dict) -> dict | None:
    fmt = msg.get("response_format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {"type": "json_schema", "schema": fmt["schema"]}
    raise ValueError("'response_format' must be {type: 'text'}, {type: 'json_object'} or {type: 'json_schema', schema: {...}}")
