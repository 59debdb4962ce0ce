"""The HTTP gateway: its server, guards (address, origin, token, body, slots) and errors.

Two APIs share it: OpenAI's (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``; moed/doors/openai_routes.py) and Anthropic's Messages
(``/v1/messages``; moed/doors/anthropic_api.py), plus ``/health``. The gateway
is a protocol v1 client of the daemon (``moed_client.AsyncClient`` over the
ZeroMQ socket) and holds no engine code. ``moed serve --http 127.0.0.1:PORT``
runs it as a task in the daemon's front process; ``python -m moed.doors.http
--listen 127.0.0.1:PORT`` runs it on its own.

Security: it binds loopback addresses only unless ``--http-allow-remote``;
every request's ``Host`` must name the listening address (a DNS-rebinding
page cannot reach it), an ``Origin``, when a browser sends one, must be that
same address, and every route needs the bearer token (``Authorization:
Bearer`` or ``x-api-key``): ``--http-token``, ``MOED_HTTP_TOKEN``, else the
random one made at first start (moed/doors/http_token.py, ``moectl
http-token``). ``--http-no-auth`` turns that off, loopback only, and
``moectl status`` warns about it. No CORS headers are ever sent.

A body must arrive whole within ``BODY_TIMEOUT_S`` (else 408); a declared
length over the maximum gets 413 before any of it is read; and a request takes
one of the ``--max-clients`` slots only once its body is in, so slow senders
cannot starve the others. A client that disconnects cancels its generation
(aiohttp's handler_cancellation; leaving the stream cancels it on the daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import json
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from moed.config import MAX_CLIENTS  # requests served at once (moed serve: --max-clients / config max_clients)
from moed.doors import anthropic_api, http_token, openai_routes
from moed.doors.bodies import BadRequest
from moed.net import is_loopback
from moed_client import AsyncClient, paths
from moed_client import errors as E
from moed_client import protocol as P

log = logging.getLogger("moed.doors.http")

TOKEN_ENV = "MOED_HTTP_TOKEN"
MAX_BODY_BYTES = P.MAX_MESSAGE_BYTES
BODY_TIMEOUT_S = 10.0  # the whole body, from the end of the headers
# An idle connection (none of its requests in flight) is closed after this long, so idle
# sockets cannot pile up; aiohttp's own default keeps them for an hour.
KEEPALIVE_S = 30.0
# After an early answer (413, 408) aiohttp reads on for this long before closing, so a client still
# sending its body gets the answer rather than a reset; its default (10 s) let a slow sender hold on.
LINGER_S = 2.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class GatewayError(Exception):
    """The gateway cannot start, with a message meant for a person."""


# Daemon errors -> HTTP status.
_STATUS_BY_CODE = {
    P.ErrorCode.BUSY: 429,
    P.ErrorCode.LIMIT_EXCEEDED: 400,
    P.ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    P.ErrorCode.INVALID_REQUEST: 400,
    P.ErrorCode.BAD_MESSAGE: 400,
    P.ErrorCode.ENGINE_RESTARTED: 503,
    P.ErrorCode.ENGINE_ERROR: 500,
    P.ErrorCode.SHUTTING_DOWN: 503,
    P.ErrorCode.NOT_READY: 503,
    P.ErrorCode.MODEL_NOT_FOUND: 404,  # as OpenAI answers an unknown model
    "not_running": 503,
    "timeout": 504,
}


def status_of(e: E.MoedError) -> int:
    return _STATUS_BY_CODE.get(e.code, 500)


def is_anthropic(request: web.Request) -> bool:
    return request.path == "/v1/messages" or request.path.startswith("/v1/messages/")


def error_response(request: web.Request, status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    """An error in the shape of the API the path belongs to (Anthropic's under /v1/messages, else OpenAI's)."""
    body = anthropic_api.error_body(status, message) if is_anthropic(request) else openai_routes.error_body(status, message, code, param)
    return web.json_response(body, status=status)


def check_text(value) -> None:
    """Strings must be encodable: JSON can spell a lone surrogate (``"\\ud800"``), UTF-8 and msgpack cannot."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"the body holds a lone surrogate ({e.object[e.start:e.end]!a}), which is not text", code=P.ErrorCode.BAD_MESSAGE) from None


def bearer(request: web.Request) -> str | None:
    """The token a request presents (``Authorization: Bearer`` or Anthropic's ``x-api-key``); 400 when not ASCII."""
    auth = request.headers.get("Authorization")
    given = auth[7:] if auth is not None and auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
    if given is not None and not given.isascii():  # aiohttp keeps undecodable header bytes as surrogate escapes
        raise BadRequest("the Authorization / x-api-key header must be ASCII", code=P.ErrorCode.BAD_MESSAGE)
    return given


class Gateway:
    def __init__(self, host: str, port: int, *, socket: str | Path | None = None, token: str | None = None, allow_remote: bool = False,
                 max_clients: int = MAX_CLIENTS, body_timeout: float = BODY_TIMEOUT_S):
        if not allow_remote and not is_loopback(host):
            raise ValueError(f"{host} is not a loopback address; pass --http-allow-remote (with a token) to listen on the network")
        if allow_remote and not token:
            raise ValueError("--http-allow-remote needs a token (--http-no-auth is for loopback only)")
        self.host, self.port, self.token, self.allow_remote = host, port, token, allow_remote
        self.max_clients, self.body_timeout = max_clients, body_timeout
        self.in_flight = 0  # requests being served now: this door's clients
        self.client = AsyncClient(socket, name="moed-http")
        self.runner: web.AppRunner | None = None
        self.allowed_hosts: set[str] = set()
        self.model_id = "moed"
        self.model_dir: str | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def auth(self) -> str:
        """``status``'s ``http_auth``: "token", or "none" under --http-no-auth."""
        return "token" if self.token else "none"

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._guard])
        app.add_routes([web.get("/health", self.health)])
        for method, path, handler in openai_routes.ROUTES + anthropic_api.ROUTES:
            app.router.add_route(method, path, functools.partial(handler, self))
        # handler_cancellation: a client that goes away cancels its handler, and so its generation.
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=KEEPALIVE_S,
                                   lingering_time=LINGER_S)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]  # the real port when asked for port 0
        names = {self.host, f"[{self.host}]"} | (set(LOOPBACK_NAMES) if is_loopback(self.host) else set())
        self.allowed_hosts = {f"{n}:{self.port}" for n in names} | ({n for n in names} if self.port == 80 else set())
        log.info("HTTP gateway (OpenAI, Anthropic Messages) on %s%s", self.url, "" if self.token else ", WITHOUT AUTH (--http-no-auth)")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await self.client.close()

    # -- guards -----------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        try:
            refused = self._refusal(request)
            if refused is not None:
                return refused
            if request.method == "POST":
                request["json"] = await self._read_json(request)
            if self.in_flight >= self.max_clients:
                return error_response(request, 429, f"too many HTTP requests in flight ({self.max_clients}); retry later", P.ErrorCode.BUSY)
            self.in_flight += 1
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1
        except BadRequest as e:
            resp = error_response(request, e.status, e.message, e.code, e.param)
            if e.status in (408, 413):  # the rest of the body is not wanted: do not linger reading it
                resp.force_close()
            return resp
        except E.MoedError as e:
            return error_response(request, status_of(e), e.message, e.code)
        except web.HTTPException as e:  # the router's 404 and 405, in the API's own shape
            if e.status < 400:
                raise
            message = f"no route {request.method} {request.path[:200]}" if e.status in (404, 405) else e.reason
            return error_response(request, e.status, message, {404: "not_found", 405: "method_not_allowed"}.get(e.status))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path[:200])
            return error_response(request, 500, "internal error in the gateway (see the daemon's log)", P.ErrorCode.ENGINE_ERROR)

    def _refusal(self, request: web.Request) -> web.Response | None:
        if not self.allow_remote:
            host = request.headers.get("Host", "")
            if host.lower() not in self.allowed_hosts:
                return error_response(request, 403, f"Host {host[:100]!a} is not this gateway's address", "forbidden_host")
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in {f"http://{h}" for h in self.allowed_hosts}:
            return error_response(request, 403, "cross-origin requests are not allowed", "forbidden_origin")
        if self.token:
            given = bearer(request)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return error_response(request, 401, "missing or wrong bearer token (`moectl http-token` prints it)", "invalid_api_key")
        return None

    async def _read_json(self, request: web.Request) -> dict:
        declared = request.content_length
        if declared is not None and declared > MAX_BODY_BYTES:
            raise BadRequest(f"request body of {declared} bytes exceeds {MAX_BODY_BYTES}", status=413, code=P.ErrorCode.LIMIT_EXCEEDED)
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout)
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"request body exceeds {MAX_BODY_BYTES} bytes", status=413, code=P.ErrorCode.LIMIT_EXCEEDED) from None
        except asyncio.TimeoutError:
            raise BadRequest(f"the request body did not arrive within {self.body_timeout:g} s", status=408, code="timeout") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the body is not valid JSON: {str(e)[:200]}", code=P.ErrorCode.BAD_MESSAGE) from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object", code=P.ErrorCode.BAD_MESSAGE)
        check_text(body)
        return body

    # -- shared by the APIs ---------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        try:
            status = await asyncio.wait_for(self.client.status(), 5.0)
        except (E.MoedError, asyncio.TimeoutError) as e:
            return web.json_response({"status": "unavailable", "error": str(e)}, status=503)
        ok = status.get("state") == "ready"
        return web.json_response({"status": "ok" if ok else status.get("state")}, status=200 if ok else 503)

    async def model(self) -> str:
        """The served model's id (its display name). A request's ``model`` goes to the daemon as the protocol's
        ``model``: another one is ``model_not_found`` (404), or a switch under ``--allow-switching``."""
        server = await self.client.connect()
        model = server.get("model") or {}
        self.model_id = model.get("display_name") or model.get("name") or "moed"
        self.model_dir = model.get("path")
        return self.model_id


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--http wants HOST:PORT, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


# --------------------------------------------------------------------------
# Running it


def add_arguments(parser) -> None:
    parser.add_argument("--http", default=None, metavar="127.0.0.1:PORT", help="serve the HTTP gateway, OpenAI and Anthropic APIs (off by default; loopback only)")
    parser.add_argument("--http-token", default=None, help=f"bearer token the gateway requires (default: ${TOKEN_ENV}, else the one in {http_token.token_file()})")
    parser.add_argument("--http-no-auth", action="store_true", help="serve HTTP without a token: every local account can use it (moectl status warns)")
    parser.add_argument("--http-allow-remote", action="store_true", help="let --http bind a non-loopback address (needs a token)")


def gateway_token(args) -> str | None:
    """The token the gateway requires: explicit, else the token file's (made at first start); None with --http-no-auth."""
    if getattr(args, "http_no_auth", False):
        return None
    return args.http_token or os.environ.get(TOKEN_ENV) or http_token.load_or_create()


async def open_gateway(args, socket: str | Path | None) -> Gateway | None:
    """The gateway for ``moed serve --http``, started; None without ``--http``."""
    if not getattr(args, "http", None):
        return None
    try:
        host, port = parse_listen(args.http)
        max_clients = getattr(args, "max_clients", None) or MAX_CLIENTS
        gateway = Gateway(host, port, socket=socket, token=gateway_token(args), allow_remote=args.http_allow_remote, max_clients=max_clients,
                          body_timeout=getattr(args, "http_body_timeout", None) or BODY_TIMEOUT_S)
        await gateway.start()
    except (ValueError, OSError) as e:
        raise GatewayError(f"cannot serve HTTP on {args.http}: {e}") from None
    if gateway.token is None:
        log.warning("the HTTP gateway on %s has no token (--http-no-auth): every account on this machine can use it", gateway.url)
    return gateway


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moed.doors.http", description="HTTP gateway (OpenAI, Anthropic Messages) for a running moed daemon")
    p.add_argument("--listen", required=True, metavar="127.0.0.1:PORT")
    p.add_argument("--socket", default=None, help="the daemon's socket (default: moed.sock in the runtime dir)")
    p.add_argument("--http-token", default=None)
    p.add_argument("--http-no-auth", action="store_true")
    p.add_argument("--http-allow-remote", action="store_true")
    p.add_argument("--http-body-timeout", type=float, default=BODY_TIMEOUT_S, metavar="S", help=f"seconds a request body may take to arrive (default {BODY_TIMEOUT_S:g})")
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
