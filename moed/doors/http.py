"""OpenAI-compatible HTTP gateway: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``.

The gateway is a protocol v1 client of the daemon (``moed_client.AsyncClient``
over the ZeroMQ socket) and holds no engine code. ``moed serve --http
127.0.0.1:PORT`` runs it as a task in the daemon's front process;
``python -m moed.doors.http --listen 127.0.0.1:PORT`` runs it on its own.

Security: it binds loopback addresses only unless ``--http-allow-remote``
(which then requires a token); every request's ``Host`` must name the
listening address (a DNS-rebinding page cannot reach it), an ``Origin``, when
a browser sends one, must be that same address, and with a token
(``--http-token`` or ``MOED_HTTP_TOKEN``) every ``/v1`` request needs
``Authorization: Bearer <token>``. No CORS headers are ever sent.

A client that disconnects cancels its generation: the request's handler is
cancelled (aiohttp's handler_cancellation), and leaving the stream cancels the
request on the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

from aiohttp import web

from moed.config import MAX_CLIENTS  # requests served at once (moed serve: --max-clients / config max_clients)
from moed.doors.openai_api import BadRequest, chat_messages, completion_prompt, field, sampling_args, usage
from moed.net import is_loopback
from moed_client import AsyncClient, paths
from moed_client import errors as E
from moed_client import protocol as P

log = logging.getLogger("moed.doors.http")

TOKEN_ENV = "MOED_HTTP_TOKEN"
MAX_BODY_BYTES = P.MAX_MESSAGE_BYTES
# An idle connection (none of its requests in flight) is closed after this long, so idle
# sockets cannot pile up; aiohttp's own default keeps them for an hour.
KEEPALIVE_S = 30.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class GatewayError(Exception):
    """The gateway cannot start, with a message meant for a person."""


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    return web.json_response(error_body(message, kind, code, param), status=status)


# Daemon errors -> HTTP status.
_STATUS_BY_CODE = {
    P.ErrorCode.BUSY: 429,
    P.ErrorCode.LIMIT_EXCEEDED: 400,
    P.ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    P.ErrorCode.INVALID_REQUEST: 400,
    P.ErrorCode.ENGINE_RESTARTED: 503,
    P.ErrorCode.ENGINE_ERROR: 500,
    P.ErrorCode.SHUTTING_DOWN: 503,
    P.ErrorCode.NOT_READY: 503,
    "not_running": 503,
    "timeout": 504,
}


def daemon_error_response(e: E.MoedError) -> web.Response:
    return error_response(_STATUS_BY_CODE.get(e.code, 500), e.message, e.code)


# --------------------------------------------------------------------------
# The gateway


class Gateway:
    def __init__(self, host: str, port: int, *, socket: str | Path | None = None, token: str | None = None, allow_remote: bool = False,
                 max_clients: int = MAX_CLIENTS):
        if not allow_remote and not is_loopback(host):
            raise ValueError(f"{host} is not a loopback address; pass --http-allow-remote (with a token) to listen on the network")
        if allow_remote and not token:
            raise ValueError(f"--http-allow-remote needs a token (--http-token or {TOKEN_ENV})")
        self.host, self.port, self.token, self.allow_remote = host, port, token, allow_remote
        self.max_clients = max_clients
        self.in_flight = 0  # requests being served now: this door's clients
        self.client = AsyncClient(socket, name="moed-http")
        self.runner: web.AppRunner | None = None
        self.allowed_hosts: set[str] = set()
        self.model_id = "moed"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._guard])
        app.add_routes([
            web.get("/health", self.health),
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
        ])
        # handler_cancellation: a client that goes away cancels its handler, and so its generation.
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=KEEPALIVE_S)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]  # the real port when asked for port 0
        names = {self.host, f"[{self.host}]"} | (set(LOOPBACK_NAMES) if is_loopback(self.host) else set())
        self.allowed_hosts = {f"{n}:{self.port}" for n in names} | ({n for n in names} if self.port == 80 else set())
        log.info("OpenAI-compatible gateway on %s", self.url)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await self.client.close()

    # -- guards -----------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self.in_flight >= self.max_clients:
            return error_response(429, f"too many HTTP requests in flight ({self.max_clients}); retry later", P.ErrorCode.BUSY)
        self.in_flight += 1
        try:
            return await self._checked(request, handler)
        finally:
            self.in_flight -= 1

    async def _checked(self, request: web.Request, handler):
        if not self.allow_remote:
            host = request.headers.get("Host", "")
            if host.lower() not in self.allowed_hosts:
                return error_response(403, f"Host {host[:100]!r} is not this gateway's address", "forbidden_host")
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in {f"http://{h}" for h in self.allowed_hosts}:
            return error_response(403, "cross-origin requests are not allowed", "forbidden_origin")
        if self.token and request.path.startswith("/v1/"):
            auth = request.headers.get("Authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return error_response(401, "missing or wrong bearer token", "invalid_api_key")
        try:
            return await handler(request)
        except BadRequest as e:
            return error_response(e.status, e.message, e.code, e.param)
        except E.MoedError as e:
            return daemon_error_response(e)

    async def _json(self, request: web.Request) -> dict:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"request body exceeds {MAX_BODY_BYTES} bytes", status=413, code=P.ErrorCode.LIMIT_EXCEEDED) from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the body is not valid JSON: {str(e)[:200]}", code=P.ErrorCode.BAD_MESSAGE) from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object", code=P.ErrorCode.BAD_MESSAGE)
        return body

    # -- endpoints ----------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        try:
            status = await asyncio.wait_for(self.client.status(), 5.0)
        except (E.MoedError, asyncio.TimeoutError) as e:
            return web.json_response({"status": "unavailable", "error": str(e)}, status=503)
        ok = status.get("state") == "ready"
        return web.json_response({"status": "ok" if ok else status.get("state")}, status=200 if ok else 503)

    async def models(self, request: web.Request) -> web.Response:
        await self._model()
        return web.json_response({"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": "moed"}]})

    async def _model(self) -> str:
        server = await self.client.connect()
        model = server.get("model") or {}
        self.model_id = model.get("display_name") or model.get("name") or "moed"
        return self.model_id

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        args = {"messages": chat_messages(body), **sampling_args(body)}
        return await self._generate(request, body, args, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        args = {**completion_prompt(body), **sampling_args(body)}
        return await self._generate(request, body, args, chat=False)

    async def _generate(self, request: web.Request, body: dict, args: dict, chat: bool) -> web.StreamResponse:
        model = await self._model()
        stream = field(body, "stream", bool, False)
        options = field(body, "stream_options", dict, {})
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        prompt = args.pop("prompt", None)
        gen = await self.client.generate(prompt, **args)
        async with gen:  # leaving it early (disconnect, error) cancels the request on the daemon
            if not stream:
                done = await gen.collect()
                choice = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": done.text}
                else:
                    choice["text"] = done.text
                return web.json_response({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice], "usage": usage(done.usage)})
            # The first chunk decides between an HTTP error and a 200 stream.
            it = gen.__aiter__()
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                first = None
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            chunk_kind = kind + ".chunk" if chat else kind

            async def send(obj) -> None:
                await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

            async def event(delta_or_text, finish=None):
                choice = {"index": 0, "finish_reason": finish, "logprobs": None}
                choice["delta" if chat else "text"] = delta_or_text
                await send({"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [choice]})

            if chat:
                await event({"role": "assistant", "content": ""})
            try:
                if first is not None:
                    if first.text:
                        await event({"content": first.text} if chat else first.text)
                    async for piece in it:
                        if piece.text:
                            await event({"content": piece.text} if chat else piece.text)
            except E.MoedError as e:
                await send(error_body(e.message, "server_error", e.code))
                return resp
            await event({} if chat else "", gen.finish_reason)
            if options.get("include_usage"):
                await send({"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [], "usage": usage(gen.usage)})
            await send(b"[DONE]")
            await resp.write_eof()
            return resp


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--http wants HOST:PORT, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


# --------------------------------------------------------------------------
# Running it


def add_arguments(parser) -> None:
    parser.add_argument("--http", default=None, metavar="127.0.0.1:PORT", help="serve the OpenAI-compatible gateway (off by default; loopback only)")
    parser.add_argument("--http-token", default=None, help=f"bearer token the gateway requires (default: ${TOKEN_ENV})")
    parser.add_argument("--http-allow-remote", action="store_true", help="let --http bind a non-loopback address (needs a token)")


async def open_gateway(args, socket: str | Path | None) -> Gateway | None:
    """The gateway for ``moed serve --http``, started; None without ``--http``."""
    if not getattr(args, "http", None):
        return None
    try:
        host, port = parse_listen(args.http)
        token = args.http_token or os.environ.get(TOKEN_ENV) or None
        max_clients = getattr(args, "max_clients", None) or MAX_CLIENTS
        gateway = Gateway(host, port, socket=socket, token=token, allow_remote=args.http_allow_remote, max_clients=max_clients)
        await gateway.start()
    except (ValueError, OSError) as e:
        raise GatewayError(f"cannot serve HTTP on {args.http}: {e}") from None
    return gateway


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moed.doors.http", description="OpenAI-compatible HTTP gateway for a running moed daemon")
    p.add_argument("--listen", required=True, metavar="127.0.0.1:PORT")
    p.add_argument("--socket", default=None, help="the daemon's socket (default: moed.sock in the runtime dir)")
    p.add_argument("--http-token", default=None)
    p.add_argument("--http-allow-remote", action="store_true")
    p.add_argument("--max-clients", type=int, default=MAX_CLIENTS, help=f"HTTP requests served at once before 429 'busy' (default {MAX_CLIENTS})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s moed-http %(levelname)s %(message)s")
    args.http = args.listen

    async def run():
        gateway = await open_gateway(args, args.socket or paths.daemon_socket())
        print(f"moed-http listening on {gateway.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await gateway.close()

    try:
        asyncio.run(run())
    except GatewayError as e:
        print(f"moed-http: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
