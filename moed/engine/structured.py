"""Constrained decoding: an llguidance grammar as an mlx-lm logits processor.

Two things constrain a request: ``response_format`` (JSON, or JSON matching a
schema) and a forced tool call (``tool_choice`` "required" or a named tool),
which is the template's call markers around JSON naming one of the tools.
llguidance is an optional extra (``pip install moed[structured]``); without it
such a request gets ``invalid_request``, never silent ignoring.
"""

from __future__ import annotations

import json

from moed_client import protocol as P


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def _refuse(message: str) -> P.ProtocolError:
    return P.ProtocolError(P.ErrorCode.INVALID_REQUEST, message)


# JSON as ``json.dumps`` writes it: whitespace only after separators. A model free to add whitespace
# anywhere can spend its whole budget on it (a small model does).
COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def tool_call_schema(tools: list[dict], choice) -> dict:
    """The JSON of one call ``{"name": N, "arguments": {...}}`` of the tools ``choice`` allows."""
    allowed = [t["function"] for t in tools if choice in ("required", "auto") or t["function"]["name"] == choice["name"]]
    options = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for f in allowed]
    return {**(options[0] if len(options) == 1 else {"anyOf": options}), "x-guidance": COMPACT}


def grammar(request: P.GenerateRequest, tokenizer) -> str | None:
    """The request's llguidance grammar, or None when nothing constrains it."""
    fmt, choice = request.sampling.response_format, request.tool_choice
    forced = request.tools and choice not in ("auto", "none")
    if not fmt and not forced:
        return None
    if not available():
        what = "'response_format'" if fmt else f"'tool_choice' {json.dumps(choice)}"
        raise _refuse(f"{what} needs constrained decoding, which needs llguidance (pip install 'moed[structured]')")
    from llguidance import LLMatcher

    if forced:
        if fmt:
            raise _refuse("'response_format' and a forced 'tool_choice' cannot be combined")
        if getattr(tokenizer, "tool_call_start", None) != "<tool_call>" or getattr(tokenizer, "tool_call_end", None) != "</tool_call>":
            raise _refuse("forcing a tool call ('tool_choice' required or a named tool) works only for chat templates "
                          "that write JSON calls between <tool_call> and </tool_call>")
        call = json.dumps(tool_call_schema(request.tools, choice))
        return LLMatcher.grammar_from_lark(f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {call}')
    schema = fmt["schema"] if fmt["type"] == "json_schema" else {"type": "object"}
    return LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)


class Constrained:
    """A logits processor that masks every token the grammar does not allow next.

    mlx-lm calls a processor with all the tokens so far (the prompt, then each token
    sampled); the ones past the prompt are fed to the matcher. A shorter history than
    last time is a rollback (moed.experts.decode restarts after one), undone in the
    matcher too. Once the grammar is complete only end-of-sequence is allowed.
    """

    def __init__(self, ll_tokenizer, grammar_text: str, vocab_size: int):
        import numpy as np
        from llguidance import LLMatcher

        self.matcher = LLMatcher(ll_tokenizer, grammar_text, log_level=0)
        if self.matcher.is_error():
            raise _refuse(f"the grammar for this request is invalid: {self.matcher.get_error()[:300]}")
        self.vocab_size = vocab_size
        self.prompt_len: int | None = None
        self.fed = 0  # tokens past the prompt given to the matcher
        self.np = np

    def __call__(self, tokens, logits):
        import mlx.core as mx

        n = len(tokens)
        if self.prompt_len is None:
            self.prompt_len = n
        generated = n - self.prompt_len
        if generated < self.fed:
            self.matcher.rollback(self.fed - generated)
            self.fed = generated
        if generated > self.fed:
            self.matcher.consume_tokens(tokens[self.prompt_len + self.fed:].tolist())
            self.fed = generated
        words = self.np.frombuffer(self.matcher.compute_bitmask(), dtype=self.np.uint8)
        allowed = self.np.unpackbits(words, bitorder="little")[: logits.shape[-1]].astype(bool)
        if allowed.size < logits.shape[-1]:
            allowed = self.np.pad(allowed, (0, logits.shape[-1] - allowed.size))
        return mx.where(mx.array(allowed), logits, -mx.inf)


class Grammars:
    """The engine's llguidance tokenizer (built once, on first use: about a second) and per-request processors."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.ll_tokenizer = None

    def processor(self, request: P.GenerateRequest) -> Constrained | None:
        try:
            text = grammar(request, self.tokenizer)
        except ValueError as e:  # llguidance's refusal of a schema it cannot read
            raise _refuse(f"the schema cannot be compiled: {str(e)[:300]}") from None
        if text is None:
            return None
        if self.ll_tokenizer is None:
            import llguidance.hf

            hf = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
            self.ll_tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=sorted(self.tokenizer.eos_token_ids))
        return Constrained(self.ll_tokenizer, text, self.vocab_size)
