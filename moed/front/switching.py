"""Which model the engine holds, and when: ``load`` swaps it, keep-alive unloads it when idle.

The Supervisor runs engines one after another; between two of them it asks
``between_engines`` what comes next. A swap resolves the new model while the
old one still serves, holds the queue, drains (or cancels) what is in the
engine, then lets the Supervisor stop the old engine and start one on the new
model; once it is ready every client the daemon has heard from gets a
protocol ``model_changed``. Keep-alive (``--keep-alive``, config
``keep_alive``) stops the engine after that many idle seconds (state
``unloaded``); the next request starts it again, with progress in ``status``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path

from moed_client import protocol as P

log = logging.getLogger("moed.daemon")

IDLE_POLL_S = 0.1  # how often keep-alive looks for idleness and for requests waiting on an unloaded model
MAX_PEERS = 1024  # clients remembered for model_changed (the oldest are forgotten first)


class ModelKeeper:
    def __init__(self, daemon):
        self.daemon = daemon
        self.sup = daemon.supervisor
        self.sessions = daemon.sessions
        self.keep_alive = getattr(daemon.args, "keep_alive", None)  # seconds; None or < 0: never unload
        self.allow_switching = bool(getattr(daemon.args, "allow_switching", False))
        self.peers: collections.OrderedDict = collections.OrderedDict()
        self.switch: dict | None = None  # the last swap: {model, state, error}; in status
        self.pending: tuple[str | None, Path] | None = None  # the model the next engine loads
        self.previous: str | None = None
        self.fallback: tuple | None = None  # (spec, path, model) served before the swap under way
        self.sup.between_engines = self.between_engines
        self.sup.on_ready = self.on_ready
        self.sup.on_load_failed = self.on_load_failed

    # -- clients ---------------------------------------------------------------

    def heard_from(self, client) -> None:
        self.peers.pop(client, None)
        self.peers[client] = None
        while len(self.peers) > MAX_PEERS:
            self.peers.popitem(last=False)

    def names(self) -> set[str]:
        """Every way a request may name the served model."""
        from moed.models import display_name

        names = {str(self.sup.model.get("name")), str(self.daemon.args.model or "embedded")}
        if self.sup.model_path is not None:
            names |= {str(self.sup.model_path), display_name(self.sup.model_path)}
        return names

    def check_request(self, client, msg: dict) -> None:
        """A ``generate`` naming another model: ``model_not_found``, or (allow_switching) a swap it waits for."""
        wanted = msg.get("model")
        if wanted is None or wanted == "" or (self.pending is None and wanted in self.names()):
            return
        if not isinstance(wanted, str):
            raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, "'model' must be a string")
        if self.pending is not None and wanted == self.pending[0]:
            return  # it waits for the swap under way
        if not self.allow_switching:
            raise P.ProtocolError(P.ErrorCode.MODEL_NOT_FOUND,
                                  f"this daemon serves {self.sup.model.get('name')}, not {wanted!r} "
                                  "(`moectl load MODEL` switches it; config allow_switching lets requests do it)")
        self.start_swap(wanted, drain=True)

    # -- load ------------------------------------------------------------------

    def load(self, client, msg: dict) -> None:
        spec = msg.get("model")
        if spec is not None and not isinstance(spec, str):
            raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, "'model' must be a string or nil (the embedded model)")
        self.start_swap(spec or None, drain=msg.get("drain", True) is not False)
        self.daemon.send(client, {"type": P.LOAD, "accepted": True, "model": spec or "embedded", "drain": bool(msg.get("drain", True))})

    def start_swap(self, spec: str | None, drain: bool) -> None:
        if self.sup.state == "stopping":
            raise P.ProtocolError(P.ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        if self.switch is not None and self.switch["state"] not in ("done", "failed"):
            raise P.ProtocolError(P.ErrorCode.BUSY, f"already switching to {self.switch['model']}; retry once it is loaded")
        self.switch = {"model": spec or "embedded", "state": "resolving", "error": None, "drain": drain}
        asyncio.get_running_loop().create_task(self.swap(spec, drain))

    async def swap(self, spec: str | None, drain: bool) -> None:
        from moed.models import ModelError, resolve_model

        def progress(message: str, fraction: float | None) -> None:
            self.sup.progress = {"stage": "download", "message": message, "fraction": fraction}

        try:
            path = await asyncio.to_thread(resolve_model, spec, progress)
        except ModelError as e:
            log.error("cannot load %s: %s", spec or "embedded", e)
            self.switch.update(state="failed", error=str(e))
            return
        self.pending = (spec, path)
        self.switch["state"] = "draining"
        self.sup.held = True  # queued requests wait for the new model
        if not drain:
            for seq in [s for s, r in self.sessions.requests.items() if r.in_engine]:
                self.sessions.cancel(seq)
        deadline = time.monotonic() + self.daemon.args.shutdown_timeout
        while self.sessions.in_engine and self.sup.engine is not None:
            if time.monotonic() > deadline:  # as shutdown does: in-flight work gets shutdown_timeout, then is cancelled
                for seq in [s for s, r in self.sessions.requests.items() if r.in_engine]:
                    self.sessions.cancel(seq)
                deadline = float("inf")
            await asyncio.sleep(0.02)
        if self.sup.state == "stopping":
            self.switch.update(state="failed", error="the daemon is shutting down")
            return
        self.switch["state"] = "loading"
        self.previous = str(self.sup.model.get("name"))
        log.info("switching from %s to %s", self.previous, path)
        if self.sup.engine is None:  # unloaded: the next engine simply loads the new model
            self.adopt()
        else:
            self.sup.swap.set()

    def adopt(self) -> None:
        spec, path = self.pending
        if self.sup.model_path is not None and self.sup.model_path != path:
            self.fallback = (self.daemon.args.model, self.sup.model_path, dict(self.sup.model))
        self.daemon.args.model = spec
        self.sup.model_path = path
        self.sup.model = {"name": path.name, "path": str(path)}
        self.pending = None
        self.sup.held = False

    # -- between two engines ---------------------------------------------------

    async def between_engines(self, stopping: asyncio.Event) -> bool:
        """After the Supervisor stopped an engine on purpose: whether to start another (False: stopping)."""
        if self.pending is not None:
            self.adopt()
        else:  # unloaded by keep-alive: wait for a request
            self.sup.state = "unloaded"
            self.sup.progress = {"stage": "unloaded", "message": f"idle for {self.keep_alive:g} s; the next request loads the model", "fraction": None}
            log.info("model unloaded after %.3g s idle", self.keep_alive)
            while not self.sessions.queue and self.pending is None:
                if stopping.is_set():
                    return False
                await asyncio.sleep(IDLE_POLL_S)
            if self.pending is not None:
                self.adopt()
        if stopping.is_set() or self.sup.state == "stopping":
            return False
        self.sup.state = "loading"
        self.sup.progress = {"stage": "loading", "message": f"loading {self.sup.model.get('name')}", "fraction": 0.0}
        return True

    def on_load_failed(self, message: str) -> bool:
        """The engine died loading a model swapped in: serve the one before it again (True), and tell
        whoever waited for the new model. Without one to go back to (the first model), the daemon exits."""
        if self.fallback is None:
            return False
        failed = self.sup.model.get("name")
        self.daemon.args.model, self.sup.model_path, self.sup.model = self.fallback
        self.fallback = None
        log.error("loading %s failed (%s); serving %s again", failed, message, self.sup.model.get("name"))
        if self.switch is not None:
            self.switch.update(state="failed", error=message)
        self.sessions.fail_all(P.ErrorCode.ENGINE_ERROR, f"loading {failed} failed: {message}; "
                               f"the daemon serves {self.sup.model.get('name')} again; retry the request")
        return True

    def on_ready(self) -> None:
        self.fallback = None
        name = str(self.sup.model.get("name"))
        if self.switch is not None and self.switch["state"] == "loading":
            self.switch["state"] = "done"
        if self.previous is not None and self.previous != name:
            log.info("now serving %s (was %s); telling %d client(s)", name, self.previous, len(self.peers))
            notice = {"type": P.MODEL_CHANGED, "model": self.sup.model, "previous": self.previous}
            for client in list(self.peers):
                if not self.daemon.send(client, notice):
                    self.peers.pop(client, None)
        self.previous = None

    # -- keep-alive ------------------------------------------------------------

    async def idle_loop(self) -> None:
        if self.keep_alive is None or self.keep_alive < 0:
            return
        idle_since = None
        while True:
            await asyncio.sleep(IDLE_POLL_S)
            busy = self.sessions.requests or self.pending is not None or (self.switch or {}).get("state") in ("resolving", "draining", "loading")
            if self.sup.state != "ready" or busy:
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since >= self.keep_alive and self.sup.engine is not None:
                self.sup.state = "unloading"  # not ready: nothing more goes to this engine
                self.sup.swap.set()  # no pending model: between_engines waits, unloaded
                idle_since = None

    def report(self) -> dict | None:
        return dict(self.switch) if self.switch else None
