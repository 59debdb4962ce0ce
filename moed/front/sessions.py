"""Sessions: the requests of each client, their admission, the queue, and their ends.

A client's ``generate`` becomes a ``Request`` with a daemon-wide ``seq`` (the
engine's name for it); it waits in the queue until the engine has a batch
slot (``pump``), and ends with one final message to its client (``finish``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from moed_client import protocol as P

from moed.channel import Cancel, Event, Submit
from moed.front.prompt_bound import check_context
from moed.front.requestlog import log_request

log = logging.getLogger("moed.daemon")

# Once no request has been in flight for this long, freed heap pages go back to the OS (platform.release_free_memory).
IDLE_TRIM_S = 2.0


@dataclass
class Request:
    client: bytes
    submit: Submit  # what the engine gets: the seq and the typed request
    received: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    completion_tokens: int = 0
    in_engine: bool = False
    tool_calls: list = field(default_factory=list)  # every call streamed so far, for the final done

    @property
    def seq(self) -> int:
        return self.submit.seq

    @property
    def id(self) -> str:
        return self.submit.request.id

    def timings(self) -> dict:
        now = time.monotonic()
        ttft = (self.first_token - self.received) if self.first_token else None
        decode = None
        if self.first_token and self.last_token and self.completion_tokens > 1 and self.last_token > self.first_token:
            decode = (self.completion_tokens - 1) / (self.last_token - self.first_token)
        return {"ttft_s": ttft, "decode_tok_s": decode, "total_s": now - self.received}


def door(client) -> str:
    """Which door a client came through: 'ipc' or 'tcp' (the two ROUTERs' ids are kept apart as ("tcp", id))."""
    return client[0] if isinstance(client, tuple) else "ipc"


def client_name(client) -> str:
    return f"tcp:{client[1].hex()}" if isinstance(client, tuple) else client.hex()


class Sessions:
    """Every live request, by seq and by client, and the queue in front of the engine.

    ``send(client, msg) -> bool`` delivers to a client (False: it is gone and was
    dropped); ``engine`` is what takes requests in: ``.ready`` and ``.send(msg)``.
    """

    def __init__(self, args, send: Callable[[object, dict], bool]):
        self.args = args
        self.send = send
        self.engine = None  # set by the Daemon: its Supervisor
        self.closed = False  # shutting down: no new requests
        self.requests: dict[int, Request] = {}  # seq -> request
        self.by_client: dict[bytes, dict[str, int]] = collections.defaultdict(dict)  # client -> {id: seq}
        self.queue: collections.deque[int] = collections.deque()  # admitted, not yet sent to the engine
        self.next_seq = 0
        self.idle_trim: asyncio.TimerHandle | None = None

    @property
    def in_engine(self) -> int:
        return sum(1 for r in self.requests.values() if r.in_engine)

    def admit(self, client, msg: dict) -> None:
        req = P.parse_generate(msg, max_tokens_limit=self.args.max_tokens)
        model = self.engine.model if self.engine is not None else {}
        check_context(req, self.args.max_context, model.get("max_token_bytes"))  # by bytes, before tokenizing
        if self.closed:
            raise P.ProtocolError(P.ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        owned = self.by_client.get(client, {})  # a refused first request must leave no empty session behind
        if req.id in owned:
            raise P.ProtocolError(P.ErrorCode.DUPLICATE_ID, f"request {req.id!r} is still running")
        if len(self.queue) >= self.args.max_queue and not self.make_room_for(client):
            raise P.ProtocolError(P.ErrorCode.BUSY, f"the queue is full ({self.args.max_queue} waiting); retry later")
        if not owned and self.clients_at(door(client)) >= self.args.max_clients:
            raise P.ProtocolError(P.ErrorCode.BUSY, f"too many clients with requests in flight on this door ({self.args.max_clients}); retry later")
        owned = self.by_client[client]
        seq = self.next_seq
        self.next_seq += 1
        self.requests[seq] = Request(client, Submit(seq, req))
        owned[req.id] = seq
        self.queue.append(seq)
        if self.args.debug:
            log.debug("request %s/%s (seq %d): %r", client_name(client), req.id, seq, req)
        self.pump()

    def queued_by(self) -> collections.Counter:
        return collections.Counter(self.requests[seq].client for seq in self.queue)

    def make_room_for(self, client) -> bool:
        """The queue is full: make room for ``client`` if another holds more of it than it would.

        The client queueing the most gives up its newest waiting request (it gets ``busy``,
        as if it had been refused), so no client can keep others out by filling the queue."""
        counts = self.queued_by()
        hog, most = max(counts.items(), key=lambda item: item[1], default=(None, 0))
        if hog is None or counts[client] + 1 >= most:
            return False
        newest = next(seq for seq in reversed(self.queue) if self.requests[seq].client == hog)
        self.queue.remove(newest)
        req = self.requests[newest]
        log.info("queue full: %s held %d of it; its request %s gives way to %s", client_name(hog), most, req.id, client_name(client))
        self.finish(req, P.error(P.ErrorCode.BUSY, f"the queue is full ({self.args.max_queue} waiting) and this client "
                                                   "holds the most of it; retry later", req.id))
        return True

    def clients_at(self, which: str) -> int:
        return sum(1 for c, owned in self.by_client.items() if owned and door(c) == which)

    def pump(self) -> None:
        """Move queued requests into the engine while it has batch slots."""
        engine = self.engine
        if engine is None or not engine.ready:
            return
        in_engine = self.in_engine
        while self.queue and in_engine < self.args.max_batch:
            req = self.requests[self.next_in_line()]
            req.in_engine = True
            in_engine += 1
            engine.send(req.submit)

    def next_in_line(self) -> int:
        """Take the oldest queued request of the client with the fewest in the engine, so one
        client's burst cannot take every batch slot while others wait."""
        running = collections.Counter(r.client for r in self.requests.values() if r.in_engine)
        seq = min(self.queue, key=lambda s: running[self.requests[s].client])  # min keeps the first (oldest) of ties
        self.queue.remove(seq)
        return seq

    def cancel_id(self, client, rid: str) -> None:
        """A client's cancel. Idempotent and unanswered when the id is not live: it
        races with the request's own end, and an error carrying that id after its
        'done' would read as a second final (or as the final of a new request reusing the id)."""
        seq = self.by_client.get(client, {}).get(rid)
        if seq is not None:
            self.cancel(seq)

    def cancel(self, seq: int) -> None:
        req = self.requests.get(seq)
        if req is None:
            return
        if req.in_engine:
            self.engine.send(Cancel(seq))  # the engine answers with a 'cancelled' final event
        else:
            self.queue.remove(seq)
            self.finish(req, P.done(req.id, "cancelled", {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}, req.timings()))

    def cancel_all(self, in_engine_too: bool) -> None:
        for seq in list(self.queue):
            self.cancel(seq)
        if in_engine_too:
            for seq in [s for s, r in self.requests.items() if r.in_engine]:
                self.cancel(seq)

    def drop_client(self, client) -> None:
        for seq in list(self.by_client.pop(client, {}).values()):
            req = self.requests.pop(seq, None)
            if req is None:
                continue
            if req.in_engine:
                if self.engine is not None:
                    self.engine.send(Cancel(seq))
            else:
                self.queue.remove(seq)
        self.pump()  # the dropped requests' batch slots are free now
        self.when_idle()

    def finish(self, req: Request, final: dict | None) -> None:
        self.requests.pop(req.seq, None)
        owned = self.by_client.get(req.client)
        if owned is not None:
            owned.pop(req.id, None)
            if not owned:
                del self.by_client[req.client]
        if final is not None:
            self.send(req.client, final)
        log_request(req, final, client_name(req.client))
        self.pump()
        self.when_idle()

    def fail(self, seq: int, code: str, message: str) -> None:
        req = self.requests.get(seq)
        if req is not None:
            self.finish(req, P.error(code, message, req.id))

    def fail_all(self, code: str, message: str) -> None:
        self.queue.clear()
        for req in list(self.requests.values()):
            self.finish(req, P.error(code, message, req.id))

    def fail_in_engine(self, code: str, message: str) -> None:
        for req in [r for r in self.requests.values() if r.in_engine]:
            self.finish(req, P.error(code, message, req.id))

    def on_events(self, events: list[Event], now: float) -> None:
        """Stream one engine message's events to their clients."""
        for ev in events:
            req = self.requests.get(ev["seq"])
            if req is None:
                continue  # its client is gone
            if ev["token_ids"]:
                req.completion_tokens += len(ev["token_ids"])
                req.first_token = req.first_token or now
                req.last_token = now
            finish = ev.get("finish")
            if ev.get("tool_calls"):
                req.tool_calls += ev["tool_calls"]
            if ev["text"] or ev["token_ids"] or ev.get("tool_calls"):
                if not self.send(req.client, P.chunk(req.id, ev["text"], ev["token_ids"], ev.get("tool_calls"))):
                    continue
            if finish is not None:
                timings = req.timings() | {"max_batch": ev.get("max_batch"), "engine_decode_tok_s": ev.get("engine_decode_tok_s")}
                self.finish(req, P.done(req.id, finish, ev["usage"], timings, tool_calls=req.tool_calls, stop_sequence=ev.get("stop_sequence")))

    def when_idle(self) -> None:
        """After a burst, once nothing has been in flight for IDLE_TRIM_S, give freed heap pages back."""
        if self.requests or self.idle_trim is not None:
            return

        def trim() -> None:
            from moed import platform

            self.idle_trim = None
            if not self.requests:  # busy again: the next idle moment does it
                platform.release_free_memory()

        self.idle_trim = asyncio.get_running_loop().call_later(IDLE_TRIM_S, trim)
