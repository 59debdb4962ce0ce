"""Fill-in-the-middle prompts: find a model's FIM tokens and build an infill prompt.

The front process never loads the tokenizer, so FIM support is read from the
tokenizer's JSON files: a convention applies when all of its marker strings are
*added tokens* (the ones a tokenizer maps to their single id when it meets them
in text), because the infill prompt is sent to the engine as text. A model
without such tokens gets a plain continuation of the prefix instead, and the
result says ``fim: false``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("moed.fim")


@dataclass(frozen=True)
class FimFormat:
    name: str
    markers: tuple[str, ...]  # every one must be an added token of the tokenizer
    template: str  # str.format template with {prefix} and {suffix}

    def prompt(self, prefix: str, suffix: str) -> str:
        return self.template.format(prefix=prefix, suffix=suffix)


# Known conventions, tried in order. PSM (prefix, suffix, middle) unless the
# model was trained otherwise (Codestral puts the suffix first).
CONVENTIONS = (
    FimFormat("qwen", ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"),
    FimFormat("starcoder", ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"),
    FimFormat("deepseek", ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"), "<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>"),
    FimFormat("codellama", ("<PRE>", "<SUF>", "<MID>"), "<PRE> {prefix} <SUF>{suffix} <MID>"),
    FimFormat("codestral", ("[SUFFIX]", "[PREFIX]"), "[SUFFIX]{suffix}[PREFIX]{prefix}"),
)

# Tokens that end a completed middle when the detokenizer renders them as text.
_END_MARKERS = ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<EOT>", "<｜end▁of▁sentence｜>")


@lru_cache(maxsize=8)
def added_tokens(model_dir: Path) -> frozenset[str]:
    """The added (special) token strings of the tokenizer in ``model_dir``."""
    found: set[str] = set()
    tok = _read_json(model_dir / "tokenizer.json")
    for entry in tok.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            found.add(entry["content"])
    config = _read_json(model_dir / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder") or {}
    if isinstance(decoder, dict):
        found.update(v["content"] for v in decoder.values() if isinstance(v, dict) and isinstance(v.get("content"), str))
    extra = config.get("additional_special_tokens") or []
    if isinstance(extra, list):
        found.update(t for t in extra if isinstance(t, str))
    return frozenset(found)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def detect(model_dir: Path | None) -> FimFormat | None:
    """The FIM convention the model's tokenizer supports, or None."""
    if model_dir is None:
        return None
    tokens = added_tokens(Path(model_dir))
    for fmt in CONVENTIONS:
        if all(m in tokens for m in fmt.markers):
            return fmt
    return None


def stop_strings(fmt: FimFormat | None, model_dir: Path | None) -> list[str]:
    """Marker texts that mean the middle is complete, should the engine render them."""
    if fmt is None or model_dir is None:
        return []
    tokens = added_tokens(Path(model_dir))
    return [m for m in fmt.markers + _END_MARKERS if m in tokens]


# Put inside a special token's text found in a buffer: invisible, and the tokenizer no longer matches it.
WORD_JOINER = "\u2060"


def defuse(text: str, special: frozenset[str]) -> str:
    """``text`` with every special-token string in it broken by a word joiner.

    The prompt reaches the engine as text, where a tokenizer maps each added
    token's string to its id. A buffer that merely contains ``<|fim_suffix|>``
    (this very module, a tokenizer config) would otherwise move the hole."""
    for tok in sorted(special, key=len, reverse=True):
        if len(tok) > 1 and tok in text:
            text = text.replace(tok, tok[0] + WORD_JOINER + tok[1:])
    return text


def build_prompt(fmt: FimFormat | None, prefix: str, suffix: str, context: list[str],
                 special: frozenset[str] = frozenset()) -> str:
    """The prompt text for an infill request.

    Extra context chunks (other files, snippets) go first in the prefix part,
    each ended by a newline: every FIM model has seen code before the cursor,
    while repo-level markers differ between families. Without FIM the model
    continues ``context + prefix`` and the suffix is not used. Editor text is
    literal: the ``special`` token strings in it are defused.
    """
    prefix, suffix = defuse(prefix, special), defuse(suffix, special)
    lead = "".join(c if c.endswith("\n") else c + "\n" for c in (defuse(c, special) for c in context))
    if fmt is None:
        return lead + prefix
    return fmt.prompt(lead + prefix, suffix)
