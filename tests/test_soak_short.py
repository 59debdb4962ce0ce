"""The short soak (bench/soak.py) in the default run: 16 clients on the ZeroMQ,
HTTP and editor doors, cancels and killed clients, and nothing lost. The full
run is ``python -m bench.soak``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.soak import run_soak  # noqa: E402


def test_short_soak_loses_nothing(daemon):
    d = daemon(None, "--http", "127.0.0.1:0")
    report = run_soak(d.socket, requests=128, clients=16, max_prompt=12, max_tokens=8, kill_every=25, seed=1,
                      final_timeout=20)
    summary = {k: report[k] for k in ("completed", "cancelled", "disconnected", "errored", "errors_by_code", "killed_clients", "lost", "by_door",
                                      "violation_examples", "length_mismatches", "fd_leak", "worker_crashes")}
    assert report["lost"] == 0, summary
    assert report["violations"] == 0, summary
    assert report["worker_crashes"] == 0, summary
    assert report["length_mismatches"] == [], summary
    # Every request ended, and the mix really happened.
    assert report["completed"] + report["cancelled"] + report["disconnected"] + report["errored"] + report["killed_clients"] == 128, summary
    assert set(report["by_door"]) == {"zmq", "http", "editor"} and all(d.get("done") for d in report["by_door"].values()), summary
    assert report["errored"] == 0, summary
    assert report["cancelled"] > 0 and report["killed_clients"] > 0, summary
    # Killed clients leave nothing behind: no requests, no sessions, no descriptors.
    end = report["daemon"]["end"]
    assert end["requests"] == {"active": 0, "queued": 0} and end["clients"] == 0, summary
    assert report["fd_leak"] == {"front": 0, "engine": 0}, summary
    assert end["engine_restarts"] == 0
    assert d.proc.poll() is None
