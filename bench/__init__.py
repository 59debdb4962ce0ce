"""moed's benchmark suite: ``python -m bench`` (see bench/README.md)."""

import json
import sys
from pathlib import Path


def log(message: str) -> None:
    """Progress for a person, on stderr (stdout carries the JSON)."""
    print(message, file=sys.stderr, flush=True)


def emit(result: dict, out: Path | None) -> None:
    """Write a result as JSON to ``out``, or to stdout when no file is given."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).write_text(text)
    else:
        print(text)
