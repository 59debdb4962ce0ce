"""moed protocol v1: the one definition both the daemon and its clients import.

Every message is one msgpack map in one ZeroMQ frame (the ROUTER adds the
peer identity frame on the daemon side). Every map has ``type``; messages that
belong to a request carry the client's request ``id``. Unknown fields are
ignored so that minor versions can add them; unknown types get an error.
See docs/protocol.md for the prose version of this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

from moed_client.chat_fields import MAX_TOOLS, TOOL_CHOICES, message_fields, response_format_field, tools_fields  # noqa: F401 (protocol names)

PROTOCOL_VERSION = (1, 0)

# Limits on what a peer may send. The daemon sets ZeroMQ's MAXMSGSIZE to
# MAX_MESSAGE_BYTES so oversized frames never reach Python, and unpacks with
# per-container limits so a small frame cannot expand into a huge object.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_STRING_BYTES = MAX_MESSAGE_BYTES
MAX_ARRAY_LEN = 256 * 1024
MAX_MAP_LEN = 4096
MAX_DEPTH = 32
# Maps + arrays in one message: bounds the CPU and memory a 4 MiB frame of
# empty containers (~70x expansion) can cost before it is rejected.
MAX_CONTAINERS = 65536
MAX_REQUEST_ID_LEN = 128
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias (OpenAI allows 300)
MAX_STOP_STRING_LEN = 256

# Client -> daemon message types.
HELLO = "hello"
GENERATE = "generate"
CANCEL = "cancel"
STATUS = "status"
PING = "ping"
SHUTDOWN = "shutdown"
LOAD = "load"  # swap the served model: {model, drain}; answered with {type: load, accepted, model}
CLIENT_TYPES = frozenset({HELLO, GENERATE, CANCEL, STATUS, PING, SHUTDOWN, LOAD})

# Daemon -> client message types (``hello`` and ``status`` are also replies).
CHUNK = "chunk"
DONE = "done"
ERROR = "error"
PONG = "pong"
PROGRESS = "progress"
# Sent unasked to every client the daemon has heard from once another model is loaded: {model, previous}.
MODEL_CHANGED = "model_changed"

# "tool_calls": the answer ended after the model called tools (done's ``tool_calls``).
FINISH_REASONS = ("stop", "length", "cancelled", "error", "tool_calls")



class ErrorCode:
    """Stable error codes. Clients branch on these; never rename one."""

    BAD_MESSAGE = "bad_message"  # not msgpack, not a map, too large, too deep
    UNKNOWN_TYPE = "unknown_type"
    VERSION_MISMATCH = "version_mismatch"
    INVALID_REQUEST = "invalid_request"  # a field has a wrong type or value
    DUPLICATE_ID = "duplicate_id"  # this client already has a live request with that id
    UNKNOWN_REQUEST = "unknown_request"  # reserved; a cancel of an id that is not live is ignored, unanswered
    BUSY = "busy"  # the queue is full
    LIMIT_EXCEEDED = "limit_exceeded"  # prompt or max_tokens over the daemon's limits
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # prompt + max_tokens over the model's context
    ENGINE_RESTARTED = "engine_restarted"  # the engine died; the request is gone
    ENGINE_ERROR = "engine_error"  # the engine raised while serving this request
    SHUTTING_DOWN = "shutting_down"
    NOT_READY = "not_ready"  # the model is still loading
    MODEL_NOT_FOUND = "model_not_found"  # a request or load names a model this daemon does not serve or cannot find
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A message that cannot be accepted. ``code`` is an ErrorCode value."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------
# Encoding


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


# msgpack's own limits for untrusted input (unpack and the editor socket's stream decoder).
UNPACK_LIMITS = dict(
    max_str_len=MAX_STRING_BYTES,
    max_bin_len=MAX_STRING_BYTES,
    max_array_len=MAX_ARRAY_LEN,
    max_map_len=MAX_MAP_LEN,
    max_ext_len=0,
)


class ContainerBudget:
    """msgpack's list_hook/object_hook: refuses a message with more than MAX_CONTAINERS maps and arrays."""

    def __init__(self):
        self.count = 0

    def __call__(self, container):
        self.count += 1
        if self.count > MAX_CONTAINERS:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"message holds more than {MAX_CONTAINERS} maps and arrays")
        return container


def check_depth(obj: Any) -> None:
    if _depth(obj) > MAX_DEPTH:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"message nests deeper than {MAX_DEPTH}")


def unpack(data: bytes) -> dict:
    """Decode one untrusted frame into a message map, or raise ProtocolError."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    budget = ContainerBudget()
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, list_hook=budget, object_hook=budget, **UNPACK_LIMITS)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises ValueError, StackError, TypeError... on hostile input
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"not a valid msgpack message: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"message must be a map, got {type(obj).__name__}")
    check_depth(obj)
    mtype = obj.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message has no string 'type' field")
    return obj


def salvage_id(data: bytes) -> str | None:
    """The request id of a frame ``unpack`` refused, when its top-level map has a usable one.

    The other values are skipped, not built, so an array over MAX_ARRAY_LEN costs one
    C-speed scan; this lets the sender's request fail at once instead of at its timeout."""
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES, **UNPACK_LIMITS)
        unpacker.feed(data[:MAX_MESSAGE_BYTES])
        for _ in range(min(unpacker.read_map_header(), MAX_MAP_LEN)):
            if unpacker.unpack() == "id":
                return request_id({"id": unpacker.unpack()})
            unpacker.skip()
    except Exception:  # anything msgpack or request_id refuses: no id to give
        return None
    return None


def _depth(obj: Any) -> int:
    # Iterative, so a hostile message cannot blow the Python stack; only
    # containers are pushed, so a long flat array costs one C-speed scan.
    if type(obj) is not dict and type(obj) is not list:
        return 1  # a scalar: nothing nests in it
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        item, d = stack.pop()
        values = item.values() if isinstance(item, dict) else item
        if values:
            deepest = max(deepest, d + 1)  # its elements sit one level down
        else:
            deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((v, d + 1) for v in [v for v in values if type(v) is dict or type(v) is list])
    return deepest


# --------------------------------------------------------------------------
# Message constructors (one place that knows each message's fields)


def hello(client_name: str = "moed-client") -> dict:
    return {"type": HELLO, "version": list(PROTOCOL_VERSION), "client": client_name}


def hello_reply(instance_id: str, model: dict, ready: bool) -> dict:
    return {"type": HELLO, "version": list(PROTOCOL_VERSION), "instance_id": instance_id, "model": model, "ready": ready}


def chunk(request_id: str, text: str, token_ids: list[int], tool_calls: list[dict] | None = None) -> dict:
    """``tool_calls``: the calls completed in this chunk, each {id, name, arguments (a JSON string)}."""
    msg = {"type": CHUNK, "id": request_id, "text": text, "token_ids": token_ids}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def done(request_id: str, finish_reason: str, usage: dict, timings: dict, *, tool_calls: list[dict] | None = None,
         stop_sequence: str | None = None) -> dict:
    """``tool_calls``: every call of the answer (as in the chunks); ``stop_sequence``: the stop string that ended it."""
    assert finish_reason in FINISH_REASONS, finish_reason
    msg = {"type": DONE, "id": request_id, "finish_reason": finish_reason, "usage": usage, "timings": timings}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    if stop_sequence is not None:
        msg["stop_sequence"] = stop_sequence
    return msg


def error(code: str, message: str, request_id: str | None = None) -> dict:
    msg = {"type": ERROR, "code": code, "message": message}
    if request_id is not None:
        msg["id"] = request_id
    return msg


def progress(stage: str, message: str, fraction: float | None = None) -> dict:
    return {"type": PROGRESS, "stage": stage, "message": message, "fraction": fraction}


def check_version(msg: dict) -> None:
    """Raise VERSION_MISMATCH unless the peer speaks our major version."""
    version = msg.get("version")
    if not (isinstance(version, (list, tuple)) and len(version) >= 1 and isinstance(version[0], int)):
        raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"hello carries no valid version (got {version!r}); this daemon speaks {PROTOCOL_VERSION[0]}.x")
    if version[0] != PROTOCOL_VERSION[0]:
        raise ProtocolError(
            ErrorCode.VERSION_MISMATCH,
            f"protocol major version {version[0]} is not supported; this side speaks {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}",
        )


# --------------------------------------------------------------------------
# Validation of a generate request


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate max_tokens tokens even past EOS (benchmarks, tests)
    # Logits processors (mlx-lm's make_logits_processors), each over the last PENALTY_CONTEXT tokens.
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: list = field(default_factory=list)  # [[token_id, bias], ...]
    # Constrained decoding (moed/engine/structured.py): None, {"type": "json_object"} or {"type": "json_schema", "schema": {...}}
    response_format: dict | None = None


@dataclass
class GenerateRequest:
    id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    token_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Tools offered to the chat template (OpenAI's [{"type": "function", "function": {name, description, parameters}}]).
    tools: list[dict] | None = None
    tool_choice: str | dict = "auto"  # TOOL_CHOICES or {"name": NAME}

    def to_dict(self) -> dict:
        d = {"id": self.id, "prompt": self.prompt, "messages": self.messages, "token_ids": self.token_ids,
             "tools": self.tools, "tool_choice": self.tool_choice}
        d.update(self.sampling.__dict__)
        return d


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message)


def _number(msg: dict, name: str, default, kind, lo=None, hi=None):
    value = msg.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"'{name}' must be a number, got {type(value).__name__}")
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise _invalid(f"'{name}' must be an integer")
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise _invalid(f"'{name}' must be finite")
    if lo is not None and value < lo:
        raise _invalid(f"'{name}' must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise _invalid(f"'{name}' must be <= {hi}, got {value}")
    return value


def flag(msg: dict, name: str) -> bool:
    """An optional boolean field: absent or null is False; any other non-boolean is invalid."""
    value = msg.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"'{name}' must be true or false, got {type(value).__name__}")
    return value


def request_id(msg: dict) -> str:
    rid = msg.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID_LEN:
        raise _invalid(f"'id' must be a non-empty string of at most {MAX_REQUEST_ID_LEN} characters")
    return rid


def _logit_bias(msg: dict) -> list:
    """``logit_bias``: [[token_id, bias], ...] (a map would need integer keys, which msgpack maps here refuse)."""
    pairs = msg.get("logit_bias")
    if pairs is None:
        return []
    if not isinstance(pairs, list) or len(pairs) > MAX_LOGIT_BIAS:
        raise _invalid(f"'logit_bias' must be a list of at most {MAX_LOGIT_BIAS} [token_id, bias] pairs")
    out = []
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and not isinstance(pair[0], bool) and pair[0] >= 0
                and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) and -100 <= pair[1] <= 100):
            raise _invalid("each 'logit_bias' entry must be [token_id >= 0, bias in -100..100]")
        out.append([pair[0], float(pair[1])])
    return out


def _chat(check, value):
    """A chat_fields check, its ValueError as invalid_request."""
    try:
        return check(value)
    except ValueError as e:
        raise _invalid(str(e)) from None


def parse_generate(msg: dict, max_tokens_limit: int = 1 << 20) -> GenerateRequest:
    """Validate a ``generate`` map. Unknown fields are ignored by design."""
    rid = request_id(msg)
    prompt, messages, token_ids = msg.get("prompt"), msg.get("messages"), msg.get("token_ids")
    given = [x is not None for x in (prompt, messages, token_ids)]
    if sum(given) != 1:
        raise _invalid("exactly one of 'prompt', 'messages' or 'token_ids' is required")
    if prompt is not None and not isinstance(prompt, str):
        raise _invalid("'prompt' must be a string")
    if prompt is not None and not prompt:
        raise _invalid("'prompt' must not be empty")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise _invalid("'messages' must be a non-empty list of {role, content} maps")
        messages = [_chat(message_fields, m) for m in messages]
    if token_ids is not None:
        if not isinstance(token_ids, list) or not token_ids:
            raise _invalid("'token_ids' must be a non-empty list of integers")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids):
            raise _invalid("'token_ids' must hold non-negative integers")
    stop = msg.get("stop")
    if stop is None or stop == "":
        stop = []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
        raise _invalid(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings")
    if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_LEN for s in stop):
        raise _invalid(f"each stop string must be 1..{MAX_STOP_STRING_LEN} characters")
    seed = msg.get("seed")
    if seed is not None:
        seed = _number(msg, "seed", None, int, 0, 2**63 - 1)
    sampling = SamplingParams(
        max_tokens=_number(msg, "max_tokens", 256, int, 1),
        temperature=_number(msg, "temperature", 0.0, float, 0.0, 100.0),
        top_p=_number(msg, "top_p", 1.0, float, 0.0, 1.0),
        top_k=_number(msg, "top_k", 0, int, 0, 1 << 20),
        min_p=_number(msg, "min_p", 0.0, float, 0.0, 1.0),
        seed=seed,
        stop=list(stop),
        ignore_eos=flag(msg, "ignore_eos"),
        repetition_penalty=_number(msg, "repetition_penalty", 1.0, float, 0.01, 10.0),
        presence_penalty=_number(msg, "presence_penalty", 0.0, float, -2.0, 2.0),
        frequency_penalty=_number(msg, "frequency_penalty", 0.0, float, -2.0, 2.0),
        logit_bias=_logit_bias(msg),
        response_format=_chat(response_format_field, msg),
    )
    if sampling.max_tokens > max_tokens_limit:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"max_tokens {sampling.max_tokens} exceeds {max_tokens_limit}")
    tools, tool_choice = _chat(tools_fields, msg)
    if tools and messages is None:
        raise _invalid("'tools' need 'messages' (the chat template offers them to the model)")
    return GenerateRequest(id=rid, prompt=prompt, messages=messages, token_ids=token_ids, sampling=sampling, tools=tools, tool_choice=tool_choice)
