"""Read single experts out of safetensors shards by byte offset.

A safetensors file is an 8-byte little-endian header length, a JSON header
mapping tensor names to dtype, shape and ``data_offsets``, then the raw data.
We parse the headers once and afterwards read one expert's bytes with
``os.preadv`` straight into a caller's buffer (a cache slot), so no shard is
ever loaded whole and no read goes through mmap page faults.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}


class StoreError(Exception):
    """A checkpoint that cannot be read as asked; the message names file and key."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    key: str
    dtype: str
    shape: tuple
    offset: int  # absolute byte offset of the tensor's data in ``file``
    nbytes: int


@dataclass(frozen=True)
class Extent:
    """Where one expert's slice of one tensor lives on disk."""

    file: Path
    key: str
    offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one shard's header, checking every tensor lies inside the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StoreError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise StoreError(f"{path}: corrupted safetensors header (length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise StoreError(f"{path}: cannot read safetensors header: {e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: corrupted safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: corrupted safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            start, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{path}: corrupted header entry for {key!r}") from None
        count = 1
        for d in shape:
            count *= d
        if dtype not in DTYPE_SIZES or end - start != count * DTYPE_SIZES[dtype] or start < 0:
            raise StoreError(f"{path}: corrupted header entry for {key!r} ({dtype} {shape} {start}:{end})")
        if base + end > size:
            raise StoreError(
                f"{path}: truncated shard: tensor {key!r} ends at byte {base + end} but the file has {size}"
            )
        out[key] = TensorInfo(path, key, dtype, shape, base + start, end - start)
    return out


class Checkpoint:
    """All tensors of a model directory, by key, with their shard and offsets."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        shards = sorted(self.dir.glob("model*.safetensors"))
        index_path = self.dir / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{index_path}: unreadable index: {e}") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.dir / name).is_file():
                    key = next(k for k, v in weight_map.items() if v == name)
                    raise StoreError(f"{index_path}: shard {name} (holding {key!r}) is missing")
            shards = [self.dir / name for name in files]
        elif len(shards) > 1:
            raise StoreError(f"{index_path} is missing; {len(shards)} shards need an index")
        elif not shards:
            raise StoreError(f"{self.dir}: no safetensors files and no {INDEX_NAME}")
        else:
            weight_map = None
        headers: dict[str, TensorInfo] = {}
        for shard in shards:
            headers.update(read_header(shard))
        if weight_map is None:
            self.tensors = headers
        else:  # the index is the table of contents: what it leaves out does not exist
            self.tensors = {}
            for key, name in weight_map.items():
                info = headers.get(key)
                if info is None or info.file.name != name:
                    raise StoreError(f"{index_path}: {key!r} is mapped to {name} but that shard does not hold it")
                self.tensors[key] = info
        self.index_path = index_path if weight_map is not None else None
        self.files = shards

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            where = self.index_path or self.dir
            raise StoreError(f"{where}: tensor {key!r} is not in the checkpoint") from None

    def resolve_prefix(self, module_path: str) -> str:
        """The on-disk key prefix standing for ``module_path``.

        Wrappers such as Kimi-K2.5 nest the text model (``language_model.``);
        we match on the part from ``layers.`` on and take the prefix the
        checkpoint actually uses.
        """
        i = module_path.find("layers.")
        if i < 0:
            return module_path
        tail = module_path[i:]
        for key in self.tensors:
            j = key.find(tail + ".")
            if j >= 0 and (j == 0 or key[j - 1] == "."):
                return key[:j] + tail
        return module_path


# Names experts' projections go by on disk (mixtral: w1 gate, w2 down, w3 up).
PROJ_ALIASES = {"gate_proj": ("gate_proj", "w1"), "up_proj": ("up_proj", "w3"), "down_proj": ("down_proj", "w2")}


def expert_extents(ckpt: Checkpoint, switch_path: str, proj: str, part: str, num_experts: int) -> list[Extent]:
    """Per-expert byte extents of ``{switch_path}.{proj}.{part}``.

    ``switch_path`` is the model's module path of the stacked expert module
    (``…mlp.switch_mlp`` or ``…mlp.experts``). On disk the tensor is either
    stacked under the same name or split per expert as
    ``{block}.experts.{e}.{proj or alias}.{part}``.
    """
    disk = ckpt.resolve_prefix(switch_path)
    stacked = f"{disk}.{proj}.{part}"
    if stacked in ckpt:
        info = ckpt.get(stacked)
        if not info.shape or info.shape[0] != num_experts:
            raise StoreError(f"{info.file}: {stacked!r} has shape {info.shape}, expected {num_experts} experts first")
        step = info.nbytes // num_experts
        return [Extent(info.file, stacked, info.offset + e * step, step) for e in range(num_experts)]
    block = disk.rsplit(".", 1)[0]
    for alias in PROJ_ALIASES.get(proj, (proj,)):
        pattern = f"{block}.experts.{{}}.{alias}.{part}"
        if pattern.format(0) in ckpt:
            out = []
            for e in range(num_experts):
                info = ckpt.get(pattern.format(e))
                out.append(Extent(info.file, info.key, info.offset, info.nbytes))
            return out
    raise StoreError(
        f"{ckpt.dir}: no tensor for experts {switch_path}.{proj}.{part} "
        f"(looked for {stacked!r} and {block}.experts.<e>.{'|'.join(PROJ_ALIASES.get(proj, (proj,)))}.{part})"
    )


class Reader:
    """Thread-safe positional reads into caller buffers, with open file handles kept."""

    def __init__(self, uncached: bool = False):
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.uncached = uncached  # drop pages after each read, so every load hits the disk (benchmarks)
        self.manifest = None  # moed.integrity.Manifest: each read is checked against its hash

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise StoreError(f"{path}: cannot open: {e}") from None
                self._fds[path] = fd
            return fd

    def read_into(self, extent: Extent, buf) -> float:
        """Fill ``buf`` (a writable buffer of ``extent.nbytes``) from disk.
        Returns the seconds spent reading."""
        view = memoryview(buf).cast("B")
        if view.nbytes != extent.nbytes:
            raise StoreError(f"{extent.file}: {extent.key!r}: buffer of {view.nbytes} bytes for {extent.nbytes}")
        fd = self._fd(extent.file)
        done = 0
        t0 = time.perf_counter()
        while done < extent.nbytes:
            try:
                n = os.preadv(fd, [view[done:]], extent.offset + done)
            except OSError as e:
                raise StoreError(f"{extent.file}: read error in {extent.key!r}: {e}") from None
            if n == 0:
                raise StoreError(
                    f"{extent.file}: truncated shard: {extent.key!r} needs bytes up to "
                    f"{extent.offset + extent.nbytes}, file ends at {os.fstat(fd).st_size}"
                )
            done += n
        elapsed = time.perf_counter() - t0
        if self.manifest is not None:
            self.manifest.verify(extent.file, extent.offset, extent.nbytes, view)
        if self.uncached:
            from moed.platform import evict_file_cache

            evict_file_cache(fd, extent.offset, extent.nbytes)
        return elapsed

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def layer_index(module_path: str) -> int | None:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", module_path)
    return int(m.group(1)) if m else None
