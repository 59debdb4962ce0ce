"""The cheap check of a prompt's length, before anything tokenizes it.

Tokenizing a multi-MiB prompt costs the engine seconds; a prompt that cannot
fit the context is refused here instead, by bytes. No token of the model's
vocabulary stands for more than ``max_token_bytes`` bytes of text (the engine
measures it from the vocabulary at load and reports it with the model), so a
prompt of B bytes is at least B / max_token_bytes tokens. The engine still
counts the real tokens of whatever passes (moed/engine/batch.py).
"""

from __future__ import annotations

from moed_client import protocol as P


def fewest_tokens(req: P.GenerateRequest, max_token_bytes: int | None) -> int:
    """A lower bound on the tokens ``req``'s prompt encodes to (0 when the bytes per token are unknown)."""
    if req.token_ids is not None:
        return len(req.token_ids)
    if not max_token_bytes:
        return 0
    if req.prompt is not None:
        text = len(req.prompt.encode("utf-8", "surrogatepass"))
    else:
        text = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in req.messages)
    return -(-text // max_token_bytes)


def check_context(req: P.GenerateRequest, max_context: int, max_token_bytes: int | None) -> None:
    """Refuse, with ``context_length_exceeded``, a request whose prompt and max_tokens cannot fit the context."""
    fewest = fewest_tokens(req, max_token_bytes)
    if fewest + req.sampling.max_tokens > max_context:
        raise P.ProtocolError(
            P.ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"prompt (at least {fewest} tokens) + max_tokens ({req.sampling.max_tokens}) exceeds the context "
            f"limit {max_context}")
