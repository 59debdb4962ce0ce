"""The editor door: msgpack-rpc on a Unix socket, spoken exactly as Neovim does.

Requests are ``[0, msgid, method, params]``, responses ``[1, msgid, error,
result]``, notifications ``[2, method, params]``. Every method takes one map:

- ``generate`` {prompt | messages | token_ids, max_tokens, temperature, ..., stop}
- ``infill`` {prefix, suffix, context?, buffer?, ...sampling}
- ``cancel`` {id}
- ``status`` {} (the daemon's status)

``generate`` and ``infill`` answer ``{text, finish_reason, usage, timings}``
when done; with ``stream: true`` they answer ``{id}`` at once and then notify
``moed_chunk`` ``[id, text]`` and ``moed_done`` ``[id, info]``. Stock Neovim
cannot route notifications with our names to Lua (it answers them with
``nvim_error_event``), so a request may name a Vim function in ``callback``:
events then arrive as ``nvim_call_function(callback, [event, id, data])``.
Both generation methods take ``t_max_ms``, a time budget: when it runs out the
request is cancelled and ends with ``finish_reason: "length"`` and
``timed_out: true``. Errors are strings ``"<code>: <message>"`` with the
protocol's error codes, the form Neovim shows as is.

This module is no second implementation of the daemon: every request is a
protocol v1 ``generate`` map handed to the daemon's own submit path (the
``Backend`` below), so validation, queue limits, cancellation and engine
restarts behave exactly as they do on the ZeroMQ socket.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import msgpack

from moed.doors import fim
from moed.config import MAX_CLIENTS  # editor connections at once, like every door (moed serve: --max-clients)
from moed_client import paths
from moed_client import protocol as P

log = logging.getLogger("moed.editor")

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_MSGID = 2**32 - 1
READ_SIZE = 64 * 1024
MAX_LIVE_PER_CONNECTION = 16
# A client that stops reading while we stream to it is dropped rather than
# letting its unread notifications grow without bound.
MAX_WRITE_BUFFER = 16 * 1024 * 1024
MAX_CONTEXT_CHUNKS = 32
MAX_TIME_BUDGET_MS = 10 * 60 * 1000
MAX_BUFFER_KEY_LEN = 256
VIM_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_#]{0,63}")
# Keys that belong to this door, not to the protocol v1 generate map.
EDITOR_KEYS = ("stream", "callback", "buffer", "t_max_ms", "prefix", "suffix", "context", "id", "type")


class Backend(Protocol):
    """What the daemon's front process lends this door (see moed/front/server.py)."""

    def submit(self, msg: dict, on_event: Callable[[dict], None]) -> Any:
        """Queue a protocol v1 ``generate`` map as the ZeroMQ door would.

        Raises ProtocolError to refuse it. ``on_event`` later receives the
        request's protocol ``chunk``, ``done`` or ``error`` maps, on the loop.
        Returns a handle for ``cancel``.
        """

    def cancel(self, handle: Any) -> None:
        """Cancel a submitted request; its ``done`` says ``cancelled``."""

    def status(self) -> Any:
        """The status map (or an awaitable of it)."""

    def model_dir(self) -> Path | None:
        """The served model's directory, where the tokenizer files are."""


def error_text(code: str, message: str) -> str:
    return f"{code}: {message}"


def _invalid(message: str) -> P.ProtocolError:
    return P.ProtocolError(P.ErrorCode.INVALID_REQUEST, message)


# --------------------------------------------------------------------------
# Framing


class RpcDecoder:
    """Splits a byte stream into msgpack objects, within the protocol's limits.

    ``feed`` returns the objects completed so far and, once the stream cannot
    be decoded any further (bad bytes, an object over MAX_MESSAGE_BYTES or
    over the container limits), a ProtocolError(BAD_MESSAGE): the connection
    must then be closed, as there is no way to find the next message's start.
    """

    def __init__(self, max_bytes: int = P.MAX_MESSAGE_BYTES):
        self._budget = P.ContainerBudget()
        self._unpacker = msgpack.Unpacker(
            raw=False,
            # Neovim sends buffer text as msgpack str even when it is not UTF-8.
            unicode_errors="replace",
            strict_map_key=False,
            max_buffer_size=max_bytes,
            # msgpack would allocate min(max_buffer_size, 1 MiB) per connection up front; the
            # buffer grows when a message needs it (up to max_bytes) and one read fits this.
            read_size=READ_SIZE,
            list_hook=self._budget,
            object_hook=self._budget,
            **P.UNPACK_LIMITS,
        )

    def feed(self, data: bytes) -> tuple[list, P.ProtocolError | None]:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            return [], P.ProtocolError(P.ErrorCode.BAD_MESSAGE, f"message exceeds {P.MAX_MESSAGE_BYTES} bytes")
        out = []
        while True:
            try:
                obj = next(self._unpacker)
                P.check_depth(obj)
            except StopIteration:
                return out, None
            except P.ProtocolError as e:
                return out, e
            except Exception as e:  # ValueError, FormatError, StackError... on hostile bytes
                return out, P.ProtocolError(P.ErrorCode.BAD_MESSAGE, f"not valid msgpack: {type(e).__name__}: {str(e)[:200]}")
            self._budget.count = 0  # the budget is per message; the decoder resumes partial ones
            out.append(obj)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --------------------------------------------------------------------------
# Validation of this door's own fields


def _callback(params: dict) -> str | None:
    name = params.get("callback")
    if name is None:
        return None
    if not isinstance(name, str) or not VIM_FUNCTION_NAME.fullmatch(name):
        raise _invalid("'callback' must be the name of a global Vim function (letters, digits, '_' or '#')")
    return name


def _time_budget(params: dict) -> float | None:
    value = params.get("t_max_ms")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= MAX_TIME_BUDGET_MS):
        raise _invalid(f"'t_max_ms' must be a number of milliseconds in (0, {MAX_TIME_BUDGET_MS}]")
    return float(value) / 1000.0


def _buffer_key(params: dict):
    key = params.get("buffer")
    if key is None:
        return None
    if isinstance(key, bool) or not isinstance(key, (int, str)) or (isinstance(key, str) and len(key) > MAX_BUFFER_KEY_LEN):
        raise _invalid(f"'buffer' must be an integer or a string of at most {MAX_BUFFER_KEY_LEN} characters")
    return key


def _text(params: dict, name: str, default: str | None = None) -> str:
    value = params.get(name, default)
    if not isinstance(value, str):
        raise _invalid(f"'{name}' must be a string")
    return value


def _context(params: dict) -> list[str]:
    chunks = params.get("context")
    if chunks is None:
        return []
    if isinstance(chunks, str):
        chunks = [chunks]
    if not isinstance(chunks, list) or len(chunks) > MAX_CONTEXT_CHUNKS:
        raise _invalid(f"'context' must be a list of at most {MAX_CONTEXT_CHUNKS} strings or {{text}} maps")
    out = []
    for c in chunks:
        if isinstance(c, dict):
            c = c.get("text")
        if not isinstance(c, str):
            raise _invalid("each 'context' chunk must be a string or a map with a string 'text'")
        out.append(c)
    return out


def generate_map(params: dict, request_id: str) -> dict:
    """The protocol v1 generate map for an editor call's params."""
    msg = {k: v for k, v in params.items() if k not in EDITOR_KEYS}
    msg.update(type=P.GENERATE, id=request_id)
    return msg


def infill_map(params: dict, request_id: str, model_dir: Path | None) -> tuple[dict, dict]:
    """(protocol v1 generate map, extra result fields) for an ``infill`` call."""
    prefix, suffix, context = _text(params, "prefix"), _text(params, "suffix", ""), _context(params)
    if not (prefix or suffix or context):
        raise _invalid("'prefix', 'suffix' and 'context' are all empty: nothing to fill in")
    for name in ("prompt", "messages", "token_ids"):
        if params.get(name) is not None:
            raise _invalid(f"infill builds its own prompt from 'prefix' and 'suffix'; '{name}' is not allowed")
    fmt = fim.detect(model_dir)
    special = fim.added_tokens(Path(model_dir)) if model_dir is not None else frozenset()
    prompt = fim.build_prompt(fmt, prefix, suffix, context, special)
    if not prompt:
        raise _invalid("without FIM tokens infill continues the prefix, and 'prefix' and 'context' are empty")
    msg = generate_map(params, request_id)
    msg["prompt"] = prompt
    stop = msg.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list):  # a malformed stop is left for the protocol's own validation to reject
        room = max(0, P.MAX_STOP_STRINGS - len(stop))
        msg["stop"] = stop + [s for s in fim.stop_strings(fmt, model_dir) if s not in stop][:room]
    extra = {"fim": fmt is not None}
    if fmt is not None:
        extra["fim_format"] = fmt.name
    return msg, extra


# --------------------------------------------------------------------------
# Connections


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
    def __init__(self, server: "EditorServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
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
            asyncio.ensure_future(self._respond_later(msgid, result))
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
            self.respond(msgid, None, result)

    # -- generation -------------------------------------------------------

    def start(self, msgid: int, params: dict, build: Callable[[str], tuple[dict, dict]], buffer=None):
        stream, callback, budget = P.flag(params, "stream"), _callback(params), _time_budget(params)
        if len(self.calls) >= MAX_LIVE_PER_CONNECTION:
            raise P.ProtocolError(P.ErrorCode.BUSY, f"this connection already has {MAX_LIVE_PER_CONNECTION} requests in flight")
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
        raise _invalid(f"'{method}' takes one map argument, got {len(args)} arguments")
    raise _invalid(f"'{method}' takes one map argument, got {type(args[0]).__name__}")


def _generate(conn: Connection, msgid: int, params: dict):
    return conn.start(msgid, params, lambda rid: (generate_map(params, rid), {}))


def _infill(conn: Connection, msgid: int, params: dict):
    buffer = _buffer_key(params)
    model_dir = conn.backend.model_dir()
    return conn.start(msgid, params, lambda rid: infill_map(params, rid, model_dir), buffer=buffer)


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


# --------------------------------------------------------------------------
# Server


class EditorServer:
    """The Unix socket, inside the front process's event loop."""

    def __init__(self, backend: Backend, path: Path | None = None, max_connections: int = MAX_CLIENTS):
        self.backend = backend
        self.path = Path(path) if path is not None else paths.editor_socket()
        self.max_connections = max_connections
        self.connections: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._retired: list[asyncio.AbstractServer] = []  # listeners replaced by rebind(); their connections go on
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we listen on
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        paths.ensure_private_dir(self.path.parent)
        _remove_stale_socket(self.path)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path), limit=READ_SIZE)
        os.chmod(self.path, 0o600)  # the 0700 directory already keeps others out; this says so twice
        st = self.path.lstat()
        self._file = (st.st_dev, st.st_ino)
        log.info("editor socket on %s", self.path)

    def bound(self) -> bool:
        """Whether the socket file is still the one this server listens on (not deleted, not replaced)."""
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._file

    async def rebind(self) -> None:
        """Listen on a new socket file after ours disappeared (a tmp cleaner, a stray rm).

        Connected editors keep their connections: the old listener only stops accepting.
        """
        old = self._server
        await self.start()
        if old is not None:
            old.close()
            self._retired.append(old)

    async def _accept(self, reader, writer) -> None:
        if len(self.connections) >= self.max_connections:
            # Told why, then dropped: each connection costs a descriptor and a task.
            log.warning("editor socket: refusing a connection (%d open)", len(self.connections))
            writer.write(pack([NOTIFICATION, "moed_error", [P.ErrorCode.BUSY, f"too many editor connections ({self.max_connections}); retry later"]]))
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                pass
            writer.close()
            return
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        self._tasks.add(asyncio.current_task())
        try:
            await conn.run()
        finally:
            self._tasks.discard(asyncio.current_task())

    async def close(self) -> None:
        if self._server is not None:
            listeners = [self._server, *self._retired]
            for server in listeners:
                server.close()
            for conn in list(self.connections):
                conn.close()
            if self._tasks:  # let each connection's reader see its end
                await asyncio.wait(list(self._tasks), timeout=2.0)
            for server in listeners:
                await server.wait_closed()
            self._server, self._retired = None, []
        try:
            if self.bound():  # ours: a file someone else put there since is not ours to delete
                self.path.unlink()
        except FileNotFoundError:
            pass


def _remove_stale_socket(path: Path) -> None:
    # The daemon's single-instance check runs before this, so a socket left here is a dead daemon's.
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


# --------------------------------------------------------------------------
# The daemon's side


class DaemonBackend:
    """A running ``moed.front.server.Daemon`` as this door's Backend.

    Each editor request becomes a local client of the daemon's sessions: the
    daemon admits it with the same ``admit`` a ZeroMQ generate goes through,
    and its ``send`` hands that client's messages to a sink here instead of
    the ROUTER socket (``Daemon.local_sinks``).
    """

    def __init__(self, daemon):
        self.daemon = daemon
        self._ids = itertools.count()

    def submit(self, msg: dict, on_event: Callable[[dict], None]):
        # libzmq's own peer ids are 5 bytes and ids that peers choose cannot
        # start with a zero byte, so these never collide with a ZeroMQ client.
        client = b"\x00editor-%d" % next(self._ids)
        sinks = self.daemon.local_sinks

        def sink(event: dict) -> None:
            if event.get("type") in (P.DONE, P.ERROR):
                sinks.pop(client, None)
            on_event(event)

        sinks[client] = sink
        try:
            self.daemon.admit(client, msg)
        except BaseException:
            sinks.pop(client, None)
            if not self.daemon.by_client.get(client):
                self.daemon.by_client.pop(client, None)
            raise
        return client, msg["id"]

    def cancel(self, handle) -> None:
        client, rid = handle
        seq = self.daemon.by_client.get(client, {}).get(rid)
        if seq is not None:
            self.daemon.cancel(seq)

    def status(self) -> dict:
        return self.daemon.status()

    def model_dir(self) -> Path | None:
        return self.daemon.model_path


def add_arguments(parser) -> None:
    parser.add_argument("--no-editor", action="store_true", help="do not open the editor socket (msgpack-rpc, editor.sock in the runtime dir)")


async def open_door(daemon) -> EditorServer | None:
    """Start the editor socket for ``daemon`` unless ``--no-editor``."""
    if getattr(daemon.args, "no_editor", False):
        return None
    server = EditorServer(DaemonBackend(daemon), daemon.runtime.socket_path.parent / paths.editor_socket().name,
                          max_connections=daemon.args.max_clients or MAX_CLIENTS)
    try:
        await server.start()
    except OSError as e:
        # The daemon still serves its main socket; status shows editor_socket: null.
        log.error("cannot open the editor socket %s: %s", server.path, e)
        return None
    return server
