"""The engine's decoding: mlx-lm's ``BatchGenerator`` (continuous batching) and a solo path.

A request that arrives while nothing else is decoding runs *solo*: mlx-lm's
own ``generate_step``, which builds token n+1's graph while token n computes
(through moed.experts.decode, which keeps that overlap with lazy experts).
On a small model that pipelining is worth 10-20% over ``BatchGenerator``'s
step. When a second request arrives, the solo one joins the batch with its KV
cache (``Solo.join``), so continuous batching is unchanged: the newcomer waits
for at most one decode step. Models whose KV cache cannot be trimmed always
use ``BatchGenerator``. An LRU of recent prompt caches lets a prompt that
extends an earlier one prefill only the new tokens.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from moed_client import protocol as P

from moed.channel import EngineOptions, Event, Submit
from moed.engine.loading import encode_prompt
from moed.engine.prefill import ChunkClock, Prefill, calibrate
from moed.engine.sampling import StopText, make_request_processors, make_request_sampler
from moed.engine.solo import Solo
from moed.engine.structured import Grammars
from moed.engine.tool_calls import ToolCalls, check_tools, make_tool_calls

log = logging.getLogger("moed.engine")

PROMPT_CACHE_MODEL_KEY = "model"


@dataclass
class Active:
    seq: int
    uid: int
    prompt_tokens: int
    cached_tokens: int
    detokenizer: object
    stop: StopText
    completion_tokens: int = 0
    pending_ids: list = field(default_factory=list)
    max_batch: int = 0  # most requests decoded in one step together with this one
    ignore_eos: bool = False
    max_tokens: int = 0
    first_token_at: float = 0.0  # engine clock (perf_counter) of the first and the latest token
    last_token_at: float = 0.0
    tools: ToolCalls | None = None  # finds the calls in the text when the request offers tools


class Engine:
    """The model, its batch, the solo request and the prompt caches; ``args`` are EngineOptions."""

    def __init__(self, model, tokenizer, manager, args):
        from mlx_lm.generate import BatchGenerator, StopSequences
        from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, make_prompt_cache

        self.model, self.tokenizer, self.manager = model, tokenizer, manager
        self.max_context = args.max_context
        self.prefill_step = args.prefill_step
        self.new_batch = lambda: BatchGenerator(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=args.max_batch,
            prefill_batch_size=min(args.max_batch, 8),
            prefill_step_size=args.prefill_step,
        )
        self.gen = self.new_batch()
        self.no_stop = StopSequences()  # for ignore_eos: no stop tokens at all
        self.eos = set(tokenizer.eos_token_ids)
        self.prompt_caches = LRUPromptCache(max_size=args.prompt_cache_size, max_bytes=args.prompt_cache_bytes)
        self.active: dict[int, Active] = {}  # uid -> request in the batch
        self.by_seq: dict[int, int] = {}  # seq -> uid
        self.solo: Solo | None = None
        # A solo request joins a batch by trimming its cache by one token (Solo.join).
        self.new_cache = lambda: make_prompt_cache(model)
        self.solo_allowed = not args.no_solo and can_trim_prompt_cache(self.new_cache())
        kv_bits = getattr(args, "kv_bits", None)
        # generate_step's quantized KV cache; BatchGenerator has none, so the front sends one request at a time
        self.kv = dict(kv_bits=kv_bits, kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start) if kv_bits else {}
        if self.kv and not self.solo_allowed:
            raise RuntimeError("--kv-bits needs the solo path: a model whose KV cache can be trimmed, and no --no-solo")
        self.solo_steps = 0
        self.tokens_generated = 0
        # prompts being fed a chunk per step, in turn (prefill.py); chunk length by time
        self.prefilling: deque[Prefill] = deque()
        chunk_ms = getattr(args, "prefill_chunk_ms", EngineOptions.prefill_chunk_ms)
        self.chunk_clock = ChunkClock(chunk_ms / 1e3, args.prefill_step)
        self.progress = 0  # steps and prefill chunks done: what the watchdog judges (loop.py)
        self.grammars = Grammars(tokenizer, self.model_vocab())  # constrained decoding (structured.py)

    def _waited(self) -> float:
        """Seconds forwards have waited for experts to load, so far (0 without lazy experts)."""
        return getattr(self.manager, "wait_time", 0.0)

    def calibrate(self) -> dict:
        """Measure prefill speed before serving (prefill.calibrate): the chunk clock's first samples."""
        return calibrate(self.model, self.chunk_clock, min(self.model_vocab(), 1024), self.new_cache, self._waited)

    @property
    def busy(self) -> bool:
        return bool(self.active) or self.solo is not None or bool(self.prefilling)

    def drop_all(self) -> list[int]:
        """Forget every request after a failed step (its KV caches are half-updated) and start
        a fresh batch; the seqs that were in flight."""
        seqs = [a.seq for a in self.active.values()]
        if self.solo is not None:
            seqs.append(self.solo.active.seq)
            try:  # closing checks its last pass, and may redo it: the same fault may strike again
                self.solo.close()
            except Exception:
                log.exception("closing the solo request after a failed step")
        seqs += [p.active.seq for p in self.prefilling]
        self.solo, self.active, self.by_seq = None, {}, {}
        self.prefilling.clear()
        self.gen.close()
        self.gen = self.new_batch()
        return seqs

    # -- requests ---------------------------------------------------------
    def tokenize(self, req: P.GenerateRequest, tokenizer=None) -> list[int]:
        """The request's prompt tokens; ``tokenizer``: a copy for a thread of its own (tokenizing.py)."""
        tok = tokenizer or self.tokenizer
        if req.token_ids is not None:
            ids = list(req.token_ids)
            if max(ids) >= self.model_vocab():
                raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, f"token id {max(ids)} is outside the vocabulary")
            return ids
        if req.messages is not None:
            if not getattr(tok, "has_chat_template", False):
                raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, "this model has no chat template; send 'prompt' instead")
            return list(tok.apply_chat_template(req.messages, tools=check_tools(req, tok), add_generation_prompt=True))
        return encode_prompt(tok, req.prompt)

    def model_vocab(self) -> int:
        return vocab_size(self.model)

    def submit(self, msg: Submit, tokens: list[int] | None = None) -> None:
        seq, sampling = msg.seq, msg.request.sampling
        tokens = self.tokenize(msg.request) if tokens is None else tokens
        if not tokens:
            raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, "the prompt encodes to no tokens")
        if len(tokens) + sampling.max_tokens > self.max_context:
            raise P.ProtocolError(
                P.ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"prompt ({len(tokens)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the context limit {self.max_context}",
            )
        # a quantized prefix would change what the rest attends to: stock mlx-lm quantizes a whole prompt at once
        cache, rest = self.prompt_caches.fetch_nearest_cache(PROMPT_CACHE_MODEL_KEY, tokens) if not self.kv else (None, tokens)
        if cache is not None and not rest:
            # An exact hit: BatchGenerator needs one token to feed, so give back the last one.
            from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            else:
                cache, rest = None, tokens
        cached = len(tokens) - len(rest)
        processors = make_request_processors(sampling, self.model_vocab())
        constrained = self.grammars.processor(msg.request)
        if constrained is not None:  # last, so the penalties and bias cannot bring back a token it masked
            processors = (processors or []) + [constrained]
        insert = dict(
            prompts=[rest],
            max_tokens=[sampling.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[tokens[:cached]],
            samplers=[make_request_sampler(sampling)],
            logits_processors=[processors] if processors else None,
            stop_sequences=[self.no_stop] if sampling.ignore_eos else None,
        )
        active = Active(seq, 0, len(tokens), cached, self.tokenizer.detokenizer, StopText(sampling.stop),
                        ignore_eos=sampling.ignore_eos, max_tokens=sampling.max_tokens, tools=make_tool_calls(msg.request, self.tokenizer))
        if self.solo is not None:
            self._join_batch()  # the solo loop defers its checks: no other forward may run beside it
        if len(rest) - 1 > self.chunk_clock.size(cached) and not self.kv:  # quantized: generate_step prefills as stock's does
            # longer than a chunk: all but the last token are fed a chunk per step, between the others'
            # steps (a shorter prompt is fed by the decode loop's first step, as mlx-lm does)
            cache = cache if cache is not None else self.new_cache()
            self.prefilling.append(Prefill(active, insert, cache, tokens, rest[:-1]))
        else:
            self._start(active, insert, cache, tokens)
        log.debug("seq %d: %d prompt tokens, %d from cache", seq, len(tokens), cached)

    def _start(self, active: Active, insert: dict, cache, tokens: list) -> None:
        """Decode a request whose prompt is in ``cache`` but for what ``insert`` still feeds."""
        if self.solo is not None:
            self._join_batch()
        if self.solo_allowed and not self.active and not self.prefilling:
            cache = cache if cache is not None else self.new_cache()
            self.solo = Solo(active, insert, cache, list(tokens))
            self.solo.start(self.model, self.manager, self.prefill_step, self.kv)
        else:
            self._insert(active, insert)

    def _prefill_chunk(self) -> None:
        """Feed one chunk of the prompt next in turn; a prompt fed whole starts decoding."""
        p = self.prefilling[0]
        self.prefilling.rotate(-1)
        p.feed(self.model, self.chunk_clock, self._waited)
        if p.done:
            self.prefilling.remove(p)
            self._start(p.active, p.handoff(), p.cache, p.tokens)

    def _insert(self, a: Active, insert: dict) -> None:
        (a.uid,) = self.gen.insert(**insert)
        self.active[a.uid] = a
        self.by_seq[a.seq] = a.uid

    def _join_batch(self) -> None:
        solo, self.solo = self.solo, None
        self._insert(solo.active, solo.join())

    def cancel(self, seq: int) -> Event | None:
        feeding = next((p for p in self.prefilling if p.active.seq == seq), None)
        if feeding is not None:  # stops before its next chunk; what was fed stays for a prompt that extends it
            self.prefilling.remove(feeding)
            self._keep_cache(feeding.cache, feeding.fed())
            a = feeding.active
        elif self.solo is not None and self.solo.active.seq == seq:
            a = self._end_solo()
        else:
            uid = self.by_seq.get(seq)
            if uid is None:
                return None
            self._remove(uid, keep_cache=True)
            a = self.active.pop(uid)
        a.pending_ids = []  # the last step's ids went out with its event already
        return self._final(a, "cancelled", "")

    def cancelled_unstarted(self, seq: int) -> Event:
        """The final event of a request cancelled before it reached the engine's batch."""
        return self._final(Active(seq, 0, 0, 0, None, None), "cancelled", "")

    def cancel_all(self) -> list[Event]:
        seqs = list(self.by_seq) + ([self.solo.active.seq] if self.solo is not None else [])
        seqs += [p.active.seq for p in self.prefilling]
        return [e for e in (self.cancel(seq) for seq in seqs) if e]

    def _remove(self, uid: int, keep_cache: bool) -> None:
        caches = self.gen.remove([uid], return_prompt_caches=keep_cache)
        self.by_seq.pop(self.active[uid].seq, None)
        for cache, tokens in caches.values():
            self._keep_cache(cache, tokens)

    def _end_solo(self) -> Active:
        solo, self.solo = self.solo, None
        solo.close()
        self._keep_cache(solo.cache, solo.tokens)
        return solo.active

    def _keep_cache(self, cache, tokens) -> None:
        if cache and tokens:
            self.prompt_caches.insert_cache(PROMPT_CACHE_MODEL_KEY, list(tokens), cache)

    def _final(self, a: Active, finish: str, text: str) -> Event:
        return {
            "seq": a.seq,
            "text": text,
            "token_ids": a.pending_ids,
            "finish": finish,
            "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens, "cached_tokens": a.cached_tokens},
            "max_batch": a.max_batch,
            # decode rate on the engine's clock, apart from transport: what the model ran at
            "engine_decode_tok_s": (a.completion_tokens - 1) / (a.last_token_at - a.first_token_at)
            if a.completion_tokens > 1 and a.last_token_at > a.first_token_at else None,
        }

    # -- one decode step ---------------------------------------------------

    def step(self) -> list[Event]:
        """One decode step (solo, or of the whole batch) and one prefill chunk; the events produced."""
        t0 = time.perf_counter()
        events = self._decode() if self.solo is not None or self.active else []
        if events:
            log.debug("decode step: %d events, %.1f ms", len(events), (time.perf_counter() - t0) * 1e3)
        if self.prefilling:
            self._prefill_chunk()
        self.progress += 1
        return events

    def _decode(self) -> list[Event]:
        if self.solo is not None:
            return self._step_solo()
        _, responses = self.gen.next()
        events = []
        for r in responses:
            a = self.active.get(r.uid)
            if a is None:
                continue
            event, stopped = self._on_token(a, r.token, r.finish_reason, len(responses))
            if stopped:  # a stop string, which BatchGenerator does not know about
                self._remove(r.uid, keep_cache=True)
            if "finish" in event:
                self.by_seq.pop(a.seq, None)
                del self.active[r.uid]
                if r.prompt_cache is not None:
                    self._keep_cache(r.prompt_cache, r.all_tokens)
            events.append(event)
        return events

    def _step_solo(self) -> list[Event]:
        a = self.solo.active
        token = self.solo.next_token()
        self.solo_steps += 1
        finish = None
        if token in self.eos and not a.ignore_eos:
            finish = "stop"
        elif a.completion_tokens + 1 >= a.max_tokens:
            finish = "length"
        event, _ = self._on_token(a, token, finish, 1)
        if "finish" in event:
            self._end_solo()
        return [event]

    def _on_token(self, a: Active, token: int, finish: str | None, batch: int) -> tuple[Event, bool]:
        """The event for one new token of ``a``; whether a stop string ended it here."""
        a.pending_ids = []
        a.max_batch = max(a.max_batch, batch)
        a.last_token_at = time.perf_counter()
        a.first_token_at = a.first_token_at or a.last_token_at
        if finish != "stop":  # an EOS token is not part of the output, as in mlx_lm.generate
            a.completion_tokens += 1
            a.pending_ids.append(token)
            a.detokenizer.add_token(token)
        if finish is not None:
            a.detokenizer.finalize()
        text, hit = a.stop.feed(a.detokenizer.last_segment)
        self.tokens_generated += 1
        stopped = hit and finish is None
        if stopped:
            finish = "stop"
        if finish is not None and not hit:
            text += a.stop.flush()
        calls = []
        if a.tools is not None:
            text, calls = a.tools.feed(text)
            if finish is not None:
                rest, more = a.tools.flush()
                text, calls = text + rest, calls + more
        if finish is None:
            return {"seq": a.seq, "text": text, "token_ids": a.pending_ids, **({"tool_calls": calls} if calls else {})}, False
        if finish == "stop" and a.tools is not None and a.tools.count:
            finish = "tool_calls"
        event = self._final(a, finish, text)
        if calls:
            event["tool_calls"] = calls
        if a.stop.hit is not None:
            event["stop_sequence"] = a.stop.hit
        return event, stopped

    def stats(self) -> dict:
        import mlx.core as mx

        stats = {
            "active": len(self.active) + (self.solo is not None),
            "solo_steps": self.solo_steps,
            "prefill": dict(self.chunk_clock.stats(), prefilling=len(self.prefilling)),
            "tokens_generated": self.tokens_generated,
            "prompt_cache": {"entries": len(self.prompt_caches), "bytes": self.prompt_caches.nbytes},
            "mlx_active_bytes": mx.get_active_memory(),
            "mlx_peak_bytes": mx.get_peak_memory(),
            "kv_cache": self.kv_stats(),
            "experts": self.manager.stats() if self.manager is not None and hasattr(self.manager, "stats") else None,
        }
        return stats

    def kv_stats(self) -> dict:
        """The KV cache's quantization (--kv-bits) and the bytes of the caches outside BatchGenerator now
        (the solo request and prompts being prefilled: every cache under --kv-bits, which decodes solo)."""
        caches = [self.solo.cache] if self.solo is not None else []
        caches += [p.cache for p in self.prefilling]
        live = sum(c.nbytes for cache in caches for c in cache if hasattr(c, "nbytes"))
        return {"bits": self.kv.get("kv_bits"), "group_size": self.kv.get("kv_group_size"), "active_bytes": live}


def vocab_size(model) -> int:
    """Rows of the model's embedding table, from its args: a wrapper's (Kimi's) are in ``text_config``."""
    args = getattr(model, "args", None)
    for source in (args, getattr(args, "text_config", None)):
        n = source.get("vocab_size") if isinstance(source, dict) else getattr(source, "vocab_size", None)
        if isinstance(n, int):
            return n
    return 1 << 62
