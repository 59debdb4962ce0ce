"""Anthropic's Messages API on the gateway: ``POST /v1/messages``, whole or as Anthropic's SSE events.

The same gateway, token and protocol client as the OpenAI routes (moed/doors/http.py).
A body becomes one protocol v1 ``generate`` with ``messages`` (the ``system``
prompt first). Fields: ``max_tokens`` (required, as Anthropic's), ``messages``
(string content or text blocks), ``system`` (a string or text blocks),
``stop_sequences``, ``temperature`` (default 1, as Anthropic's), ``top_p``,
``top_k``, ``stream``, ``tools`` and ``tool_choice`` (``tool_use`` and ``tool_result``
blocks in the messages; moed/doors/tools.py). Unknown fields are ignored and named in
the reply's ``X-Moed-Ignored-Fields`` header; fields moed cannot honour (``output_config``,
``thinking`` enabled, other blocks) get 400. Errors use Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``. A stop sequence that ended the
answer is its ``stop_sequence`` (``stop_reason: "stop_sequence"``), as the protocol's
``done`` names it.
"""

from __future__ import annotations

import json
import uuid

from aiohttp import web

from moed.doors.bodies import BadRequest, field, model_arg
from moed.doors.tools import anthropic_message, anthropic_tool_use, anthropic_tools
from moed_client import errors as E

_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
          408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}
UNSUPPORTED = ("mcp_servers", "container", "output_config")
KNOWN = {"model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream", "metadata",
         "thinking", "service_tier", "tools", "tool_choice", *UNSUPPORTED}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn", "tool_calls": "tool_use"}


def stop_reason(finish: str | None, stop_sequence: str | None) -> str:
    return "stop_sequence" if stop_sequence is not None else STOP_REASONS.get(finish, "end_turn")


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _KINDS.get(status, "api_error"), "message": message}}


def _text(content, where: str) -> str:
    """A string, or an array of text blocks joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if not (isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)):
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise BadRequest(f"{where}: only text blocks are supported, not {str(kind)[:50]!r}", where.split("[")[0].split(".")[0])
            parts.append(block["text"])
        return "".join(parts)
    raise BadRequest(f"{where} must be a string or an array of text blocks", where.split("[")[0].split(".")[0])


def generate_args(body: dict) -> dict:
    """The protocol v1 ``generate`` arguments for a Messages body."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise BadRequest(f"'{name}' is not supported by moed", name)
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise BadRequest("extended thinking is not supported by moed", "thinking")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadRequest("'max_tokens' is required and must be an integer", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text(body["system"], "system")})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages[{i}] must be an object whose 'role' is 'user' or 'assistant'", "messages")
        out += anthropic_message(m["role"], m.get("content"), i, _text)
    stop = field(body, "stop_sequences", list, [])
    if not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop_sequences' must be an array of strings", "stop_sequences")
    args = {
        "messages": out,
        **anthropic_tools(body),
        "max_tokens": max_tokens,
        "temperature": field(body, "temperature", (int, float), 1.0),  # Anthropic's default
        "top_p": field(body, "top_p", (int, float)),
        "top_k": field(body, "top_k", int),
        "stop": stop or None,
    }
    return {k: v for k, v in args.items() if v is not None}


def usage(u: dict) -> dict:
    return {"input_tokens": int(u.get("prompt_tokens") or 0), "output_tokens": int(u.get("completion_tokens") or 0),
            "cache_read_input_tokens": int(u.get("cached_tokens") or 0), "cache_creation_input_tokens": 0}


async def messages(gw, request: web.Request) -> web.StreamResponse:
    body = request["json"]
    args = generate_args(body)
    model_id = await gw.model()
    ignored = sorted(str(k)[:100] for k in body if k not in KNOWN)
    headers = {"X-Moed-Ignored-Fields": ",".join(ignored)[:1000]} if ignored else {}
    message = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": model_id}
    gen = await gw.client.generate(None, **args, **model_arg(body))
    async with gen:  # leaving it early (disconnect, error) cancels the request on the daemon
        if not field(body, "stream", bool, False):
            done = await gen.collect()
            content = [{"type": "text", "text": done.text}] if done.text.strip() or not done.tool_calls else []
            return web.json_response({**message, "content": content + [anthropic_tool_use(c) for c in done.tool_calls],
                                      "stop_reason": stop_reason(done.finish_reason, done.stop_sequence), "stop_sequence": done.stop_sequence,
                                      "usage": usage(done.usage)}, headers=headers)
        it = gen.__aiter__()
        try:  # the first chunk decides between an HTTP error and a 200 stream
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        await resp.prepare(request)

        async def send(kind: str, obj: dict) -> None:
            await resp.write(f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **obj}).encode() + b"\n\n")

        await send("message_start", {"message": {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                                                 "usage": {"input_tokens": 0, "output_tokens": 0}}})
        blocks = Blocks(send)
        await blocks.text("")
        await send("ping", {})
        try:
            if first is not None:
                await blocks.piece(first)
                async for piece in it:
                    await blocks.piece(piece)
        except E.MoedError as e:
            await send("error", error_body(500, f"{e.code}: {e.message}"))
            return resp
        await blocks.close()
        await send("message_delta", {"delta": {"stop_reason": stop_reason(gen.finish_reason, gen.stop_sequence), "stop_sequence": gen.stop_sequence},
                                     "usage": usage(gen.usage)})
        await send("message_stop", {})
        await resp.write_eof()
        return resp


class Blocks:
    """A streamed message's content blocks, in order: text streams into an open text block;
    each tool call is a ``tool_use`` block of its own, its input one ``input_json_delta``."""

    def __init__(self, send):
        self.send, self.index, self.open_text = send, -1, False

    async def text(self, text: str) -> None:
        if not self.open_text:
            self.index += 1
            self.open_text = True
            await self.send("content_block_start", {"index": self.index, "content_block": {"type": "text", "text": ""}})
        if text:
            await self.send("content_block_delta", {"index": self.index, "delta": {"type": "text_delta", "text": text}})

    async def close(self) -> None:
        if self.open_text:
            await self.send("content_block_stop", {"index": self.index})
            self.open_text = False

    async def piece(self, piece) -> None:
        if piece.text and (self.open_text or piece.text.strip()):  # no text block for the newlines between calls
            await self.text(piece.text)
        for call in piece.tool_calls:
            await self.close()
            self.index += 1
            block = anthropic_tool_use(call)
            await self.send("content_block_start", {"index": self.index, "content_block": dict(block, input={})})
            await self.send("content_block_delta", {"index": self.index, "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
            await self.send("content_block_stop", {"index": self.index})


ROUTES = [("POST", "/v1/messages", messages)]
