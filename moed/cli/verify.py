"""moectl verify: check a model's files against the Hugging Face cache's hashes and moed's manifest.

Runs in moectl's own process: moed/integrity.py reads and hashes, without MLX.
"""

from __future__ import annotations

import sys
import time

from moed import integrity, models
from moed.cli.common import CommandError
from moed.config import Config


def cmd_verify(args, cfg: Config) -> int:
    path = models.resolve_model(args.model if args.model is not None else cfg.model)
    manifest_file = integrity.manifest_path(path)
    if args.reset:
        manifest_file.unlink(missing_ok=True)
        print(f"forgot the manifest of {path}; moed builds it again at the model's next load")
        return 0
    t0 = time.perf_counter()
    files = sorted(p for p in path.iterdir() if p.is_file())
    try:
        blobs = integrity.check_hub_blobs(files, progress=lambda p: print(f"sha256 {p.name}", file=sys.stderr))
        manifest = integrity.load_manifest(path)
        checked = manifest.verify_pieces(manifest.all_pieces()) if manifest is not None else 0
    except integrity.IntegrityError as e:
        raise CommandError(str(e)) from None
    parts = [f"{blobs} file(s) match their Hugging Face sha256"] if blobs else []
    if manifest is None:
        parts.append("no manifest yet (moed builds one at the model's first load)")
    else:
        parts.append(f"{len(manifest.hashes)} tensors and experts ({checked / 1e6:.1f} MB) match {manifest_file}")
    print(f"{path}: ok: {'; '.join(parts)} ({time.perf_counter() - t0:.1f} s)")
    return 0
