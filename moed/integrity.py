"""Integrity of a model's weights: a corrupted shard is an error naming file and tensor, never wrong tokens.

Two checks. Files in the Hugging Face cache are blobs named by their sha256 (for LFS files,
which every safetensors shard is), so ``check_hub_blobs`` compares each file with its name.
And a manifest, built once per model directory, holds an xxh3-128 hash of every piece that is
ever read on its own: each expert's slice of a stacked expert tensor, and every other tensor
whole. The engine verifies dense tensors at load and each expert as it is read from disk
(moed/experts/store.py ``Reader``), so a flipped byte fails the read that would have used it.

xxh3 over blake3: on these machines xxh3-128 hashed a hot 1 MiB buffer in 11 us (~90 GiB/s),
blake3 in 110 us (~9 GiB/s), sha256 in 625 us; an expert read itself takes 250 us warm.

The manifest is trusted from when it is built: building one also checks the hub blobs, so a
model downloaded by huggingface_hub is checked against its published hashes first.
It lives in the state dir, keyed by the model directory's real path, and never mixes with
another directory's. No MLX here: ``moectl verify`` runs this in the CLI's own process.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

MANIFEST_VERSION = 1
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20


class IntegrityError(Exception):
    """Bytes on disk that are not the model's; the message names the file and tensor."""


def digest(data) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True)
class Piece:
    """Bytes read on their own: a whole tensor, or one expert's slice of one (``label`` says which)."""

    file: Path
    key: str
    offset: int
    nbytes: int
    label: str = ""


def state_dir() -> Path:
    if os.environ.get("MOED_STATE_DIR"):
        return Path(os.environ["MOED_STATE_DIR"])
    import platformdirs

    return Path(platformdirs.user_state_dir("moed"))


def manifest_path(model_dir: Path) -> Path:
    real = os.path.realpath(model_dir)
    return state_dir() / "manifests" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")


def hub_blob_hash(path: Path) -> str | None:
    """The sha256 a Hugging Face cache blob is named by, when ``path`` is (a link to) one."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _SHA256_NAME.fullmatch(real.name):
        return real.name
    return None


def check_hub_blobs(files, progress=lambda path: None) -> int:
    """Compare each hub blob among ``files`` with the sha256 it is named by; how many were checked."""
    checked = 0
    for path in files:
        expected = hub_blob_hash(path)
        if expected is None:
            continue
        progress(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        if h.hexdigest() != expected:
            raise IntegrityError(f"{path}: sha256 {h.hexdigest()} differs from the Hugging Face blob's "
                                 f"name {expected}: the file is corrupted; download it again")
        checked += 1
    return checked


def _hash_pieces(pieces: list[Piece]):
    """(piece, its hash) for every piece, reading each file through one read-only map."""
    by_file: dict[Path, list[Piece]] = {}
    for p in pieces:
        by_file.setdefault(p.file, []).append(p)
    for path, group in by_file.items():
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for p in group:
                    yield p, digest(view[p.offset:p.offset + p.nbytes])
            finally:
                view.release()


class Manifest:
    """A model directory's piece hashes, by (file name, offset, length)."""

    def __init__(self, model_dir: Path, data: dict):
        self.model_dir = Path(model_dir)
        self.path = manifest_path(model_dir)
        self.sizes: dict[str, int] = data["files"]
        self.hashes = {(f, o, n): (key, label, h) for f, key, o, n, label, h in data["pieces"]}

    def covers(self, piece: Piece) -> bool:
        return (piece.file.name, piece.offset, piece.nbytes) in self.hashes

    def verify(self, file: Path, offset: int, nbytes: int, data) -> None:
        """Raise IntegrityError when ``data`` (read from ``file`` at ``offset``) is not what was hashed."""
        entry = self.hashes.get((file.name, offset, nbytes))
        if entry is None:
            return  # not a piece read on its own when the manifest was built; its tensor was checked whole
        key, label, expected = entry
        if digest(data) != expected:
            raise IntegrityError(f"{file}: tensor {key!r}{label} does not match its hash in {self.path}: "
                                 "the file is corrupted (or was changed after the manifest was built: "
                                 "`moectl verify MODEL --reset` forgets it)")

    def verify_pieces(self, pieces: list[Piece]) -> int:
        """Read and check ``pieces`` (at load: the dense tensors); how many bytes were checked."""
        self.check_sizes({p.file for p in pieces})
        total = 0
        for p, h in _hash_pieces([p for p in pieces if self.covers(p)]):
            key, label, expected = self.hashes[p.file.name, p.offset, p.nbytes]
            if h != expected:
                raise IntegrityError(f"{p.file}: tensor {key!r}{label} does not match its hash in {self.path}: "
                                     "the file is corrupted (or was changed after the manifest was built: "
                                     "`moectl verify MODEL --reset` forgets it)")
            total += p.nbytes
        return total

    def check_sizes(self, files) -> None:
        for path in files:
            want = self.sizes.get(Path(path).name)
            if want is not None and os.path.getsize(path) != want:
                raise IntegrityError(f"{path}: {os.path.getsize(path)} bytes, but {want} when its manifest "
                                     f"{self.path} was built: the file changed (`moectl verify MODEL --reset` forgets it)")

    def all_pieces(self) -> list[Piece]:
        return [Piece(self.model_dir / f, key, o, n, label) for (f, o, n), (key, label, _) in self.hashes.items()]


def load_manifest(model_dir: Path) -> Manifest | None:
    path = manifest_path(model_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e}); `moectl verify MODEL --reset` forgets it") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        return None  # another version's: built again
    return Manifest(model_dir, data)


def build_manifest(model_dir: Path, pieces: list[Piece]) -> Manifest:
    """Hash ``pieces`` once (hub blobs are checked against their names first) and save the manifest."""
    files = sorted({p.file for p in pieces})
    check_hub_blobs(files)
    data = {"version": MANIFEST_VERSION, "model_dir": os.path.realpath(model_dir),
            "files": {f.name: os.path.getsize(f) for f in files},
            "pieces": [[p.file.name, p.key, p.offset, p.nbytes, p.label, h] for p, h in _hash_pieces(pieces)]}
    path = manifest_path(model_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return Manifest(model_dir, data)


def ensure_manifest(model_dir: Path, pieces: list[Piece]) -> Manifest:
    """The model's manifest, built now if there is none or it lacks some of ``pieces``
    (a manifest built by a plain load has no per-expert pieces)."""
    manifest = load_manifest(model_dir)
    if manifest is not None and all(manifest.covers(p) for p in pieces):
        return manifest
    if manifest is not None:
        # Hash the new pieces only from bytes the old manifest still vouches for.
        manifest.verify_pieces([p for p in manifest.all_pieces() if p.file in {q.file for q in pieces}])
    return build_manifest(model_dir, pieces)
