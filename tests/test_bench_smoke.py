"""`python -m bench --smoke` runs end to end: every section measured or saying why not, JSON and markdown written."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_end_to_end():
    out = Path(tempfile.mkdtemp(prefix="moed-bench-", dir="/tmp")) / "smoke.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("machine", "limits", "peers", "moed", "ratios"):
        assert key in result
    (label,) = result["peers"]
    # Physical limits were measured, not invented.
    assert result["limits"]["memcpy"]["host_copy_gb_s"] > 0
    assert result["limits"]["ipc"]["round_trip_us_p50"] > 0
    assert result["limits"]["disk"][label]["sequential"]["bytes"] > 0
    # Both peers ran.
    peers = result["peers"][label]
    assert peers["stock"]["decode_tok_s"] > 0, peers["stock"]
    assert [r["clients"] for r in peers["server"]["runs"]] == [1, 2], peers["server"]
    # moed: each section either measured or says why not; none failed.
    moed = result["moed"][label]
    for section in ("daemon", "daemon_residency", "experts"):
        assert "not_measured" not in moed[section], moed[section]
    assert [r["clients"] for r in moed["daemon"]["concurrency"]["runs"]] == [1, 2]
    assert [(r["residency"], r["prefetch"]) for r in moed["daemon_residency"]["runs"]] == [(0.5, True)]
    assert all("not_measured" not in r for r in moed["daemon_residency"]["runs"])
    from bench.report import expert_runs

    runs = expert_runs(moed["experts"]["models"][0])
    assert runs and all(r.get("exact") for r in runs), "lazy experts changed greedy output"
    ratio = result["ratios"][label]["daemon_vs_mlx_server_1_clients"]
    assert ratio["ratio"] == pytest.approx(ratio["moed"] / ratio["limit"])
    table = out.with_suffix(".md").read_text()
    assert "mlx_lm server (HTTP)" in table and "moed daemon, 50% experts resident, prefetch" in table
    assert table in proc.stdout
