"""Expert-major compute of one MoE layer for a multi-token forward (a prefill chunk).

Token-major compute of a chunk that routes to more experts than are resident
would either read experts over and over or compute every token once per group
of slots. Here the chunk's (token, k) pairs are grouped by routed expert
instead: the resident experts' pairs compute first, in one call, while the
first missing experts load; then each group of missing experts is read once
through the I/O pool into free or evictable slots, the next group loading
while this one computes (double buffering), and the slots go back to the cache
once the group's compute has run. No expert is read twice for one layer of
one forward.

Exactness: every piece is the layer's own switch module (mlx-lm's SwitchGLU,
gather_qmm) applied to the pairs of that piece, made to pick the kernel stock's
call over the whole chunk picks (kernels.py), so each pair's arithmetic is the
one stock mlx-lm does; the pieces are put back in pair order.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from .cache import LayerCache


class ExpertStream:
    """Streams one layer's missing experts through an I/O pool, a group ahead of compute."""

    def __init__(self, workers: int = 2):
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self.streamed = 0  # experts read by expert-major passes
        self.pieces = 0  # compute calls those passes made
        self.overlapped = 0  # groups whose loads were started before the previous piece computed

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="moed-stream")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def stats(self) -> dict:
        return {"streamed_experts": self.streamed, "pieces": self.pieces, "overlapped_groups": self.overlapped}

    def compute(self, cache: LayerCache, inner, x, indices, ids: np.ndarray, needed: np.ndarray) -> tuple[mx.array, float]:
        """The layer's output for every (token, k) pair of ``indices`` (ids: their values on the
        host). Returns it with the seconds spent waiting for loads."""
        k = ids.shape[-1]
        flat = ids.reshape(-1)
        xs = x.reshape(-1, x.shape[-1])
        resident = needed[cache.slot_of[needed] >= 0]
        queue = [int(e) for e in needed[cache.slot_of[needed] < 0]]
        room = cache.capacity - len(cache.pinned)  # pinned experts hold their slots for good
        group = max(1, room // 2)  # two groups in slots at once: one computing, one loading
        outs, where = [], []
        waited = 0.0
        piece = resident
        loads: dict[int, tuple[int, Future]] = {}
        try:
            while True:
                cache.in_use = set(piece.tolist())
                ahead = self._start(cache, queue, group, loads)
                if len(piece):
                    pos = np.flatnonzero(np.isin(flat, piece))
                    slots = mx.array(cache.slot_of[flat[pos]].astype(np.uint32))[:, None]
                    out = inner(xs[mx.array(pos // k)], slots, like=flat.size)  # stock's kernel (kernels.py)
                    mx.eval(out)  # before a later group may take these slots
                    outs.append(out[:, 0])
                    where.append(pos)
                    self.pieces += 1
                    self.overlapped += bool(ahead)
                if not ahead:
                    if not queue:
                        break
                    cache.in_use = set()
                    ahead = self._start(cache, queue, group, loads)  # this piece's slots are free now
                    if not ahead:
                        raise RuntimeError(f"layer {cache.layer}: no evictable slot (capacity {cache.capacity})")
                t0 = time.perf_counter()
                self._finish(cache, ahead, loads)
                waited += time.perf_counter() - t0
                piece = np.array(ahead, dtype=needed.dtype)
        finally:
            for e in list(loads):  # an error left loads in flight: let them land, keep the slots free
                slot, fut = loads.pop(e)
                try:
                    fut.result()
                except Exception:
                    pass
                cache.release(slot)
        order = np.argsort(np.concatenate(where), kind="stable")
        y = mx.concatenate(outs)[mx.array(order)]
        return y.reshape(*indices.shape, y.shape[-1]), waited

    def _start(self, cache: LayerCache, queue: list, group: int, loads: dict) -> list[int]:
        """Reserve slots for up to ``group`` queued experts and start their reads."""
        started = []
        while queue and len(started) < group:
            slot = cache.reserve()
            if slot is None:
                break
            e = queue.pop(0)
            loads[e] = (slot, self.pool.submit(cache.fill, slot, e))
            started.append(e)
        return started

    def _finish(self, cache: LayerCache, experts: list[int], loads: dict) -> None:
        error = None
        for e in experts:
            slot, fut = loads.pop(e)
            try:
                fut.result()
            except BaseException as exc:  # the slot stays free; the first error reaches the forward
                cache.release(slot)
                error = error or exc
                continue
            cache.install(slot, e)
        if error is not None:
            raise error
        self.streamed += len(experts)
