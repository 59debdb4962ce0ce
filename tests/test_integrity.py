"""Integrity (issue 18 item 5): 1 MiB of random bytes in a shard is an error naming the file and
tensor, never tokens; hub blobs are checked against their sha256 names; `moectl verify`.
Manifests go to the session's private MOED_STATE_DIR (conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import families  # noqa: E402

from moed import integrity  # noqa: E402

PROMPT = "hello world, the quick brown fox"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return families.build("qwen3_moe", tmp_path_factory.mktemp("integrity") / "qwen3_moe")


@pytest.fixture
def model(built, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(built, dst)
    return dst


def tokens(path: Path, **kw) -> list[int]:
    import mlx_lm

    from moed.experts import load_model

    m, tok, manager = load_model(path, prefetch=False, **kw)
    try:
        return [r.token for r in mlx_lm.stream_generate(m, tok, PROMPT, max_tokens=8)]
    finally:
        if manager is not None:
            manager.close()


def tensor_span(path: Path, match) -> tuple[str, int, int]:
    """(key, absolute offset, nbytes) of the largest tensor in the shard whose key satisfies ``match``."""
    shard = path / "model.safetensors"
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    key, meta = max(((k, v) for k, v in header.items() if k != "__metadata__" and match(k)),
                    key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    start, end = meta["data_offsets"]
    return key, 8 + n + start, end - start


def scribble(path: Path, offset: int, nbytes: int = 1 << 20) -> None:
    """Random bytes over ``nbytes`` from ``offset`` (clipped to the file), as a failing disk would leave."""
    shard = path / "model.safetensors"
    nbytes = min(nbytes, shard.stat().st_size - offset)
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(nbytes))


@pytest.mark.parametrize("where", ["experts", "dense"])
@pytest.mark.parametrize("lazy", [True, False])
def test_random_bytes_in_a_shard_are_an_error_naming_file_and_tensor(model, where, lazy):
    kw = {"capacity": 2} if lazy else {}
    good = tokens(model, **kw)  # the first load builds the manifest
    assert good
    is_expert = (lambda k: "switch_mlp" in k) if where == "experts" else (lambda k: "switch_mlp" not in k and "layers." in k)
    key, offset, nbytes = tensor_span(model, is_expert)
    if where == "experts" and lazy:
        scribble(model, offset, min(1 << 20, nbytes))  # inside the stacked experts only: caught as they are read
    else:
        scribble(model, offset)  # 1 MiB from the start of that tensor on (the tensors after it too, if it is smaller)
    with pytest.raises(integrity.IntegrityError, match=r"model\.safetensors: tensor '[^']+'.* does not match") as e:
        tokens(model, **kw)
    if where == "experts" and lazy:
        assert "(expert " in str(e.value)  # the expert's own slice, caught as it was read


def test_hub_blobs_are_checked_against_their_sha256_names(tmp_path):
    data = os.urandom(4096)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    blob = blobs / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (snap / "model.safetensors").symlink_to(blob)
    (snap / "config.json").write_text("{}")  # not a blob: not checked
    assert integrity.check_hub_blobs(sorted(snap.iterdir())) == 1
    with open(blob, "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 16 if data[100:116] != b"\x00" * 16 else b"\x01" * 16)
    with pytest.raises(integrity.IntegrityError, match=r"model\.safetensors: sha256 .* differs"):
        integrity.check_hub_blobs(sorted(snap.iterdir()))


def test_a_manifest_built_by_a_plain_load_serves_a_lazy_one(model):
    plain = tokens(model)
    built = integrity.manifest_path(model).stat().st_mtime_ns
    assert tokens(model, capacity=2) == plain
    assert integrity.manifest_path(model).stat().st_mtime_ns == built  # it held every expert's slice already


def moectl(*args, env_state: str) -> subprocess.CompletedProcess:
    code = ("import sys, moed.cli\n"
            "rc = moed.cli.main(sys.argv[1:])\n"
            "assert 'mlx' not in sys.modules, 'moectl verify imported MLX'\n"
            "sys.exit(rc)\n")
    env = {**os.environ, "MOED_STATE_DIR": env_state}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_moectl_verify_finds_the_corruption_without_importing_mlx(model):
    state = os.environ["MOED_STATE_DIR"]
    first = moectl("verify", str(model), env_state=state)
    assert first.returncode == 0 and "no manifest yet" in first.stdout, first
    tokens(model, capacity=2)
    ok = moectl("verify", str(model), env_state=state)
    assert ok.returncode == 0 and "match" in ok.stdout, ok
    key, offset, _ = tensor_span(model, lambda k: "switch_mlp" in k)
    scribble(model, offset, 4096)
    bad = moectl("verify", str(model), env_state=state)
    assert bad.returncode == 1 and f"tensor {key!r}" in bad.stderr and "does not match" in bad.stderr, bad
    reset = moectl("verify", str(model), "--reset", env_state=state)
    assert reset.returncode == 0 and not integrity.manifest_path(model).exists()
