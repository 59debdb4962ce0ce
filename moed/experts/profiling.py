"""Making an expert profile (``moectl profile``): route a prompt mix through the
model and count, per layer, which experts it uses (profile.py reads and applies it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .families import experts_per_layer
from . import load_model
from .profile import (PROFILE_VERSION, model_id, model_revision, profile_name, universal_experts,
                      user_profiles_dir)

PROMPT_MIX = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a mixture-of-experts language model is, in two sentences.",
    "def quicksort(xs):",
    "Translate to French: The weather is nice today.",
    "What is 17 times 23? Show your steps.",
    "Write a haiku about the sea.",
    "Summarize the plot of Romeo and Juliet.",
    "SELECT name, COUNT(*) FROM users GROUP BY",
    "Give three tips for writing clear documentation.",
    "fn main() { let v: Vec<i32> =",
    "The mitochondria is",
    "List the planets of the solar system in order.",
]



def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moed")
    except PackageNotFoundError:
        return "unknown"



def run_profile(model_path, prompts=None, out_path=None, progress=None, *, max_tokens: int = 32,
                capacity: int | None = None, memory_budget=None) -> dict:
    """Route ``prompts`` (default: a built-in mix of code, chat, maths and prose)
    through the model, count expert activations per layer, write the profile
    JSON to ``out_path`` (default: the user profile dir) and return it.

    ``progress(stage, message, fraction)`` is called as prompts complete.
    """
    import mlx_lm

    model_path = Path(model_path)
    prompts = list(prompts or PROMPT_MIX)
    say = progress or (lambda *a, **k: None)
    say("load", f"loading {model_id(model_path)}", 0.0)
    if capacity is None and memory_budget is None:
        probe, _ = mlx_lm.load(str(model_path), lazy=True)
        capacity = experts_per_layer(probe)
        del probe
    model, tokenizer, manager = load_model(model_path, capacity=capacity, memory_budget=memory_budget, prefetch=False)
    manager.collect = True
    layers = manager.caches
    presence = [np.zeros(c.num_experts, np.int64) for c in layers]
    tokens = 0
    try:
        for i, prompt in enumerate(prompts):
            before = [c.activations.copy() for c in layers]
            text = prompt
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            for _ in mlx_lm.stream_generate(model, tokenizer, text, max_tokens=max_tokens):
                tokens += 1
            for j, c in enumerate(layers):
                presence[j] += (c.activations - before[j]) > 0
            say("profile", f"prompt {i + 1}/{len(prompts)}", (i + 1) / len(prompts))
        result = {
            "kind": "moed-expert-profile",
            "version": PROFILE_VERSION,
            "tool": "moed",
            "tool_version": _tool_version(),
            "model_id": model_id(model_path),
            "revision": model_revision(model_path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prompt_mix": prompts,
            "max_tokens": max_tokens,
            "generated_tokens": tokens,
            "num_experts": layers[0].num_experts,
            "layers": [
                {"layer": c.layer, "counts": c.activations.tolist(), "prompts_using": presence[j].tolist(),
                 "universal": universal_experts(c.activations, presence[j], len(prompts))}
                for j, c in enumerate(layers)
            ],
        }
    finally:
        manager.close()
    out_path = Path(out_path) if out_path else user_profiles_dir() / profile_name(model_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out_path)
    say("done", f"wrote {out_path}", 1.0)
    return result


def main(argv=None) -> int:
    """``moectl profile`` runs this in a child process, so that moectl never imports MLX:
    progress goes to stdout as JSON lines, and the last line names the profile written."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m moed.experts.profiling", description="write an expert profile for a model")
    p.add_argument("model", help="the model's directory")
    p.add_argument("--prompts", help="one prompt per line (default: the built-in mix)")
    p.add_argument("--out", help="where to write it (default: the user profile dir)")
    p.add_argument("--capacity", type=int)
    p.add_argument("--memory-budget", type=int, help="bytes")
    args = p.parse_args(argv)
    prompts = [line for line in Path(args.prompts).read_text().splitlines() if line.strip()] if args.prompts else None
    out = Path(args.out) if args.out else user_profiles_dir() / profile_name(args.model)

    def say(stage, message, fraction=None):
        print(json.dumps({"stage": stage, "message": message, "fraction": fraction}), flush=True)

    run_profile(args.model, prompts, out, say, capacity=args.capacity, memory_budget=args.memory_budget)
    print(json.dumps({"out": str(out)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
