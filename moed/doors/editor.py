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

This door is a protocol v1 client of the daemon, as the HTTP gateway is:
every request is a ``generate`` map sent through a ``Backend``
(moed/doors/editor_backend.py; in the daemon, a ``moed_client.AsyncClient`` on
its own socket), so validation, queue limits, cancellation and engine restarts
behave exactly as they do for any client. The framing is in moed/doors/rpc.py,
one connection's calls in moed/doors/editor_connection.py, the maps built from
a call's params in moed/doors/editor_params.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

from moed.config import MAX_CLIENTS  # editor connections (and requests) at once, like every door (moed serve: --max-clients)
from moed.doors.editor_backend import Backend, ClientBackend
from moed.doors.editor_connection import Connection
from moed.doors.rpc import NOTIFICATION, READ_SIZE, pack
from moed_client import paths
from moed_client import protocol as P

log = logging.getLogger("moed.editor")


class EditorServer:
    """The Unix socket, inside the front process's event loop."""

    def __init__(self, backend: Backend, path: Path | None = None, max_connections: int = MAX_CLIENTS, max_in_flight: int = MAX_CLIENTS):
        self.backend = backend
        self.path = Path(path) if path is not None else paths.editor_socket()
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight  # requests across all connections, as the daemon caps each door's clients
        self.connections: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._retired: list[asyncio.AbstractServer] = []  # listeners replaced by rebind(); their connections go on
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we listen on
        self._tasks: set[asyncio.Task] = set()  # one per connection
        self.pending: set[asyncio.Task] = set()  # answers that wait on the backend

    async def start(self) -> None:
        paths.ensure_private_dir(self.path.parent)
        _remove_stale_socket(self.path)
        with paths.born_private():  # a rebind after a tmp cleaner made it 0755 until the chmod (found by a test)
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

    def in_flight(self) -> int:
        return sum(len(conn.calls) for conn in self.connections)

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
        closer = getattr(self.backend, "close", None)  # a backend that holds a connection of its own
        if closer is not None:
            await closer()
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


def add_arguments(parser) -> None:
    parser.add_argument("--no-editor", action="store_true", help="do not open the editor socket (msgpack-rpc, editor.sock in the runtime dir)")


async def open_door(args, socket_path) -> EditorServer | None:
    """The editor socket next to the daemon's ``socket_path``, started; None with ``--no-editor``.

    The door reaches the daemon as a client on ``socket_path``; it learns the
    model's directory (for FIM tokens) from the daemon's status.
    """
    if getattr(args, "no_editor", False):
        return None
    socket_path = Path(socket_path)
    limit = getattr(args, "max_clients", None) or MAX_CLIENTS
    server = EditorServer(ClientBackend(socket_path), socket_path.parent / paths.editor_socket().name,
                          max_connections=limit, max_in_flight=limit)
    try:
        await server.start()
    except OSError as e:
        # The daemon still serves its main socket; status shows editor_socket: null.
        log.error("cannot open the editor socket %s: %s", server.path, e)
        await server.backend.close()
        return None
    return server
