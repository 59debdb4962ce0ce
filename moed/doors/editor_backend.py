"""What the editor door needs from the daemon (``Backend``), and the daemon as one: a protocol v1 client.

``ClientBackend`` speaks to the daemon over its own ZeroMQ socket with one
``moed_client.AsyncClient``, as the HTTP gateway does, so validation, queue
limits, cancellation and engine restarts behave exactly as for any client.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol


from moed_client import AsyncClient
from moed_client import errors as E
from moed_client import protocol as P

log = logging.getLogger("moed.editor")

SAMPLING_FIELDS = tuple(P.SamplingParams.__dataclass_fields__)


class Backend(Protocol):
    """The daemon, as the editor door sees it."""

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

    def model_dir(self) -> Any:
        """The served model's directory, where the tokenizer files are (or an awaitable of it)."""


@dataclass
class Handle:
    id: str  # the door's request id, which the events carry
    stream: Any = None  # the client's AsyncStream once sent
    cancelled: bool = False


def refusal(e: E.MoedError) -> P.ProtocolError:
    return P.ProtocolError(e.code or P.ErrorCode.INTERNAL, e.message)


class ClientBackend:
    """The daemon on ``socket``, through one AsyncClient for every editor request."""

    def __init__(self, socket, model_dir: Path | None = None):
        # No reply timeout: an editor request may wait in the queue, and t_max_ms is the
        # editor's own budget; the client's liveness ping still notices a dead daemon.
        self.client = AsyncClient(socket, timeout=None, name="moed-editor")
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self._tasks: set[asyncio.Task] = set()

    def submit(self, msg: dict, on_event: Callable[[dict], None]) -> Handle:
        req = P.parse_generate(msg)  # the daemon's own rules: a bad field is refused before anything is sent
        handle = Handle(req.id)
        fields = {k: msg[k] for k in SAMPLING_FIELDS if msg.get(k) is not None}  # the daemon fills in its defaults
        task = asyncio.get_running_loop().create_task(self._run(handle, req, fields, on_event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    async def _run(self, handle: Handle, req: P.GenerateRequest, fields: dict, on_event) -> None:
        if handle.cancelled:  # cancelled before it was sent: the daemon never hears of it
            on_event(P.done(handle.id, "cancelled", {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}, {}))
            return
        try:
            stream = await self.client.generate(req.prompt, messages=req.messages, token_ids=req.token_ids, **fields)
            handle.stream = stream
            if handle.cancelled:
                stream.cancel()  # its final done still comes, with the usage so far
            async for chunk in stream:
                on_event(P.chunk(handle.id, chunk.text, chunk.token_ids))
            on_event(P.done(handle.id, stream.finish_reason, stream.usage, stream.timings))
        except E.MoedError as e:
            on_event(P.error(e.code or P.ErrorCode.INTERNAL, e.message, handle.id))
        except asyncio.CancelledError:
            if handle.stream is not None:
                handle.stream.close()  # tells the daemon
            raise

    def cancel(self, handle: Handle) -> None:
        handle.cancelled = True
        if handle.stream is not None:
            handle.stream.cancel()

    async def status(self) -> dict:
        try:
            status = await self.client.status()
        except E.MoedError as e:
            raise refusal(e) from None
        status.pop("type", None)
        return status

    def model_dir(self):
        if self._model_dir is not None:
            return self._model_dir  # a model does not change under a running daemon
        return self._ask_model_dir()

    async def _ask_model_dir(self) -> Path | None:
        path = ((await self.status()).get("model") or {}).get("path")
        if path:
            self._model_dir = Path(path)
        return self._model_dir

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        await self.client.close()
