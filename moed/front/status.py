"""What ``status`` reports: the figures the front keeps (token rate, engine->front latency, RSS) and the map itself."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time

from moed_client import protocol as P

log = logging.getLogger("moed.daemon")

VERSION = "0.1.0"
TOK_RATE_WINDOW_S = 5.0
# Where reading a process's RSS runs `ps` (macOS), a thread refreshes the figures status shows this often.
RSS_REFRESH_S = 2.0


class Meters:
    """Figures taken as the daemon runs, for ``status``."""

    def __init__(self):
        self.tok_window: collections.deque = collections.deque()  # (monotonic time, tokens)
        self.engine_latency: collections.deque = collections.deque(maxlen=1024)  # seconds, engine send -> front receive
        self.rss_seen: dict[int, int | None] = {}  # pid -> RSS, from refresh_rss() where the probe blocks

    def tokens(self, now: float, n: int) -> None:
        self.tok_window.append((now, n))
        self.trim(now)  # here, not only in tok_rate(): a daemon nobody asks grew without bound

    def trim(self, now: float) -> None:
        while self.tok_window and now - self.tok_window[0][0] > TOK_RATE_WINDOW_S:
            self.tok_window.popleft()

    def tok_rate(self, now: float) -> float:
        self.trim(now)
        tokens = sum(n for _, n in self.tok_window)
        span = (now - self.tok_window[0][0]) if len(self.tok_window) > 1 else 0.0
        return tokens / span if span > 0 else 0.0

    def rss(self, pid: int) -> int | None:
        from moed import platform

        if platform.rss_probe_blocks():
            return self.rss_seen.get(pid)  # never a subprocess on the event loop: the last figure refresh_rss() took
        return rss_of(pid)

    async def refresh_rss(self, pids) -> None:
        """Where the RSS probe runs a program, take the RSS of ``pids()`` in a thread, now and then."""
        while True:
            now = pids()
            self.rss_seen = await asyncio.to_thread(lambda: {pid: rss_of(pid) for pid in now})
            await asyncio.sleep(RSS_REFRESH_S)


def report(daemon) -> dict:
    """The ``status`` map of a running Daemon (moed.front.server)."""
    sup, sessions, meters = daemon.supervisor, daemon.sessions, daemon.meters
    now = time.monotonic()
    engine_pid = sup.engine.pid if sup.engine else None
    front_rss = meters.rss(os.getpid())
    engine_rss = meters.rss(engine_pid) if engine_pid else None
    return {
        "state": sup.state,
        "pid": os.getpid(),
        "engine_pid": engine_pid,
        "uptime_s": now - daemon.started,
        "model": sup.model,
        "model_ready_at": sup.model_ready_at,
        "switch": daemon.keeper.report(),  # the last `load`: model, state (resolving/draining/loading/done/failed), error
        "keep_alive_s": daemon.keeper.keep_alive,
        "memory": {
            "rss_bytes": (front_rss + engine_rss) if front_rss is not None and engine_rss is not None else None,
            "front_rss_bytes": front_rss,
            "engine_rss_bytes": engine_rss,
            "mlx_active_bytes": sup.engine_stats.get("mlx_active_bytes"),
            "budget_bytes": daemon.args.memory_budget,
        },
        "requests": {"active": sessions.in_engine, "queued": len(sessions.queue)},
        "clients": len(sessions.by_client),
        "recent_tok_s": meters.tok_rate(now),
        "engine_to_front_us": percentiles_us(meters.engine_latency),
        "experts": sup.engine_stats.get("experts"),
        # an engine split over the ranks of a distributed job: each rank's host, layers, memory, hit rate, traffic
        "ranks": sup.engine_stats.get("ranks"),
        "prompt_cache": sup.engine_stats.get("prompt_cache"),
        "kv_cache": sup.engine_stats.get("kv_cache"),  # {bits, group_size, active_bytes} (moed serve --kv-bits)
        "prefill": sup.engine_stats.get("prefill"),  # the chunk clock: target, next chunk, calibration at start
        "editor_socket": str(daemon.editor.path) if daemon.editor else None,
        "http": daemon.http.url if daemon.http else None,
        "http_auth": daemon.http.auth if daemon.http else None,  # "token", or "none" under --http-no-auth
        "progress": sup.progress,
        "instance_id": daemon.instance_id,
        "version": VERSION,
        "protocol": list(P.PROTOCOL_VERSION),
        "engine_restarts": max(0, sup.engine_count - 1),
    }


def percentiles_us(samples) -> dict | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return {"p50": ordered[len(ordered) // 2] * 1e6, "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, "n": len(ordered)}


def rss_of(pid: int) -> int | None:
    """Resident memory of a process; None if the probe fails (status must answer regardless)."""
    from moed import platform

    try:
        return platform.process_rss_bytes(pid)
    except Exception as e:
        log.debug("rss probe failed: %r", e)
        return None
