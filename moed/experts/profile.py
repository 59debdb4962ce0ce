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
