"""The engine process: the only place moed imports MLX.

The front process (moed/front/server.py) starts it as ``python -m moed.engine`` and
talks to it over a private ZeroMQ PAIR socket (msgpack maps, see ``Channel``
messages below). The engine owns the model, mlx-lm's ``BatchGenerator``
(continuous batching), the per-request detokenizers and stop strings, and an
LRU of recent prompt caches so a prompt that extends an earlier one only
prefills the new tokens.

A request that arrives while nothing else is decoding runs *solo*: mlx-lm's
own ``generate_step``, which builds token n+1's graph while token n computes
(through moed.experts.decode, which keeps that overlap with lazy experts).
On a small model that pipelining is worth 10-20% over ``BatchGenerator``'s
step. When a second request arrives, the solo one joins the batch with its KV
cache (``Solo.join``), so continuous batching is unchanged: the newcomer waits
for at most one decode step. Models whose KV cache cannot be trimmed always
use ``BatchGenerator``.

Front -> engine: ``submit`` {seq, prompt|messages|token_ids, sampling fields},
``cancel`` {seq}, ``stats``, ``shutdown``.
Engine -> front: ``progress`` {stage, message, fraction}, ``ready`` {model},
``events`` {events: [{seq, text, token_ids, finish?, usage?}]}, ``failed``
{seq, code, message}, ``stats`` {...}, ``fatal`` {message}.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq

from moed_client import protocol as P

log = logging.getLogger("moed.engine")

STATS_INTERVAL_S = 1.0
HEARTBEAT_S = 0.5
# One message per token costs a few wakeups across three processes; at hundreds of tokens/s on a
# small machine that is ~8% of decode (bench.daemon_bench). Slower streams are never held (Outbox).
STREAM_INTERVAL_S = 0.02
PROMPT_CACHE_MODEL_KEY = "model"


# --------------------------------------------------------------------------
# Model loading: one function, so switching to moed.experts is one line.


def load_model(path: Path, *, capacity=None, memory_budget=None, approximate=False, prefetch=True):
    """(model, tokenizer, expert manager or None)."""
    try:
        from moed.experts import load_model as load_lazy
    except ImportError:
        load_lazy = None
    if load_lazy is not None:
        return load_lazy(path, capacity=capacity, memory_budget=memory_budget, approximate=approximate, prefetch=prefetch)
    if capacity is not None or memory_budget is not None or approximate:
        raise RuntimeError("lazy experts (--capacity/--memory-budget/--approximate) need moed.experts, which is not installed")
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    return model, tokenizer, None


def model_info(path: Path, model) -> dict:
    from moed.models import display_name, expert_count, read_config

    config = read_config(path)
    text_config = config.get("text_config", config)
    return {
        "name": display_name(path),
        "path": str(path),
        "model_type": config.get("model_type"),
        "num_experts": expert_count(config),
        "num_experts_per_tok": text_config.get("num_experts_per_tok"),
        "num_layers": text_config.get("num_hidden_layers"),
        "vocab_size": text_config.get("vocab_size"),
    }


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids as mlx_lm.stream_generate makes them: no second BOS if the prompt has one."""
    add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
    return list(tokenizer.encode(prompt, add_special_tokens=add_special))


# --------------------------------------------------------------------------
# Sampling


def make_request_sampler(sampling: dict):
    """A sampler for one request, or None for greedy.

    Greedy requests return None so BatchGenerator uses its one shared greedy
    sampler and samples the whole batch in one call. A request with a seed
    gets its own PRNG key, split once per step, so its random draws do not
    depend on other requests in the batch (the logits themselves can still
    differ in the last bits between batch shapes; see docs/protocol.md).
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

    temp = sampling["temperature"]
    if temp == 0:
        return None
    top_p, min_p, top_k, seed = sampling["top_p"], sampling["min_p"], sampling["top_k"], sampling.get("seed")
    if seed is None:
        return make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)

    # The same filter chain as make_sampler, drawing from this request's key.
    filters = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p, 1))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    key = [mx.random.key(seed)]

    def sampler(logprobs):
        for f in filters:
            logprobs = f(logprobs)
        key[0], draw = mx.random.split(key[0])
        return mx.random.categorical(logprobs * (1.0 / temp), key=draw)

    sampler.key = key  # moed.experts.decode puts it back when it rolls a token back
    return sampler


# --------------------------------------------------------------------------
# Stop strings


class StopText:
    """Streams text, holding back any tail that could start a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0

    def feed(self, segment: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was hit)."""
        self.text += segment
        if not self.stops:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, False
        longest = max(len(s) for s in self.stops)
        window_start = max(0, self.sent - longest + 1)
        hits = [i for i in (self.text.find(s, window_start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.sent : end] if end > self.sent else ""
            self.sent = len(self.text)
            return out, True
        safe = len(self.text) - self._held_tail()
        out = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def _held_tail(self) -> int:
        for n in range(min(len(self.text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


# --------------------------------------------------------------------------
# Engine state


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


@dataclass
class Solo:
    """The one request decoded outside ``BatchGenerator``, by ``generate_step``.

    ``generate_step`` feeds each token to the model before yielding it, so the
    KV cache always holds ``tokens`` (the prompt and every token yielded).
    """

    active: Active
    insert: dict  # BatchGenerator.insert arguments for this request, as submitted
    cache: list
    tokens: list
    steps: object = None  # the generate_step generator

    def start(self, model, manager, prefill_step: int) -> None:
        import mlx.core as mx

        from moed.experts.decode import generate

        (rest,) = self.insert["prompts"]
        self.steps = generate(mx.array(rest), model, manager, max_tokens=self.insert["max_tokens"][0],
                              sampler=self.insert["samplers"][0], prompt_cache=self.cache,
                              prefill_step_size=prefill_step)

    def next_token(self) -> int:
        token, _ = next(self.steps)
        self.tokens.append(token)
        return token

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()

    def join(self) -> dict:
        """BatchGenerator.insert arguments that continue this request in a batch.

        The last token yielded is in the cache already; trim it and feed it
        again, so the batch's first response is the token after it.
        """
        from mlx_lm.models.cache import trim_prompt_cache

        self.close()
        generated = self.active.completion_tokens
        if not generated:  # nothing computed yet: submit as it came
            return self.insert
        trim_prompt_cache(self.cache, 1)
        return dict(self.insert, prompts=[self.tokens[-1:]], caches=[self.cache], all_tokens=[self.tokens[:-1]],
                    max_tokens=[self.insert["max_tokens"][0] - generated])


class Engine:
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
        self.solo_steps = 0
        self.tokens_generated = 0

    @property
    def busy(self) -> bool:
        return bool(self.active) or self.solo is not None

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
        self.solo, self.active, self.by_seq = None, {}, {}
        self.gen.close()
        self.gen = self.new_batch()
        return seqs

    # -- requests ---------------------------------------------------------
    def tokenize(self, req: dict) -> list[int]:
        tok = self.tokenizer
        if req.get("token_ids") is not None:
            ids = list(req["token_ids"])
            if max(ids) >= self.model_vocab():
                raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, f"token id {max(ids)} is outside the vocabulary")
            return ids
        if req.get("messages") is not None:
            if not getattr(tok, "has_chat_template", False):
                raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, "this model has no chat template; send 'prompt' instead")
            return list(tok.apply_chat_template(req["messages"], add_generation_prompt=True))
        return encode_prompt(tok, req["prompt"])

    def model_vocab(self) -> int:
        return self.model.args.vocab_size if hasattr(self.model, "args") else 1 << 62

    def submit(self, req: dict) -> None:
        seq = req["seq"]
        tokens = self.tokenize(req)
        if not tokens:
            raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, "the prompt encodes to no tokens")
        if len(tokens) + req["max_tokens"] > self.max_context:
            raise P.ProtocolError(
                P.ErrorCode.LIMIT_EXCEEDED,
                f"prompt ({len(tokens)} tokens) + max_tokens ({req['max_tokens']}) exceeds the context limit {self.max_context}",
            )
        cache, rest = self.prompt_caches.fetch_nearest_cache(PROMPT_CACHE_MODEL_KEY, tokens)
        if cache is not None and not rest:
            # An exact hit: BatchGenerator needs one token to feed, so give back the last one.
            from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            else:
                cache, rest = None, tokens
        cached = len(tokens) - len(rest)
        insert = dict(
            prompts=[rest],
            max_tokens=[req["max_tokens"]],
            caches=[cache] if cache is not None else None,
            all_tokens=[tokens[:cached]],
            samplers=[make_request_sampler(req)],
            stop_sequences=[self.no_stop] if req.get("ignore_eos") else None,
        )
        active = Active(seq, 0, len(tokens), cached, self.tokenizer.detokenizer, StopText(req.get("stop") or []),
                        ignore_eos=bool(req.get("ignore_eos")), max_tokens=req["max_tokens"])
        if self.solo is not None:
            self._join_batch()
        if self.solo_allowed and not self.active:
            cache = cache if cache is not None else self.new_cache()
            self.solo = Solo(active, insert, cache, list(tokens))
            self.solo.start(self.model, self.manager, self.prefill_step)
        else:
            self._insert(active, insert)
        log.debug("seq %d: %d prompt tokens, %d from cache, %s", seq, len(tokens), cached, "solo" if self.solo else "batch")

    def _insert(self, a: Active, insert: dict) -> None:
        (a.uid,) = self.gen.insert(**insert)
        self.active[a.uid] = a
        self.by_seq[a.seq] = a.uid

    def _join_batch(self) -> None:
        solo, self.solo = self.solo, None
        self._insert(solo.active, solo.join())

    def cancel(self, seq: int) -> dict | None:
        if self.solo is not None and self.solo.active.seq == seq:
            a = self._end_solo()
        else:
            uid = self.by_seq.get(seq)
            if uid is None:
                return None
            self._remove(uid, keep_cache=True)
            a = self.active.pop(uid)
        a.pending_ids = []  # the last step's ids went out with its event already
        return self._final(a, "cancelled", "")

    def cancel_all(self) -> list[dict]:
        seqs = list(self.by_seq) + ([self.solo.active.seq] if self.solo is not None else [])
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

    def _final(self, a: Active, finish: str, text: str) -> dict:
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

    def step(self) -> list[dict]:
        """One decode step (solo, or of the whole batch); the events it produced."""
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

    def _step_solo(self) -> list[dict]:
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

    def _on_token(self, a: Active, token: int, finish: str | None, batch: int) -> tuple[dict, bool]:
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
        if finish is None:
            return {"seq": a.seq, "text": text, "token_ids": a.pending_ids}, False
        if not hit:
            text += a.stop.flush()
        return self._final(a, finish, text), stopped

    def stats(self) -> dict:
        import mlx.core as mx

        stats = {
            "active": len(self.active) + (self.solo is not None),
            "solo_steps": self.solo_steps,
            "tokens_generated": self.tokens_generated,
            "prompt_cache": {"entries": len(self.prompt_caches), "bytes": self.prompt_caches.nbytes},
            "mlx_active_bytes": mx.get_active_memory(),
            "mlx_peak_bytes": mx.get_peak_memory(),
            "experts": self.manager.stats() if self.manager is not None and hasattr(self.manager, "stats") else None,
        }
        return stats


# --------------------------------------------------------------------------
# Process main loop


class Channel:
    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(endpoint)

    def send(self, msg: dict) -> None:
        self.sock.send(P.pack(msg))

    def poll(self, timeout_ms: int) -> dict | None:
        if not self.sock.poll(timeout_ms):
            return None
        # The front is the only peer of this private 0600 socket, and it has
        # checked the client's frame against the protocol's limits already; a
        # submit it builds from a frame near MAX_MESSAGE_BYTES is a little
        # larger, and P.unpack's limits here would crash the engine on it.
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def close(self):
        self.sock.close()
        self.ctx.term()


def expert_read_failed(e: BaseException) -> bool:
    try:
        from moed.experts.store import StoreError
    except ImportError:
        return False
    return isinstance(e, StoreError)


class Outbox:
    """Token events on their way to the front.

    A request's first token and its final event go at once; later tokens wait
    up to ``interval`` seconds and go merged (text joined, ids appended). At
    hundreds of tokens/s that turns one message per token through the front
    and the client into one per few tokens, which on a small machine is CPU
    the engine gets back; a token is never held longer than ``interval``.
    """

    def __init__(self, channel: Channel, interval: float):
        self.channel, self.interval = channel, interval
        self.pending: dict[int, dict] = {}
        self.streaming: set[int] = set()  # requests whose first token went out
        self.urgent = False
        self.last_flush = 0.0

    def add(self, events: list[dict]) -> None:
        for ev in events:
            seq = ev["seq"]
            held = self.pending.get(seq)
            if held is None:
                self.pending[seq] = dict(ev, token_ids=list(ev["token_ids"]))
            else:
                final = {k: v for k, v in ev.items() if k not in ("text", "token_ids")}
                held.update(final, text=held["text"] + ev["text"], token_ids=held["token_ids"] + ev["token_ids"])
            if "finish" in ev or seq not in self.streaming:
                self.urgent = True

    def flush(self, now: float, force: bool = False) -> None:
        if not self.pending or not (force or self.urgent or now - self.last_flush >= self.interval):
            return
        events = list(self.pending.values())
        for ev in events:
            if "finish" in ev:
                self.streaming.discard(ev["seq"])
            elif ev["token_ids"]:
                self.streaming.add(ev["seq"])
        self.channel.send({"type": "events", "events": events, "t": time.monotonic()})
        self.pending, self.urgent, self.last_flush = {}, False, now


def serve(channel: Channel, engine: Engine, stream_interval: float) -> None:
    last_stats = 0.0
    front = os.getppid()
    outbox = Outbox(channel, stream_interval)
    while True:
        if os.getppid() != front:  # the front died without telling us (kill -9): nobody will read our output
            log.error("front process %d is gone; exiting", front)
            return
        timeout = 0 if engine.busy else int(STATS_INTERVAL_S * 1000)  # an idle engine has flushed everything
        events = []
        while (msg := channel.poll(timeout)) is not None:
            timeout = 0
            kind = msg["type"]
            if kind == "submit":
                try:
                    engine.submit(msg)
                except P.ProtocolError as e:
                    channel.send({"type": "failed", "seq": msg["seq"], "code": e.code, "message": e.message})
                except Exception as e:
                    log.exception("submit failed")
                    channel.send({"type": "failed", "seq": msg["seq"], "code": P.ErrorCode.ENGINE_ERROR, "message": f"{type(e).__name__}: {e}"})
            elif kind == "cancel":
                event = engine.cancel(msg["seq"])
                if event:
                    events.append(event)
            elif kind == "stats":
                last_stats = 0.0
            elif kind == "shutdown":
                outbox.add(events + engine.cancel_all())
                outbox.flush(time.monotonic(), force=True)
                return
        if engine.busy:
            try:
                events.extend(engine.step())
            except Exception as e:
                # A failed step leaves its requests' caches half-updated: they fail, the batch starts
                # afresh. An expert that could not be read leaves the model and the expert slots sound
                # (a failed read frees its slot), so the engine goes on; anything else may not have:
                # exit, and the front starts a new engine.
                log.exception("decode step failed")
                outbox.flush(time.monotonic(), force=True)
                for seq in engine.drop_all():
                    channel.send({"type": "failed", "seq": seq, "code": P.ErrorCode.ENGINE_ERROR, "message": f"{type(e).__name__}: {e}"})
                if not expert_read_failed(e):
                    raise
        outbox.add(events)
        now = time.monotonic()
        outbox.flush(now, force=not engine.busy)
        if now - last_stats >= STATS_INTERVAL_S:
            channel.send({"type": "stats", **engine.stats()})
            last_stats = now


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m moed.engine", description="moed engine process (started by `moed serve`)")
    p.add_argument("--channel", required=True, help="ZeroMQ endpoint of the front process")
    p.add_argument("--model", required=True, help="resolved model directory")
    p.add_argument("--capacity", type=int, default=None)
    p.add_argument("--memory-budget", type=int, default=None, help="bytes")
    p.add_argument("--approximate", action="store_true")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--no-solo", action="store_true", help="always decode through BatchGenerator, even a lone request")
    p.add_argument("--stream-interval", type=float, default=STREAM_INTERVAL_S,
                   help="seconds a token may wait to go out merged with the next ones (0: one message per token)")
    p.add_argument("--max-context", type=int, default=32768)
    p.add_argument("--prompt-cache-size", type=int, default=8)
    p.add_argument("--prompt-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--heartbeat-fd", type=int, default=None, help="pipe to write a heartbeat byte to every 0.5 s")
    return p.parse_args(argv)


def start_heartbeat(fd: int | None) -> None:
    """Beat on the front's pipe from a thread: a stopped or wedged process goes
    quiet, a long decode step does not (MLX releases the GIL while it computes)."""
    if fd is None:
        return

    def beat() -> None:
        while True:
            try:
                os.write(fd, b".")
            except OSError:  # the front is gone
                return
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def main(argv=None) -> int:
    args = parse_args(argv)
    from moed.logs import setup_logging

    setup_logging("engine", args.debug)
    start_heartbeat(args.heartbeat_fd)
    channel = Channel(args.channel)
    try:
        path = Path(args.model)
        channel.send({"type": "progress", "stage": "loading", "message": f"loading {path.name}", "fraction": 0.0})
        t0 = time.monotonic()
        try:
            model, tokenizer, manager = load_model(
                path, capacity=args.capacity, memory_budget=args.memory_budget, approximate=args.approximate, prefetch=not args.no_prefetch
            )
        except Exception as e:
            log.exception("cannot load %s", path)
            channel.send({"type": "fatal", "message": f"cannot load model {path}: {type(e).__name__}: {e}"})
            return 2
        engine = Engine(model, tokenizer, manager, args)
        info = model_info(path, model)
        log.info("model %s loaded in %.1f s (pid %d)", info["name"], time.monotonic() - t0, os.getpid())
        channel.send({"type": "ready", "model": info, "pid": os.getpid()})
        try:
            serve(channel, engine, args.stream_interval)
        finally:
            if manager is not None and hasattr(manager, "close"):
                manager.close()  # stops prefetching, saves the warm-start set
        return 0
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
