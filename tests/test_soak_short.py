"""The short soak (bench/soak.py) in the default run: 16 clients on the ZeroMQ,
HTTP and editor doors, cancels and killed clients, and nothing lost. The full
run is ``python -m bench.soak``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.soak import run_soak  # noqa: E402


@pytest.mark.parametrize("experts", [(), ("--capacity", "8")], ids=["resident", "lazy-25pct"])
def test_short_soak_loses_nothing(daemon, experts):
    """Lazy experts at a quarter of the slots add rollbacks of late-checked tokens to
    every solo request and a residency check to every batch step."""
    d = daemon(None, "--http", "127.0.0.1:0", *experts)
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
    if experts:  # the lazy paths really ran: late checks in solo stretches, and rollbacks of them
        with d.client(timeout=30) as c:
            stats = c.status()["experts"]
        assert stats["deferred_checks"] > 0 and stats["rollbacks"] > 0, stats
    assert d.proc.poll() is None
