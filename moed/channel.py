"""The front <-> engine channel: its messages, its transport, and the engine's settings.

The front (moed/front) starts the engine (moed/engine) as ``python -m moed.engine``
with ``EngineOptions.to_argv()`` and talks to it over a private ZeroMQ PAIR
socket. Each message is one msgpack map with a ``type`` key; ``encode`` and
``decode`` are the only places that convert between the dataclasses below and
those maps. This module imports no MLX: both processes use it.

Front -> engine: ``Submit``, ``Cancel``, ``SendStats``, ``Shutdown``.
Engine -> front: ``Progress``, ``Ready``, ``Events``, ``Failed``, ``Stats``, ``Fatal``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, TypedDict

import msgpack
import zmq

from moed_client import protocol as P

# --------------------------------------------------------------------------
# Engine settings


def _option(default, help: str, flag_kind: str = "value", kind: type | str = int):
    return field(default=default, metadata={"help": help, "flag": flag_kind, "kind": kind})


@dataclass(frozen=True)
class EngineOptions:
    """Every setting of the engine process, with its one default.

    ``moed serve`` takes them as flags (``EngineOptions.add_arguments``), passes
    them on with ``to_argv``, and the engine reads them back with ``parse``.
    """

    capacity: int | None = _option(None, "expert slots per layer")
    memory_budget: int | None = _option(None, "bytes for expert caches, e.g. 8G", kind="size")
    approximate: bool = _option(False, "allow approximate expert substitution", "switch")
    no_prefetch: bool = _option(False, "disable expert prefetching", "switch")
    max_batch: int = _option(8, "requests decoded together")
    prefill_step: int = _option(2048, "prompt tokens per prefill step (2048 as mlx_lm.generate: smaller steps let "
                                      "other streams decode sooner but change long-prompt numerics)")
    # 200, not 250: a stream's gap is a chunk plus a decode step plus jitter, and with 250 the p99 gap beside
    # 8k+28k-token prompts was 329 ms against the 310 ms bound (bench/results/prefill-gaps-28k-*-cpu.json)
    prefill_chunk_ms: float = _option(200.0, "target milliseconds per prefill chunk: a long prompt is fed in chunks "
                                             "of about this long, other streams decode between them (0: chunks of "
                                             "--prefill-step tokens)", kind=float)
    max_context: int = _option(32768, "largest prompt + max_tokens")
    # One message per token costs a few wakeups across three processes; at hundreds of tokens/s on a
    # small machine that is ~8% of decode (bench.daemon_bench). Slower streams are never held (Outbox).
    stream_interval: float = _option(0.02, "seconds a token may be held to go out with the next ones when tokens come "
                                           "faster than that (a request's first token and its end never wait; 0: one "
                                           "message per token)", kind=float)
    prompt_cache_size: int = _option(8, "recent prompt caches kept for prefix reuse")
    # 512 MiB, the figure `moed serve` always passed: the engine's own 1 GiB default only ever applied to
    # an engine started by hand, and on a small machine the expert caches need that memory more.
    prompt_cache_bytes: int = _option(512 << 20, "memory for those caches, e.g. 512M", kind="size")
    no_solo: bool = _option(False, "always decode through BatchGenerator, even a lone request", "switch")
    # mlx-lm's BatchGenerator has no quantized KV cache: with kv_bits every request decodes solo through
    # generate_step (its kv_bits, kv_group_size, quantized_kv_start), one at a time (max_batch 1).
    kv_bits: int | None = _option(None, "quantize the KV cache to 4 or 8 bits (mlx-lm's QuantizedKVCache); requests "
                                        "then decode one at a time")
    kv_group_size: int = _option(64, "group size of the quantized KV cache (mlx-lm's default)")
    quantized_kv_start: int = _option(5000, "tokens in the KV cache before it is quantized (mlx-lm's default: 5000)")
    debug: bool = _option(False, "verbose logs, including prompts", "switch")
    # The engine as one MLX distributed job split by layers (docs/distributed.md): the front starts it with
    # mlx.launch and talks to rank 0.
    ranks: int | None = _option(None, "run the engine as this many local ranks of an mlx.launch job, split by "
                                      "layers (for testing; --hosts for several machines)")
    hosts: str | None = _option(None, "run the engine as an mlx.launch job on these hosts (mlx.launch's JSON host "
                                      "file; the first host is this machine), split by layers", kind=str)

    @staticmethod
    def add_arguments(parser, size: Callable[[str], int] = int, unset: tuple[str, ...] = ()) -> None:
        """One flag per setting. ``size`` parses byte counts; the settings in ``unset``
        default to None, for a caller that fills them in itself (moed.config)."""
        for f in fields(EngineOptions):
            flag = "--" + f.name.replace("_", "-")
            help = f.metadata["help"]
            if f.metadata["flag"] == "switch":
                parser.add_argument(flag, action="store_true", help=help)
                continue
            kind = f.metadata["kind"]
            parser.add_argument(flag, type=size if kind == "size" else kind, help=help,
                                default=None if f.name in unset else f.default)

    @classmethod
    def from_args(cls, args) -> EngineOptions:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})

    def to_argv(self) -> list[str]:
        """The engine's flags for these settings (those at their default are left out)."""
        argv = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            argv += [flag] if f.metadata["flag"] == "switch" else [flag, str(value)]
        return argv

    @classmethod
    def parse(cls, argv=None) -> tuple[EngineOptions, argparse.Namespace]:
        """The engine's command line: (its settings, the rest: channel, model, heartbeat_fd, ...)."""
        p = argparse.ArgumentParser(prog="python -m moed.engine", description="moed engine process (started by `moed serve`)")
        p.add_argument("--channel", required=True, help="ZeroMQ endpoint of the front process")
        p.add_argument("--model", required=True, help="resolved model directory")
        p.add_argument("--heartbeat-fd", type=int, default=None, help="pipe to write a heartbeat byte to every 0.5 s")
        p.add_argument("--heartbeat-path", default=None, help="FIFO to write it to instead (a rank of an mlx.launch job)")
        p.add_argument("--front-pid", type=int, default=None, help="exit when this process is gone (default: the parent)")
        cls.add_arguments(p)
        args = p.parse_args(argv)
        return cls.from_args(args), args


ENGINE_DEFAULTS = EngineOptions()


# --------------------------------------------------------------------------
# Messages


class Event(TypedDict, total=False):
    """One request's news from one decode step (``Events.events``); the final one has ``finish`` and ``usage``."""

    seq: int
    text: str
    token_ids: list[int]
    finish: str  # "stop", "length", "cancelled" or "tool_calls"
    tool_calls: list[dict]  # calls completed at this step, each {id, name, arguments (JSON text)}
    stop_sequence: str  # the final event's: the stop string that ended the answer
    usage: dict  # prompt_tokens, completion_tokens, cached_tokens
    max_batch: int
    engine_decode_tok_s: float | None


@dataclass
class Submit:
    """Start decoding one admitted request; ``seq`` names it on the channel."""

    seq: int
    request: P.GenerateRequest

    def to_map(self) -> dict:
        return {"type": "submit", "seq": self.seq, **self.request.to_dict()}

    @classmethod
    def from_map(cls, m: dict) -> Submit:
        sampling = P.SamplingParams(**{f.name: m[f.name] for f in fields(P.SamplingParams) if f.name in m})
        request = P.GenerateRequest(id=m.get("id", str(m["seq"])), prompt=m.get("prompt"), messages=m.get("messages"),
                                    token_ids=m.get("token_ids"), sampling=sampling, tools=m.get("tools"),
                                    tool_choice=m.get("tool_choice") or "auto")
        return cls(m["seq"], request)


@dataclass
class Cancel:
    seq: int


@dataclass
class SendStats:
    """Send ``Stats`` now rather than at the next interval."""


@dataclass
class Shutdown:
    """Cancel everything, send the finals, exit."""


@dataclass
class Progress:
    stage: str
    message: str
    fraction: float | None = None


@dataclass
class Ready:
    model: dict  # name, path, model_type, num_experts, ...
    pid: int


@dataclass
class Events:
    events: list[Event]
    t: float | None = None  # time.monotonic() at send: system-wide, so the front can time the hop


@dataclass
class Failed:
    """One request failed in the engine; a protocol error code and message for its client."""

    seq: int
    code: str
    message: str


@dataclass
class Stats:
    """The engine's figures for ``status`` (active, prompt_cache, mlx_*_bytes, experts, ...)."""

    figures: dict

    def to_map(self) -> dict:
        return {"type": "stats", **self.figures}

    @classmethod
    def from_map(cls, m: dict) -> Stats:
        return cls({k: v for k, v in m.items() if k != "type"})


@dataclass
class Fatal:
    """The engine cannot go on (a model that does not load); the daemon exits with ``message``."""

    message: str


MESSAGES = {"submit": Submit, "cancel": Cancel, "stats_now": SendStats, "shutdown": Shutdown, "progress": Progress,
            "ready": Ready, "events": Events, "failed": Failed, "stats": Stats, "fatal": Fatal}
TYPE_OF = {cls: name for name, cls in MESSAGES.items()}
Message = Any  # one of MESSAGES' classes


def encode(msg: Message) -> bytes:
    to_map = getattr(msg, "to_map", None)
    return P.pack(to_map() if to_map else {"type": TYPE_OF[type(msg)], **asdict(msg)})


def decode(data: bytes) -> Message:
    # The only peer of this private 0600 socket is our own other process: trusted. A submit built
    # from a client frame near MAX_MESSAGE_BYTES is a little larger, and the engine's stats (the
    # expert manager's) may hold more containers than a client message may: no P.unpack limits.
    m = msgpack.unpackb(data, raw=False)
    cls = MESSAGES[m["type"]]
    if hasattr(cls, "from_map"):
        return cls.from_map(m)
    return cls(**{f.name: m[f.name] for f in fields(cls) if f.name in m})


# --------------------------------------------------------------------------
# Transport, the engine's end (the front binds its end: moed.front.supervisor)


class Channel:
    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(endpoint)

    def send(self, msg: Message) -> None:
        self.sock.send(encode(msg))

    def poll(self, timeout_ms: int) -> Message | None:
        if not self.sock.poll(timeout_ms):
            return None
        return decode(self.sock.recv())

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
