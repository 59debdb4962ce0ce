"""The front process never imports the engine, the experts or MLX: it must start, and
answer status, while the engine loads (and with no MLX installed at all)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["moed.front.main", "moed.front.server", "moed.front.__main__"])
def test_the_front_imports_no_engine_experts_or_mlx(module):
    code = f"""
import json, runpy, sys
if {module!r}.endswith("__main__"):
    sys.argv = ["moed", "--help"]
    try:
        runpy.run_module({module!r}, run_name="__main__")
    except SystemExit:
        pass
else:
    import importlib
    m = importlib.import_module({module!r})
    if hasattr(m, "build_parser"):
        m.build_parser().parse_args(["serve"])
banned = ("mlx", "mlx_lm", "moed.engine", "moed.experts")
print(json.dumps(sorted(k for k in sys.modules if k in banned or k.startswith(tuple(b + "." for b in banned)))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == []
