"""Checking speculative passes, in their forward or one token late.

A speculative pass (manager.py) runs on whatever experts are resident and
records each layer's choice; its check reads that routing back in one go and
finds the first layer, if any, that read a missing expert. Waiting for that
readback inside the forward also waits for the token's whole compute, so the
next token's graph cannot be built while this one computes (the overlap
mlx-lm's ``generate_step`` is built around). A decode loop can instead have
each decode pass checked one token late, through the ``DeferredCheck``
interface below (decode.py is that loop):

- the pass returns unchecked; it is checked at the end of the next forward's
  graph building, or by ``check_through`` before its token is handed out;
- a miss raises ``Rollback`` with the KV caches trimmed back to before that
  pass and its exact redo armed: the next forward redoes it, so the loop
  restarts from the last good token by feeding ``Rollback.inputs`` again.

``PassChecks`` is the manager's side: the checks themselves and the
``DeferredCheck`` methods. ``ExpertManager`` inherits it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import mlx.core as mx
import numpy as np


class Rollback(Exception):
    """A deferred pass read an expert that was not resident: the token it made
    must not go out. The KV caches are trimmed back to before that pass, and
    the next forward redoes it exactly; feed ``inputs`` again to get it."""

    def __init__(self, pass_id: int, inputs):
        super().__init__(f"forward {pass_id} missed an expert")
        self.pass_id = pass_id
        self.inputs = inputs


class DeferredCheck(Protocol):
    """What a decode loop that checks each token's pass one token late calls.

    The loop's contract: call ``check_in_forward`` before each (re)start of
    generation, ``token_sampled`` as each token is sampled, ``check_through``
    with that token's pass id before handing the token out, ``finish`` at the
    end, whatever ended it. ``Rollback`` from ``check_through`` (or from a
    forward) means: drop the tokens not handed out yet and restart from
    ``Rollback.inputs``.
    """

    def defers_checks(self) -> bool:
        """Whether this manager's checks may be deferred at all (not in approximate mode, not turned off)."""

    def check_in_forward(self) -> None:
        """Until the next ``token_sampled``, check every pass inside its own forward
        (prefill chunks: a one-token chunk looks like a decode step but makes no token)."""

    def token_sampled(self) -> int:
        """A token was sampled from the latest forward: returns that forward's pass id,
        and defers the checks of the decode passes that follow."""

    def check_through(self, pass_id: int) -> None:
        """Return once pass ``pass_id`` and every older one are checked and good;
        ``Rollback`` on a miss."""

    def finish(self) -> None:
        """End of the loop: check the last pass and redo it on a miss, so the KV
        caches hold exactly what checked decoding would have left; checks go back
        inside their forwards."""


@dataclass
class Pass:
    """A speculative forward waiting for its residency check."""

    id: int
    out: mx.array
    records: list  # (layer cache, routed ids, slot map at build, evictions at build), in layer order
    outputs: dict = field(default_factory=dict)  # expert outputs by layer position, for the redo
    kv: list | None = None  # the KV caches it appended to
    ntok: int = 1
    inputs: object = None
    call: Callable | None = None  # runs this forward again (same inputs, same KV caches)
    routing: mx.array | None = None  # every layer's ids in one array: one readback, however many layers
    traces: list = field(default_factory=list)  # the prefetcher's gate+1 guesses, on a sampled step
    sampled: bool = False  # the prefetcher scores its predictors on this pass


class PassChecks:
    """The manager's checks of speculative passes, and its ``DeferredCheck`` side.

    Uses the manager's ``_lock``, ``_order``, ``_records``, ``_outputs``,
    ``prefetcher`` and counters; state of its own: ``_defer`` (the next decode
    pass may be checked late), ``_pending`` (the pass waiting for its check) and
    ``_redo`` (armed by a rollback: what the next forward redoes)."""

    def _init_checks(self) -> None:
        self._defer = False
        self.defer_checks = True  # whether a decode loop may defer them (off: every check inside its forward)
        self._pending: Pass | None = None
        self._redo: tuple[int, dict] | None = None
        self.forward_id = 0
        self.deferred = self.rollbacks = 0

    # -- DeferredCheck ---------------------------------------------------------
    def defers_checks(self) -> bool:
        return not self.approximate and self.defer_checks

    def check_in_forward(self) -> None:
        self._defer = False

    def token_sampled(self) -> int:
        self._defer = True
        return self.forward_id

    def check_through(self, pass_id: int) -> None:
        with self._lock:
            if self._pending is not None and self._pending.id <= pass_id:
                self._settle()

    def finish(self) -> None:
        with self._lock:
            self._defer = False
            self._redo = None
            pending = self._pending
            try:
                self._settle()
            except Rollback:
                try:
                    mx.eval(pending.call())
                finally:  # a failed redo must not leave itself armed for another stream
                    self._redo = None

    # -- the checks ------------------------------------------------------------
    def _pass(self, out, kv, ntok, inputs, call) -> Pass:
        """The speculative pass just built, for its check now or later."""
        routing = mx.concatenate([r[1].reshape(-1) for r in self._records]) if self._records else None
        pf = self.prefetcher
        return Pass(self.forward_id, out, self._records, self._outputs, kv, ntok, inputs, call, routing,
                    pf.take_traces() if pf is not None else [], pf is not None and pf.sampled)

    def _check(self, p: Pass, decode: bool = True, then=None) -> int | None:
        """Read an evaluated pass's routing back and record its use; the position
        of the first layer that missed, or None. ``then`` runs as soon as the pass
        is known to have missed nothing, before its use is recorded."""
        self._count_readback()
        seen, first = self._misses(p)
        if decode:
            self.redo_rate = 0.9 * self.redo_rate + 0.1 * (first is not None)
        if first is None and then is not None:
            then()
        self._note_pass(seen, first, p)
        return first

    def _settle(self, built_on: int = 0, queue=None) -> None:
        """Check the deferred pass, if any. ``built_on``: tokens fed since by a
        forward built on its output, not yet queued; ``queue`` queues it, once the
        check has passed (the bookkeeping then runs while it computes). On a miss
        both are undone (KV caches trimmed), the redo is armed and ``Rollback`` raised."""
        p, self._pending = self._pending, None
        if p is None:
            if queue is not None:
                queue()
            return
        mx.eval(p.out, p.routing)  # all of it: a load may overwrite a slot once the check has passed
        first = self._check(p, then=queue)
        if first is None:
            return
        self.rollbacks += 1
        # what the redo needs (redo.py): the exact outputs so far, and the missed layer's experts
        self._redo = (first, self._undo(p, first, built_on), self._needed_at(p, first, self._order))
        raise Rollback(p.id, p.inputs)

    def _undo(self, p: Pass, first: int, built_on: int = 0) -> dict:
        """Undo a pass that missed at layer position ``first``: its tokens (and
        ``built_on`` more) leave the KV caches. Returns the expert outputs of the
        layers before ``first``, which the redo reuses (same input, all resident)."""
        self.redos += 1
        if p.kv is not None:
            for c in p.kv:
                c.trim(p.ntok + built_on)
        return {o: y for o, y in p.outputs.items() if o < first}

    def _misses(self, p: Pass) -> tuple[list, int | None]:
        """An evaluated pass's routing: per layer (position, cache, experts
        needed, experts that were not resident when the pass read its slots,
        routed ids), and the position of the first layer that missed. A layer
        that evicted anything since counts as missed: its slots may have changed."""
        seen = []
        flat = np.array(p.routing) if p.routing is not None else None
        start = 0
        for cache, ind, slot_of, evictions in p.records:
            ids = flat[start:start + ind.size].reshape(ind.shape)
            start += ind.size
            self._top_k = ids.shape[-1]
            # one token's top-k ids are distinct already: sorting them is np.unique's answer, at a third of its cost
            needed = np.sort(ids.ravel()) if ids.size == ids.shape[-1] else np.unique(ids)
            missing = needed[slot_of[needed] < 0]
            if cache.evictions != evictions and not len(missing):
                missing = needed
            seen.append((self._order[id(cache)], cache, needed, missing, ids))
        misses = [order for order, _, _, miss, _ in seen if len(miss)]
        return seen, (min(misses) if misses else None)

    def _note_pass(self, seen, first, p: Pass) -> None:
        """Record a checked pass's use. When something missed, loads for every
        layer's misses start now (the pass's choices are the best guess for the
        redo's) and the experts it used are kept from eviction until the forward ends."""
        pf = self.prefetcher
        if pf is not None:
            pf.absorb_traces(p.traces)
        for order, cache, needed, _, routed in seen:
            # layers from the first miss on are redone and record themselves then
            if first is None or order < first:
                cache.record(needed)
                cache.count(routed)
                if pf is not None:
                    pf.note_need(order, cache, needed, p.sampled)
            cache.in_use.update(needed.tolist())
        if pf is not None:
            pf.after_pass(seen, first)

