"""One editor connection: msgpack-rpc calls in, protocol v1 requests to the Backend, answers out.

Every method takes one map (see moed/doors/editor.py for the methods). A
connection holds at most MAX_LIVE_PER_CONNECTION requests; a newer ``infill``
for the same ``buffer`` cancels the older one; ``t_max_ms`` cancels a request
when its time runs out and reports ``finish_reason: "length"``, ``timed_out``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from moed.doors import editor_params as params_
from moed.doors.rpc import MAX_MSGID, NOTIFICATION, READ_SIZE, REQUEST, RESPONSE, RpcDecoder, error_text, pack
from moed_client import protocol as P

log = logging.getLogger("moed.editor")

MAX_LIVE_PER_CONNECTION = 16
# A client that stops reading while we stream to it is dropped rather than
# letting its unread notifications grow without bound.
MAX_WRITE_BUFFER = 16 * 1024 * 1024


@dataclass
class Call:
    id: str
    msgid: int | None  # the rpc request to answer when done; None when streaming
    callback: str | None
    extra: dict
    buffer: Any = None
    handle: Any = None
    text: list = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    timed_out: bool = False
    finished: bool = False


class Connection:
    def __init__(self, server: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server, self.reader, self.writer = server, reader, writer
        self.backend = server.backend
        self.calls: dict[str, Call] = {}
        self.by_buffer: dict[Any, str] = {}
        self.ids = itertools.count(1)
        self.closed = False

    # -- io ---------------------------------------------------------------

    async def run(self) -> None:
        decoder = RpcDecoder()
        try:
            while not self.closed:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                messages, error = decoder.feed(data)
                if error is not None:
                    # The stream cannot be resynchronised: the peer is told and dropped, and
                    # what it sent in the same read is not started only to be cancelled.
                    log.info("editor client sent a bad stream: %s", error.message)
                    self.notify("moed_error", [error.code, error.message])
                    break
                for msg in messages:
                    self.dispatch(msg)
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def send(self, obj) -> None:
        if self.closed:
            return
        try:
            self.writer.write(pack(obj))
        except (ConnectionError, OSError, RuntimeError):
            self.close()
            return
        if self.writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("editor client stopped reading; dropping it")
            self.close()

    def respond(self, msgid: int, error: str | None, result) -> None:
        self.send([RESPONSE, msgid, error, result])

    def notify(self, method: str, params: list) -> None:
        self.send([NOTIFICATION, method, params])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for call in list(self.calls.values()):
            self._cancel(call)
        self.calls.clear()
        self.by_buffer.clear()
        try:
            self.writer.close()
        except Exception:
            pass
        self.server.connections.discard(self)

    # -- dispatch ---------------------------------------------------------

    def dispatch(self, msg) -> None:
        if not isinstance(msg, list) or not msg or msg[0] not in (REQUEST, RESPONSE, NOTIFICATION):
            self.notify("moed_error", [P.ErrorCode.BAD_MESSAGE, "a message must be [0, msgid, method, params] or [2, method, params]"])
            return
        kind = msg[0]
        if kind == RESPONSE:
            return  # this door sends no requests, so there is nothing to match a response to
        if kind == NOTIFICATION:
            if len(msg) == 3 and msg[1] == "nvim_error_event":
                # Neovim's answer to a notification it has no handler for (our moed_chunk).
                return
            self.notify("moed_error", [P.ErrorCode.UNKNOWN_TYPE, "this server takes requests, not notifications"])
            return
        msgid = msg[1] if len(msg) > 1 else None
        if isinstance(msgid, bool) or not isinstance(msgid, int) or not 0 <= msgid <= MAX_MSGID:
            self.notify("moed_error", [P.ErrorCode.BAD_MESSAGE, "a request's msgid must be an integer in [0, 2**32)"])
            return
        if len(msg) != 4 or not isinstance(msg[2], str) or not isinstance(msg[3], list):
            self.respond(msgid, error_text(P.ErrorCode.BAD_MESSAGE, "a request must be [0, msgid, method, params] with a string method and a params array"), None)
            return
        method, args = msg[2], msg[3]
        handler = METHODS.get(method)
        if handler is None:
            self.respond(msgid, error_text(P.ErrorCode.UNKNOWN_TYPE, f"no method {method[:64]!r}; methods are {', '.join(sorted(METHODS))}"), None)
            return
        try:
            params = {} if (method == "status" and not args) else _one_map(method, args)
            result = handler(self, msgid, params)
        except P.ProtocolError as e:
            self.respond(msgid, error_text(e.code, e.message), None)
            return
        except Exception as e:
            log.exception("editor method %s failed", method)
            self.respond(msgid, error_text(P.ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"), None)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._respond_later(msgid, result))
            self.server.pending.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self.server.pending.discard)
        elif result is not _LATER:
            self.respond(msgid, None, result)

    async def _respond_later(self, msgid: int, awaitable) -> None:
        try:
            result = await awaitable
        except P.ProtocolError as e:
            self.respond(msgid, error_text(e.code, e.message), None)
        except Exception as e:
            log.exception("editor request failed")
            self.respond(msgid, error_text(P.ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"), None)
        else:
            if result is not _LATER:
                self.respond(msgid, None, result)

    # -- generation -------------------------------------------------------

    def start(self, msgid: int, params: dict, build: Callable[[str], tuple[dict, dict]], buffer=None):
        stream, callback, budget = P.flag(params, "stream"), params_.callback(params), params_.time_budget(params)
        if len(self.calls) >= MAX_LIVE_PER_CONNECTION:
            raise P.ProtocolError(P.ErrorCode.BUSY, f"this connection already has {MAX_LIVE_PER_CONNECTION} requests in flight")
        if self.server.in_flight() >= self.server.max_in_flight:
            # The door is one client of the daemon, so it keeps the daemon's clients-per-door cap itself.
            raise P.ProtocolError(P.ErrorCode.BUSY, f"too many editor requests in flight ({self.server.max_in_flight}); retry later")
        rid = str(next(self.ids))
        msg, extra = build(rid)
        if buffer is not None and buffer in self.by_buffer:
            # A newer request from the same buffer makes the older one stale.
            stale = self.calls.get(self.by_buffer.pop(buffer))
            if stale is not None:
                self._cancel(stale)
        call = Call(rid, None if stream else msgid, callback, extra, buffer)
        call.handle = self.backend.submit(msg, lambda event: self.on_event(call, event))
        if call.finished:  # refused by an event delivered during submit
            return _LATER if not stream else {"id": rid}
        self.calls[rid] = call
        if buffer is not None:
            self.by_buffer[buffer] = rid
        if budget is not None:
            call.timer = asyncio.get_running_loop().call_later(budget, self._time_out, call)
        return {"id": rid} if stream else _LATER

    def _time_out(self, call: Call) -> None:
        if not call.finished:
            call.timed_out = True
            self.backend.cancel(call.handle)

    def _cancel(self, call: Call) -> None:
        if not call.finished and call.handle is not None:
            self.backend.cancel(call.handle)

    def on_event(self, call: Call, event: dict) -> None:
        if call.finished:
            return
        kind = event.get("type")
        if kind == P.CHUNK:
            text = event.get("text") or ""
            if call.msgid is None:
                if text:
                    self.emit(call, "moed_chunk", text)
            else:
                call.text.append(text)
            return
        if kind == P.DONE:
            info = {"finish_reason": event.get("finish_reason"), "usage": event.get("usage"), "timings": event.get("timings")}
            if call.timed_out and info["finish_reason"] == "cancelled":
                info["finish_reason"], info["timed_out"] = "length", True
            info.update(call.extra)
            self._finish(call)
            if call.msgid is None:
                self.emit(call, "moed_done", info)
            else:
                self.respond(call.msgid, None, {"text": "".join(call.text), **info})
            return
        if kind == P.ERROR:
            code, message = event.get("code", P.ErrorCode.INTERNAL), event.get("message", "")
            self._finish(call)
            if call.msgid is None:
                self.emit(call, "moed_done", {"finish_reason": "error", "error": {"code": code, "message": message}, **call.extra})
            else:
                self.respond(call.msgid, error_text(code, message), None)

    def _finish(self, call: Call) -> None:
        call.finished = True
        if call.timer is not None:
            call.timer.cancel()
        self.calls.pop(call.id, None)
        if call.buffer is not None and self.by_buffer.get(call.buffer) == call.id:
            del self.by_buffer[call.buffer]

    def emit(self, call: Call, event: str, data) -> None:
        if call.callback:
            self.notify("nvim_call_function", [call.callback, [event, call.id, data]])
        else:
            self.notify(event, [call.id, data])


_LATER = object()  # a handler's result that is answered when the request finishes


def _one_map(method: str, args: list) -> dict:
    if len(args) == 1 and isinstance(args[0], dict):
        return args[0]
    if len(args) == 1 and args[0] == []:
        return {}  # an empty Lua table travels as an empty array
    if len(args) != 1:
        raise params_.invalid(f"'{method}' takes one map argument, got {len(args)} arguments")
    raise params_.invalid(f"'{method}' takes one map argument, got {type(args[0]).__name__}")


def _generate(conn: Connection, msgid: int, params: dict):
    return conn.start(msgid, params, lambda rid: (params_.generate_map(params, rid), {}))


def _infill(conn: Connection, msgid: int, params: dict):
    buffer = params_.buffer_key(params)

    def start(model_dir):
        return conn.start(msgid, params, lambda rid: params_.infill_map(params, rid, model_dir), buffer=buffer)

    model_dir = conn.backend.model_dir()
    if inspect.isawaitable(model_dir):  # a backend that must ask the daemon first
        return _then(model_dir, start)
    return start(model_dir)


async def _then(awaitable, use):
    return use(await awaitable)


def _cancel(conn: Connection, msgid: int, params: dict):
    rid = params.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    call = conn.calls.get(rid) if isinstance(rid, str) else None
    if call is None:
        raise P.ProtocolError(P.ErrorCode.UNKNOWN_REQUEST, f"no request {rid!r} in flight on this connection")
    conn._cancel(call)
    return {"id": rid, "cancelled": True}


def _status(conn: Connection, msgid: int, params: dict):
    return conn.backend.status()


METHODS = {"generate": _generate, "infill": _infill, "cancel": _cancel, "status": _status}
