"""Expert profiles and warm-start state.

A **profile** (``moectl profile``) records which experts a prompt mix routes
to, per layer, with the model's id and revision. At load it pins the
universal experts (used by nearly every prompt, far above an even share),
fills the cache with the most active ones, and seeds the eviction scores and
the ``profile`` predictor. A profile of another model or revision is ignored
with a warning.

**Warm state** is the resident set at shutdown, keyed by model revision and
capacity; it is restored at the next start, and discarded when either differs.

The revision is a hub snapshot's commit, or a fingerprint of config.json,
the shards' headers and samples of their data (see ``model_revision``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("moed.experts.profile")

PROFILE_VERSION = 1
STATE_VERSION = 1
PROFILES_DIR = Path(__file__).parent.parent / "profiles"  # shipped profiles: moed/profiles (a link to the repo's profiles/ in a checkout)

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


def model_revision(model_dir) -> str:
    """What identifies these exact weights. A hub snapshot's directory is named
    by its commit; anything else gets a fingerprint of config.json, every
    shard's name, size and header, and 17 samples of 4 KiB spread over each
    shard's data (a retrained model keeps its shapes, so headers alone would
    not tell it apart; hashing hundreds of GB at each start would be too slow)."""
    model_dir = Path(model_dir)
    if model_dir.parent.name == "snapshots" and len(model_dir.name) >= 7:
        return model_dir.name
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(f"{shard.name}:{size}".encode())
        with open(shard, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(f.read(min(n, 100 << 20)))
            start = 8 + n
            for i in range(17):
                f.seek(start + (max(size - start - 4096, 0) * i) // 16)
                h.update(f.read(4096))
    return h.hexdigest()[:16]


def model_id(model_dir) -> str:
    from moed.models import display_name

    return display_name(Path(model_dir))


def profile_name(model_dir) -> str:
    return model_id(model_dir).replace("/", "--") + ".json"


def user_profiles_dir() -> Path:
    if os.environ.get("MOED_PROFILE_DIR"):
        return Path(os.environ["MOED_PROFILE_DIR"])
    import platformdirs

    return Path(platformdirs.user_data_dir("moed")) / "profiles"


def _state_dir() -> Path:
    if os.environ.get("MOED_STATE_DIR"):
        return Path(os.environ["MOED_STATE_DIR"])
    import platformdirs

    return Path(platformdirs.user_state_dir("moed")) / "warm"


def universal_experts(counts: np.ndarray, presence: np.ndarray, prompts: int) -> list[int]:
    """Experts nearly every prompt used (>= 90% of them) with at least twice an
    even share of the layer's activations."""
    if prompts == 0 or counts.sum() == 0:
        return []
    even = counts.sum() / len(counts)
    keep = (presence >= 0.9 * prompts) & (counts >= 2 * even)
    return [int(e) for e in np.argsort(-counts) if keep[e]]


# -- profiling ------------------------------------------------------------------

def run_profile(model_path, prompts=None, out_path=None, progress=None, *, max_tokens: int = 32,
                capacity: int | None = None, memory_budget=None) -> dict:
    """Route ``prompts`` (default: a built-in mix of code, chat, maths and prose)
    through the model, count expert activations per layer, write the profile
    JSON to ``out_path`` (default: the user profile dir) and return it.

    ``progress(stage, message, fraction)`` is called as prompts complete.
    """
    import mlx_lm

    from moed.experts import load_model

    model_path = Path(model_path)
    prompts = list(prompts or PROMPT_MIX)
    say = progress or (lambda *a, **k: None)
    say("load", f"loading {model_id(model_path)}", 0.0)
    if capacity is None and memory_budget is None:
        from .lazy import find_moe_sites

        probe, _ = mlx_lm.load(str(model_path), lazy=True)
        capacity = max(s.num_experts for s in find_moe_sites(probe))
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


# -- loading profiles -----------------------------------------------------------

def find_profile(model_path) -> Path | None:
    """The profile for this model: user dir first, then the shipped ones."""
    name = profile_name(model_path)
    for d in (user_profiles_dir(), PROFILES_DIR):
        if (d / name).is_file():
            return d / name
    return None


def read_profile(path, model_path) -> dict | None:
    """The profile at ``path`` if it is for this model and revision, else None (warned)."""
    try:
        prof = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring profile %s: unreadable (%s)", path, e)
        return None
    if not isinstance(prof, dict) or prof.get("kind") != "moed-expert-profile":
        log.warning("ignoring profile %s: not a moed expert profile", path)
        return None
    want_id, want_rev = model_id(model_path), model_revision(model_path)
    if prof.get("model_id") != want_id or prof.get("revision") != want_rev:
        log.warning("ignoring profile %s: it is for %s@%s, this model is %s@%s", path, prof.get("model_id"),
                    prof.get("revision"), want_id, want_rev)
        return None
    return prof


def apply_profile(manager, prof: dict) -> dict:
    """Pin universal experts (at most a quarter of each layer's slots), seed
    eviction scores and the profile predictor, fill free slots with the most
    active experts. Returns what was done."""
    by_layer = {entry["layer"]: entry for entry in prof.get("layers", [])}
    pinned = seeded = 0
    for position, cache in enumerate(manager.caches):
        entry = by_layer.get(cache.layer)
        if entry is None or len(entry.get("counts", ())) != cache.num_experts:
            continue
        counts = np.asarray(entry["counts"], np.float64)
        order = [int(e) for e in np.argsort(-counts, kind="stable") if counts[e] > 0]
        pins = [int(e) for e in entry.get("universal", [])][: cache.capacity // 4]
        if pins:
            cache.pin(pins)
            pinned += len(pins)
        if hasattr(cache.policy, "seed"):
            cache.policy.seed(counts / max(counts.max(), 1.0))
        if manager.prefetcher is not None:
            manager.prefetcher.prior[position] = set(order[: cache.capacity])
        free = cache.capacity - int((cache.slot_of >= 0).sum())
        fill = [e for e in order if cache.slot_of[e] < 0][:free]
        cache.ensure(fill)
        seeded += len(fill)
    return {"pinned": pinned, "seeded": seeded}


# -- warm start -----------------------------------------------------------------

def state_path(model_path, capacity: int) -> Path:
    """One file per model and capacity; the revision inside tells a stale one."""
    return _state_dir() / f"{profile_name(model_path)[:-5]}-c{capacity}.json"


def save_state(manager, model_path) -> Path | None:
    """Write the resident experts per layer (most valuable first)."""
    if not manager.caches:
        return None
    capacity = manager.caches[0].capacity
    path = state_path(model_path, capacity)
    layers = []
    for c in manager.caches:
        resident = c.resident()
        scores = c.policy.scores()[resident]
        layers.append({"layer": c.layer, "resident": [int(e) for e in resident[np.argsort(-scores, kind="stable")]]})
    data = {"kind": "moed-warm-state", "version": STATE_VERSION, "model_id": model_id(model_path),
            "revision": model_revision(model_path), "capacity": capacity, "saved": time.time(), "layers": layers}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path


def restore_state(manager, model_path) -> int:
    """Load the experts resident at the last shutdown; 0 when there is no
    matching state (stale state is deleted)."""
    if not manager.caches:
        return 0
    capacity = manager.caches[0].capacity
    path = state_path(model_path, capacity)
    if not path.is_file():
        return 0
    try:
        data = json.loads(path.read_text())
        ok = (data.get("kind") == "moed-warm-state" and data.get("revision") == model_revision(model_path)
              and data.get("capacity") == capacity)
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.warning("discarding stale warm-start state %s", path)
        path.unlink(missing_ok=True)
        return 0
    by_layer = {entry["layer"]: entry["resident"] for entry in data.get("layers", [])}
    loaded = 0
    for cache in manager.caches:
        want = [int(e) for e in by_layer.get(cache.layer, []) if 0 <= int(e) < cache.num_experts]
        free = cache.capacity - int((cache.slot_of >= 0).sum())
        fill = [e for e in want if cache.slot_of[e] < 0][:free]
        cache.ensure(fill)
        loaded += len(fill)
    return loaded


def main(argv=None) -> int:
    """``moectl profile`` runs this in a child process, so that moectl never imports MLX:
    progress goes to stdout as JSON lines, and the last line names the profile written."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m moed.experts.profile", description="write an expert profile for a model")
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
