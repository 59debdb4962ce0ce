"""The editor door's own request fields, and the protocol v1 ``generate`` maps built from a call's params."""

from __future__ import annotations

import re
from pathlib import Path

from moed.doors import fim
from moed_client import protocol as P

MAX_CONTEXT_CHUNKS = 32
MAX_TIME_BUDGET_MS = 10 * 60 * 1000
MAX_BUFFER_KEY_LEN = 256
VIM_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_#]{0,63}")
# Keys that belong to this door, not to the protocol v1 generate map.
EDITOR_KEYS = ("stream", "callback", "buffer", "t_max_ms", "prefix", "suffix", "context", "id", "type")


def invalid(message: str) -> P.ProtocolError:
    return P.ProtocolError(P.ErrorCode.INVALID_REQUEST, message)


def callback(params: dict) -> str | None:
    name = params.get("callback")
    if name is None:
        return None
    if not isinstance(name, str) or not VIM_FUNCTION_NAME.fullmatch(name):
        raise invalid("'callback' must be the name of a global Vim function (letters, digits, '_' or '#')")
    return name


def time_budget(params: dict) -> float | None:
    value = params.get("t_max_ms")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= MAX_TIME_BUDGET_MS):
        raise invalid(f"'t_max_ms' must be a number of milliseconds in (0, {MAX_TIME_BUDGET_MS}]")
    return float(value) / 1000.0


def buffer_key(params: dict):
    key = params.get("buffer")
    if key is None:
        return None
    if isinstance(key, bool) or not isinstance(key, (int, str)) or (isinstance(key, str) and len(key) > MAX_BUFFER_KEY_LEN):
        raise invalid(f"'buffer' must be an integer or a string of at most {MAX_BUFFER_KEY_LEN} characters")
    return key


def _text(params: dict, name: str, default: str | None = None) -> str:
    value = params.get(name, default)
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string")
    return value


def _context(params: dict) -> list[str]:
    chunks = params.get("context")
    if chunks is None:
        return []
    if isinstance(chunks, str):
        chunks = [chunks]
    if not isinstance(chunks, list) or len(chunks) > MAX_CONTEXT_CHUNKS:
        raise invalid(f"'context' must be a list of at most {MAX_CONTEXT_CHUNKS} strings or {{text}} maps")
    out = []
    for c in chunks:
        if isinstance(c, dict):
            c = c.get("text")
        if not isinstance(c, str):
            raise invalid("each 'context' chunk must be a string or a map with a string 'text'")
        out.append(c)
    return out


def generate_map(params: dict, request_id: str) -> dict:
    """The protocol v1 generate map for an editor call's params."""
    msg = {k: v for k, v in params.items() if k not in EDITOR_KEYS}
    msg.update(type=P.GENERATE, id=request_id)
    return msg


def infill_map(params: dict, request_id: str, model_dir: Path | None) -> tuple[dict, dict]:
    """(protocol v1 generate map, extra result fields) for an ``infill`` call."""
    prefix, suffix, context = _text(params, "prefix"), _text(params, "suffix", ""), _context(params)
    if not (prefix or suffix or context):
        raise invalid("'prefix', 'suffix' and 'context' are all empty: nothing to fill in")
    for name in ("prompt", "messages", "token_ids"):
        if params.get(name) is not None:
            raise invalid(f"infill builds its own prompt from 'prefix' and 'suffix'; '{name}' is not allowed")
    fmt = fim.detect(model_dir)
    special = fim.added_tokens(Path(model_dir)) if model_dir is not None else frozenset()
    prompt = fim.build_prompt(fmt, prefix, suffix, context, special)
    if not prompt:
        raise invalid("without FIM tokens infill continues the prefix, and 'prefix' and 'context' are empty")
    msg = generate_map(params, request_id)
    msg["prompt"] = prompt
    stop = msg.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list):  # a malformed stop is left for the protocol's own validation to reject
        room = max(0, P.MAX_STOP_STRINGS - len(stop))
        msg["stop"] = stop + [s for s in fim.stop_strings(fmt, model_dir) if s not in stop][:room]
    extra = {"fim": fmt is not None}
    if fmt is not None:
        extra["fim_format"] = fmt.name
    return msg, extra
