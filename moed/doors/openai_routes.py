"""OpenAI's routes on the gateway: chat completions, completions, models; streamed as OpenAI's SSE.

Bodies become protocol v1 ``generate`` arguments in moed/doors/openai_api.py;
the server, guards and error dispatch are moed/doors/http.py's.
"""

from __future__ import annotations

import json
import time
import uuid

from aiohttp import web

from moed.doors.bodies import BadRequest, field, model_arg
from moed.doors.openai_api import chat_args, completion_prompt, ignored_fields, sampling_args, usage
from moed.doors.tools import openai_calls
from moed_client import errors as E

_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
          408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _KINDS.get(status, "server_error"), "param": param, "code": code}}


def model_object(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "moed"}


async def models(gw, request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [model_object(await gw.model())]})


async def model(gw, request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``: the served model under its own id; any other id is 404 (as a request naming it is)."""
    wanted, served = request.match_info["id"], await gw.model()
    if wanted != served:
        raise BadRequest(f"the model '{wanted[:200]}' does not exist; this daemon serves '{served}'", "model", status=404, code="model_not_found")
    return web.json_response(model_object(served))


async def chat_completions(gw, request: web.Request) -> web.StreamResponse:
    body = request["json"]
    return await _generate(gw, request, body, chat_args(body), chat=True)


async def completions(gw, request: web.Request) -> web.StreamResponse:
    body = request["json"]
    args = {**completion_prompt(body), **sampling_args(body)}
    return await _generate(gw, request, body, args, chat=False)


ROUTES = [
    ("GET", "/v1/models", models),
    ("GET", "/v1/models/{id:.+}", model),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
]


def _headers(body: dict, chat: bool) -> dict:
    ignored = ignored_fields(body, chat)
    return {"X-Moed-Ignored-Fields": ",".join(ignored)[:1000]} if ignored else {}


async def _generate(gw, request: web.Request, body: dict, args: dict, chat: bool) -> web.StreamResponse:
    model_id = await gw.model()
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    prompt = args.pop("prompt", None)
    headers = _headers(body, chat)
    gen = await gw.client.generate(prompt, **args, **model_arg(body))
    async with gen:  # leaving it early (disconnect, error) cancels the request on the daemon
        if not stream:
            done = await gen.collect()
            choice = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": done.text}
                if done.tool_calls:  # OpenAI's content is null beside calls when there is no text
                    choice["message"].update(content=done.text.strip() or None, tool_calls=openai_calls(done.tool_calls))
            else:
                choice["text"] = done.text
            return web.json_response({"id": rid, "object": kind, "created": created, "model": model_id, "choices": [choice],
                                      "usage": usage(done.usage)}, headers=headers)
        # The first chunk decides between an HTTP error and a 200 stream.
        it = gen.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        await resp.prepare(request)
        chunk_kind = kind + ".chunk" if chat else kind

        async def send(obj) -> None:
            await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

        async def event(delta_or_text, finish=None):
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice["delta" if chat else "text"] = delta_or_text
            await send({"id": rid, "object": chunk_kind, "created": created, "model": model_id, "choices": [choice]})

        calls = 0  # tool calls streamed so far: the next one's index

        async def piece_out(piece) -> None:
            nonlocal calls
            if piece.text:
                await event({"content": piece.text} if chat else piece.text)
            if piece.tool_calls and chat:
                await event({"tool_calls": openai_calls(piece.tool_calls, first_index=calls)})
                calls += len(piece.tool_calls)

        if chat:
            await event({"role": "assistant", "content": ""})
        try:
            if first is not None:
                await piece_out(first)
                async for piece in it:
                    await piece_out(piece)
        except E.MoedError as e:
            await send(error_body(500, e.message, e.code))
            return resp
        await event({} if chat else "", gen.finish_reason)
        if options.get("include_usage"):
            await send({"id": rid, "object": chunk_kind, "created": created, "model": model_id, "choices": [], "usage": usage(gen.usage)})
        await send(b"[DONE]")
        await resp.write_eof()
        return resp
