"""Log files: one per process in the platform log dir (or ``MOED_LOG_DIR``), for their owner only.

Both the front and the engine process log through here, so neither imports the other for it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import platformdirs


def log_dir() -> Path:
    override = os.environ.get("MOED_LOG_DIR")
    return Path(override) if override else Path(platformdirs.user_log_dir("moed", ensure_exists=False))


def setup_logging(name: str, debug: bool = False) -> Path:
    """Log to ``<log dir>/<name>.log`` and stderr; returns the file's path."""
    directory = log_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{name}.log"
    # Logs name models and paths, and with --debug hold prompts: for their owner only.
    path.touch(mode=0o600, exist_ok=True)
    os.chmod(path, 0o600)
    fmt = logging.Formatter(f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in (logging.FileHandler(path), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    return path
