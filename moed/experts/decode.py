"""Decoding with each token's residency check one token late, exactly.

A speculative pass (manager.py) must read its routing back before its token can
be trusted. Inside the forward that readback waits for the token's whole
compute, so the next token's graph is built only afterwards, while mlx-lm's
``generate_step`` is built around building token n+1's graph while token n
computes. ``generate`` keeps that overlap: the manager checks token n's pass
after token n+1's graph is built and queued, and a token is handed out only
once the pass that made it has been checked.

The loop talks to the manager only through the ``DeferredCheck`` interface
(deferred.py). When a check finds a miss, the manager trims the KV caches back
to before that pass, arms the exact redo and raises ``Rollback``. Generation then
restarts from the last good token with mlx-lm's ``generate_step``, unchanged:
the first forward of the restart is the redo. The sampler's key is put back to
what it was before the rolled-back token was drawn, so a request with a seed
gets the tokens it would get with every expert resident. (A sampler that draws
from MLX's global random state cannot be put back: after a rollback its draws
differ from an uninterrupted run's, from the same distribution.)

A restart is not a new request, so it keeps MLX's buffer cache: ``generate_step``
empties that cache (``mx.clear_cache``) right after its first token, and each
restart would then make the steps after a rollback allocate their buffers anew
(``restarts_keep_cache`` below; ``MOED_RESTART_CLEARS_CACHE=1`` restores
generate_step's own behaviour, to measure what it costs).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import mlx.core as mx

from .deferred import DeferredCheck, Rollback


def with_history(processors: list, before: list[int]) -> list:
    """Logits processors that see ``before`` (tokens this generate_step was not fed: a cached prompt prefix,
    or what came before a restart) ahead of the tokens generate_step passes them, as a stock run's see them."""
    if not before:
        return processors
    head = mx.array(before)
    return [lambda tokens, logits, p=p: p(mx.concatenate([head, tokens]), logits) for p in processors]


class DrawLog:
    """A sampler wrapped to remember its key before each draw, so that draws made
    ahead of what was handed out can be taken back (samplers without a ``key``
    are drawn through unchanged)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.keyed = hasattr(sampler, "key")
        self.key_before: list = []

    def __call__(self, logprobs):
        self.key_before.append(self.sampler.key if self.keyed else None)
        return self.sampler(logprobs)

    def undraw_from(self, n: int) -> None:
        """Forget draws n and later, and put the key back to what it was before draw n."""
        if self.keyed and len(self.key_before) > n:
            self.sampler.key = self.key_before[n]
        del self.key_before[n:]


class _CacheKept:
    """mlx.core as ``mlx_lm.generate`` sees it while a restarted generate_step yields its first
    token: everything but ``clear_cache``, which does nothing."""

    def __getattr__(self, name):
        return getattr(mx, name)

    @staticmethod
    def clear_cache() -> None:
        pass


@contextmanager
def _no_clear_cache():
    module = sys.modules["mlx_lm.generate"]
    module.mx = _CacheKept()
    try:
        yield
    finally:
        module.mx = mx


def restarts_keep_cache(steps):
    """``steps``, a generate_step restarted after a rollback, without the ``mx.clear_cache`` it runs
    after its first token (``n % 256 == 0`` at n = 0). Its later ones, every 256 tokens, stay."""
    if os.environ.get("MOED_RESTART_CLEARS_CACHE") == "1":
        yield from steps
        return
    for _ in range(2):  # the clear runs when the second item is asked for
        with _no_clear_cache():
            item = next(steps, None)
        if item is None:
            return
        yield item
    yield from steps


def generate(prompt: mx.array, model, manager: DeferredCheck | None = None, *, max_tokens: int = 256, sampler=None,
             prompt_cache=None, prefill_step_size: int = 2048, logits_processors=None, **kv):
    """``mlx_lm.generate.generate_step``'s (token, logprobs) stream, with the
    residency checks of ``manager``'s lazy experts deferred by one token.

    A sampler that owns its random key keeps it in its ``key`` attribute (see
    moed.engine.sampling.SeededSampler), so a rollback can restore it. ``kv``: generate_step's
    kv_bits, kv_group_size and quantized_kv_start (a quantized KV cache, moed serve --kv-bits)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler

    prompt_cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    kw = dict(prompt_cache=prompt_cache, prefill_step_size=prefill_step_size, **kv)
    if manager is None or not manager.defers_checks() or not can_trim_prompt_cache(prompt_cache):
        yield from _plain(prompt, model, max_tokens, sampler, {**kw, "logits_processors": logits_processors})
        return
    seen = prompt.tolist() if logits_processors else []  # what generate_step's logits processors have been shown: the prompt, then each token out

    draws = DrawLog(sampler or greedy_sampler)  # generate_step's own default
    made_by = []  # per token: the forward that sampled it

    def sample(logprobs):
        # checks deferred from the first token on: a one-token prefill chunk looks like a decode step but makes no token
        made_by.append(manager.token_sampled())
        return draws(logprobs)

    done, handed_out, feed, steps = 0, 0, prompt, None
    try:
        while done < max_tokens:
            manager.check_in_forward()
            # a restart feeds only the rolled-back inputs: its processors are shown what came before them too
            processors = logits_processors and with_history(logits_processors, seen[:len(seen) - feed.size] if feed is not prompt else [])
            steps = generate_step(feed, model, max_tokens=max_tokens - done, sampler=sample, logits_processors=processors, **kw)
            try:
                for token, logprobs in (steps if feed is prompt else restarts_keep_cache(steps)):
                    manager.check_through(made_by[done])
                    handed_out = done + 1
                    yield token, logprobs
                    if logits_processors:
                        seen.append(token)
                    done += 1
                return
            except Rollback as rollback:
                steps.close()
                # tokens go out in order, each after its pass was checked: the first unchecked one is next
                if made_by[done:done + 1] != [rollback.pass_id]:
                    raise RuntimeError(f"rolled back forward {rollback.pass_id}, which made no token still "
                                       "waiting to go out") from rollback
                draws.undraw_from(done)
                del made_by[done:]
                feed = rollback.inputs.reshape(-1)
    finally:
        if steps is not None:
            steps.close()
        draws.undraw_from(handed_out)  # closed with a token drawn ahead: undraw it
        manager.finish()


def _plain(prompt, model, max_tokens: int, sampler, kw: dict):
    """``generate_step`` unchanged, except that a keyed sampler's key is put back when closed early.

    generate_step samples token n+1 before it yields token n, so a stream closed
    after n tokens has drawn one key too many. Whoever goes on from token n with
    the same sampler (Solo.join hands it to the batch) must draw that token with
    the key an uninterrupted run would use, or a seeded request's output would
    depend on when other requests arrived."""
    from mlx_lm.generate import generate_step

    draws = DrawLog(sampler) if sampler is not None else None
    handed_out = 0
    steps = generate_step(prompt, model, max_tokens=max_tokens, sampler=draws, **kw)
    try:
        for token, logprobs in steps:
            handed_out += 1
            yield token, logprobs
    finally:
        steps.close()
        if draws is not None:
            draws.undraw_from(handed_out)
