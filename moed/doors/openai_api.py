"""OpenAI's request bodies as protocol v1 generate arguments, and protocol usage as OpenAI's.

Unknown fields: a top-level field this module does not know is ignored (SDKs and
frameworks send vendor extras such as ``user``, ``metadata`` or ``store``), and its
name is listed in the reply's ``X-Moed-Ignored-Fields`` header. A field moed knows
but cannot honour (``UNSUPPORTED``) gets 400, never silent ignoring; so does an unknown
message role. ``response_format`` and a forced ``tool_choice`` are constrained decoding in
the engine, which answers 400 without llguidance; tools are moed/doors/tools.py's.
"""

from __future__ import annotations

from moed.doors.bodies import BadRequest, field
from moed.doors.tools import openai_message, openai_tools

# OpenAI parameters this gateway cannot honour: refused, never silently ignored.
UNSUPPORTED = ("functions", "function_call", "audio", "modalities", "prediction")
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")  # the last is an extension, as in vLLM
COMMON = {"model", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "seed", "stop", "logprobs", "top_logprobs", "user", "parallel_tool_calls", "logit_bias", "response_format", "tools", "tool_choice", *PENALTIES, *UNSUPPORTED}
KNOWN = {True: COMMON | {"messages"}, False: COMMON | {"prompt", "suffix", "echo", "best_of"}}  # by chat
ROLES = ("system", "developer", "user", "assistant", "tool")


def ignored_fields(body: dict, chat: bool) -> list[str]:
    """The body's top-level fields this gateway does not know (so ignores), for the reply's header."""
    return sorted(str(k)[:100] for k in body if k not in KNOWN[chat])


def sampling_args(body: dict) -> dict:
    """Sampling fields common to both endpoints (the daemon validates their ranges)."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise BadRequest(f"'{name}' is not supported by moed", name)
    if field(body, "n", int, 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    if field(body, "logprobs", (bool, int), False) or field(body, "top_logprobs", int, 0):
        raise BadRequest("logprobs are not supported by moed", "logprobs")
    max_tokens = field(body, "max_completion_tokens", int) or field(body, "max_tokens", int)
    args = {
        # OpenAI's defaults (temperature 1) apply when the client leaves them out.
        "temperature": field(body, "temperature", (int, float), 1.0),
        "top_p": field(body, "top_p", (int, float), 1.0),
        "max_tokens": max_tokens,
        "seed": field(body, "seed", int),
        "stop": body.get("stop"),  # a string or a list; the daemon validates it
    }
    for extra in ("top_k", "min_p", *PENALTIES):  # top_k, min_p, repetition_penalty: accepted by several OpenAI-compatible servers
        if body.get(extra) is not None:
            args[extra] = field(body, extra, (int, float))
    bias = field(body, "logit_bias", dict, {})
    if bias:  # OpenAI's {"token id": bias} (JSON keys are strings) as the protocol's [[id, bias], ...]
        if not all(isinstance(k, str) and k.isdigit() for k in bias):
            raise BadRequest("'logit_bias' keys must be token ids", "logit_bias")
        args["logit_bias"] = [[int(k), v] for k, v in bias.items()]
    fmt = response_format(body.get("response_format"))
    if fmt is not None:
        args["response_format"] = fmt
    return {k: v for k, v in args.items() if v is not None}


def response_format(fmt) -> dict | None:
    """OpenAI's ``response_format`` as the protocol's: constrained decoding in the engine."""
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}
    schema = (fmt.get("json_schema") or {}).get("schema") if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict) else None
    if isinstance(schema, dict):
        return {"type": "json_schema", "schema": schema}
    raise BadRequest("'response_format' must be {type: text}, {type: json_object} or {type: json_schema, json_schema: {name, schema}}",
                     "response_format")


def chat_args(body: dict) -> dict:
    """A chat body's messages, tools and sampling as generate arguments."""
    return {"messages": chat_messages(body), **openai_tools(body), **sampling_args(body)}


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
        if m["role"] not in ROLES:
            raise BadRequest(f"messages[{i}].role {m['role'][:50]!r} is not one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            parts = []
            for p in content:
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise BadRequest(f"messages[{i}]: only text content parts are supported", "messages")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or an array of text parts", "messages")
        out.append(openai_message(dict(m, role="system" if m["role"] == "developer" else m["role"]), i, content))
    return out


def completion_prompt(body: dict) -> dict:
    if body.get("suffix") is not None:
        raise BadRequest("'suffix' is not supported here; editors get fill-in-the-middle from the editor socket's 'infill'", "suffix")
    if body.get("tools") or body.get("tool_choice") not in (None, "none", "auto"):
        raise BadRequest("tools need /v1/chat/completions (the chat template offers them to the model)", "tools")
    if body.get("echo"):
        raise BadRequest("'echo' is not supported by moed", "echo")
    if field(body, "best_of", int, 1) != 1:
        raise BadRequest("only best_of=1 is supported", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("'prompt' must not be empty", "prompt")
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"token_ids": prompt}
    raise BadRequest("'prompt' must be a string, one string in an array, or an array of token ids", "prompt")


def usage(u: dict) -> dict:
    prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if u.get("cached_tokens") is not None:
        out["prompt_tokens_details"] = {"cached_tokens": int(u["cached_tokens"])}
    return out
