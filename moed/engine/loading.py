"""Loading a model for the engine, describing it, and encoding prompts."""

from __future__ import annotations

from pathlib import Path


def load_model(path: Path, *, capacity=None, memory_budget=None, approximate=False, prefetch=True, split=None):
    """(model, tokenizer, expert manager or None); ``split`` keeps one rank's layers (moed/engine/pipeline.py)."""
    try:
        from moed.experts import load_model as load_lazy
    except ImportError:
        load_lazy = None
    if load_lazy is not None:
        # ranks share the warm-start file of this model and capacity: none of them saves its layers' part over it
        return load_lazy(path, capacity=capacity, memory_budget=memory_budget, approximate=approximate, prefetch=prefetch,
                         split=split, warm_start=split is None)
    if capacity is not None or memory_budget is not None or approximate or split is not None:
        raise RuntimeError("lazy experts (--capacity/--memory-budget/--approximate) and ranks need moed.experts, "
                           "which is not installed")
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    return model, tokenizer, None


def max_token_bytes(tokenizer) -> int | None:
    """The most UTF-8 bytes one vocabulary entry is spelled with: at least the bytes of text any token
    stands for (byte-level and SentencePiece spellings take more bytes than the text they stand for),
    so a prompt's bytes / this is a lower bound on its tokens (moed/front/prompt_bound.py)."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary map: the front skips the check by bytes
        return None
    return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=None) or None


def model_info(path: Path, model, tokenizer=None) -> dict:
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
        "max_token_bytes": max_token_bytes(tokenizer) if tokenizer is not None else None,
    }


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids as mlx_lm.stream_generate makes them: no second BOS if the prompt has one."""
    add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
    return list(tokenizer.encode(prompt, add_special_tokens=add_special))
