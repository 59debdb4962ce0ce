"""Soak: many clients, cancels and client deaths against one daemon; nothing may be lost.

    python -m bench.soak --requests 10000 --clients 16 --out soak.json
    python -m bench.soak --socket /run/user/1000/moed/moed.sock ...   # an already running daemon

Each client is a worker process of its own, on one of the daemon's doors:
most speak raw protocol v1 on the ZeroMQ socket (not ``moed_client.Client``,
which hides late messages of a request it gave up on), a fifth each use the
HTTP gateway (``/v1/completions`` and ``/v1/chat/completions``, SSE and plain
JSON) and the editor socket (msgpack-rpc, streamed and plain) when the daemon
has them open. The driver checks the contract itself: every request ends with
exactly one final (``done``/``error``, an HTTP finish or error, a ``moed_done``
or response) and nothing follows it. Client ids collide on purpose (every
ZeroMQ worker numbers its requests from 0).

The mix, drawn from ``--seed``: prompts of 1..``--max-prompt`` words as text,
chat messages or token ids; streaming clients read every chunk as it comes,
"collect" clients read lazily (a slow consumer) or ask for a non-streamed
answer; a third of the requests are cancelled (before the first token or after
a few chunks; on HTTP, and for a non-streamed editor call, by hanging up);
about one request in ``--kill-every`` has its client SIGKILL itself mid-stream,
and the client is replaced.

Reported (JSON): completed / cancelled / disconnected / errored (by code) /
killed / lost, violations of the contract, client-side time to first token
p50/p99, and the front's and the engine's RSS and open file descriptors before
the run (after one request through each door), after warm-up and at the end.
Warm-up is the first ``--warmup`` requests (default a tenth): the driver then
waits until the daemon is idle before it samples and goes on, and it samples
the end the same way, so both figures are taken with nothing in flight; each
is sampled again 4 s later (``*_rested``: the daemon at rest, after it handed
freed heap pages back to the OS) and both growths are reported. The
``series`` (every 2 s: requests finished, front RSS and descriptors, engine
RSS) and the least-squares slope of the front's RSS after warm-up show whether
memory levels off or keeps growing.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.soak_clients import FINAL_TIMEOUT_S, editor_worker, http_worker, make_plan, worker

SERIES_EVERY_S = 2.0  # how often the driver records the daemon's memory and descriptors
# After the idle sample, another this much later: the daemon at rest (it returns freed heap pages
# to the OS once idle for 2 s, moed.front.sessions.IDLE_TRIM_S). Both are reported.
REST_S = 4.0





# --------------------------------------------------------------------------
# Driver


def proc_sample(pid: int | None) -> dict | None:
    import psutil

    if pid is None:
        return None
    try:
        p = psutil.Process(pid)
        return {"rss_bytes": p.memory_info().rss, "open_fds": p.num_fds()}
    except psutil.Error:
        return None


class Soak:
    def __init__(self, doors: dict[str, str], slot_doors: list[str], plan: list[dict], warmup: int, status_client,
                 final_timeout: float):
        self.doors = doors  # door -> its address (zmq endpoint, http base url, editor socket path)
        self.slot_doors = slot_doors
        clients = len(slot_doors)
        self.final_timeout = final_timeout
        self.clients = clients
        self.todo: queue.Queue = queue.Queue()
        self.plan = plan
        self.total = len(plan)
        self.warmup = min(warmup, len(plan))
        self.status_client = status_client
        self.results: list[dict] = []
        self.lock = threading.Lock()
        self.series: list[dict] = []  # (requests finished, memory and descriptors) every SERIES_EVERY_S
        self.warm_rested: dict | None = None
        self.end_rested: dict | None = None
        self.worker_deaths = 0
        self.workers_started = 0

    def sample(self) -> dict:
        status = self.status_client.status()
        return {"front": proc_sample(status.get("pid")), "engine": proc_sample(status.get("engine_pid")),
                "requests": status.get("requests"), "clients": status.get("clients"), "state": status.get("state"),
                "engine_restarts": status.get("engine_restarts")}

    def record(self, result: dict) -> None:
        with self.lock:
            self.results.append(result)

    def spawn(self, door: str) -> subprocess.Popen:
        with self.lock:
            self.workers_started += 1
        return subprocess.Popen([sys.executable, "-m", "bench.soak", "--worker", door, "--socket", self.doors[door],
                                 "--final-timeout", str(self.final_timeout)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                cwd=Path(__file__).resolve().parent.parent)

    def slot(self, door: str) -> None:
        """One client slot: a worker process fed one request at a time, replaced when it dies."""
        proc = None
        try:
            while True:
                try:
                    spec = self.todo.get_nowait()
                except queue.Empty:
                    return
                if proc is None:
                    proc = self.spawn(door)
                proc.stdin.write(json.dumps(spec) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if line:
                    self.record(json.loads(line) | {"door": door})
                    continue
                proc.wait()
                died_on_purpose = spec.get("die_after") is not None and proc.returncode == -signal.SIGKILL
                with self.lock:
                    self.worker_deaths += 1
                self.record({"n": spec["n"], "outcome": "killed" if died_on_purpose else "worker_crashed", "door": door,
                             "returncode": proc.returncode, "violations": [], "chunks": None, "ttft_s": None})
                proc = None
        finally:
            if proc is not None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def run(self, progress) -> dict:
        """Warm-up (the first ``warmup`` requests), a pause until the daemon is idle, the rest.

        The after-warm-up and end samples are both taken that way, with no request
        in flight, so the growth between them compares like with like (a sample
        taken under load would count transient per-request buffers as a baseline).
        """
        start_sample = self.sample()
        t0 = time.monotonic()
        self.phase(self.plan[:self.warmup], progress, t0)
        warm_sample = self.settled()
        time.sleep(REST_S)
        self.warm_rested = self.sample()
        self.phase(self.plan[self.warmup:], progress, t0)
        wall = time.monotonic() - t0
        end_sample = self.settled()
        time.sleep(REST_S)
        self.end_rested = self.sample()
        return self.report(start_sample, warm_sample, end_sample, wall)

    def phase(self, specs: list[dict], progress, t0: float) -> None:
        for spec in specs:
            self.todo.put(spec)
        threads = [threading.Thread(target=self.slot, args=(door,), daemon=True) for door in self.slot_doors]
        for t in threads:
            t.start()
        last = 0.0
        while any(t.is_alive() for t in threads):
            time.sleep(0.25)
            now = time.monotonic()
            if now - last >= SERIES_EVERY_S:
                last = now
                self.series.append(self.point(now - t0))
                progress(len(self.results), self.total)

    def point(self, t: float) -> dict:
        sample = self.sample()
        front = sample["front"] or {}
        return {"t_s": round(t, 2), "finished": len(self.results), "front_rss_bytes": front.get("rss_bytes"),
                "front_fds": front.get("open_fds"), "engine_rss_bytes": (sample["engine"] or {}).get("rss_bytes")}

    def settled(self) -> dict:
        """A sample once the daemon has finished what cancels and closed connections left (10 s at most)."""
        deadline = time.monotonic() + 10.0
        while True:
            sample = self.sample()
            busy = sample["requests"] and (sample["requests"].get("active") or sample["requests"].get("queued"))
            if not (busy or sample["clients"]) or time.monotonic() > deadline:
                return sample
            time.sleep(0.2)

    def report(self, start: dict, warm: dict, end: dict, wall: float) -> dict:
        res = sorted(self.results, key=lambda r: r["n"])
        outcome = lambda r: r["outcome"]  # noqa: E731
        done = [r for r in res if outcome(r) == "done"]
        errors: dict[str, int] = {}
        for r in res:
            if outcome(r) == "error":
                errors[r["code"]] = errors.get(r["code"], 0) + 1
        violations = [v for r in res for v in r.get("violations", [])]
        # A request that finished with 'length' must have streamed exactly max_tokens tokens.
        max_tokens = {s["n"]: s["max_tokens"] for s in self._plan_by_n.values()}
        short = [r["n"] for r in done if r.get("finish_reason") == "length" and r["tokens"] != max_tokens[r["n"]]]
        ttfts = sorted(r["ttft_s"] for r in res if r.get("ttft_s") is not None)

        def pct(q):
            return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None

        def growth(which, key, warm=warm, end=end):
            a, b = (warm.get(which) or {}).get(key), (end.get(which) or {}).get(key)
            return (b - a) / a if a and b is not None else None

        after = [p for p in self.series if p["finished"] >= self.warmup and p["front_rss_bytes"]]

        return {
            "requests": self.total,
            "clients": self.clients,
            "finished_records": len(res),
            "completed": sum(1 for r in done if r.get("finish_reason") in ("stop", "length")),
            "cancelled": sum(1 for r in done if r.get("finish_reason") == "cancelled"),
            "cancel_requested": sum(1 for s in self._plan_by_n.values() if "cancel_after" in s),
            "errored": sum(errors.values()),
            "errors_by_code": errors,
            "killed_clients": sum(1 for r in res if outcome(r) == "killed"),
            "disconnected": sum(1 for r in res if outcome(r) == "disconnected"),  # cancelled by hanging up (HTTP, editor)
            "by_door": {d: {o: sum(1 for r in res if r.get("door") == d and outcome(r) == o) for o in sorted({outcome(r) for r in res})}
                        for d in sorted(set(self.slot_doors))},
            "worker_crashes": sum(1 for r in res if outcome(r) == "worker_crashed"),
            "lost": sum(1 for r in res if outcome(r) == "lost") + (self.total - len(res)),
            "violations": len(violations),
            "violation_examples": violations[:10],
            "length_mismatches": short[:10],
            "tokens_streamed": sum(r["tokens"] for r in res if r.get("tokens")),
            "ttft_p50_s": pct(0.50),
            "ttft_p99_s": pct(0.99),
            "wall_s": wall,
            "requests_per_s": len(res) / wall if wall else None,
            "daemon": {"before": start, "after_warmup": warm, "end": end, "warmup_requests": self.warmup,
                       "front_rss_growth": growth("front", "rss_bytes"), "engine_rss_growth": growth("engine", "rss_bytes"),
                       "rested_s": REST_S, "after_warmup_rested": self.warm_rested, "end_rested": self.end_rested,
                       "front_rss_growth_rested": growth("front", "rss_bytes", self.warm_rested, self.end_rested),
                       # least-squares slope of the front's RSS over requests after warm-up: a leak shows as a steady slope
                       "front_rss_bytes_per_1k_requests": slope([(p["finished"], p["front_rss_bytes"]) for p in after], 1000)},
            "series": self.series,
            "fd_leak": {which: ((end.get(which) or {}).get("open_fds") or 0) - ((start.get(which) or {}).get("open_fds") or 0)
                        for which in ("front", "engine")},
            "workers_started": self.workers_started,
        }


def slope(points: list[tuple[float, float]], per: float = 1.0) -> float | None:
    """Least-squares slope of y over x, times ``per``; None with fewer than 3 points or one x."""
    if len(points) < 3:
        return None
    xs, ys = zip(*points)
    try:
        return statistics.linear_regression(xs, ys).slope * per
    except statistics.StatisticsError:  # every x the same
        return None


def warm_doors(doors: dict[str, str]) -> None:
    """One short request through each door, so the start sample of descriptors sees them all in use once."""
    for door, address in doors.items():
        spec = {"n": -1, "kind": "prompt", "words": 2, "max_tokens": 1, "mode": "collect", "seed": 1, "temperature": 0.0, "vocab": 2}
        proc = subprocess.run([sys.executable, "-m", "bench.soak", "--worker", door, "--socket", address, "--final-timeout", "60"],
                              input=json.dumps(spec) + "\n", capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parent.parent)
        result = json.loads(proc.stdout.splitlines()[-1]) if proc.stdout.strip() else {}
        if result.get("outcome") != "done":
            raise RuntimeError(f"warm-up request through the {door} door failed: {result or proc.stderr[-500:]}")


def assign_doors(clients: int, doors: dict[str, str]) -> list[str]:
    """Which door each client slot uses: a fifth each on HTTP and the editor socket when the
    daemon has them, the rest on ZeroMQ (or, without it, shared by the doors there are)."""
    if "zmq" not in doors:
        names = sorted(doors)
        return [names[i % len(names)] for i in range(clients)]
    slots = []
    for door in ("http", "editor"):
        if door in doors:
            slots += [door] * max(1, clients // 5)
    return ["zmq"] * (clients - len(slots)) + slots


def run_soak(socket: Path, *, requests: int, clients: int, seed: int = 0, max_prompt: int = 24, max_tokens: int = 24,
             kill_every: int = 200, warmup: int | None = None, final_timeout: float = FINAL_TIMEOUT_S,
             doors: tuple[str, ...] = ("zmq", "http", "editor"), progress=lambda done, total: None) -> dict:
    """Soak the daemon listening on ``socket`` through each of ``doors`` it has open; the JSON-able report."""
    from moed_client import Client

    with Client(socket, timeout=30) as c:
        vocab = (c.server.get("model") or {}).get("vocab_size") or 256
        status = c.status()
        open_doors = {"zmq": "ipc://" + str(socket), "http": status.get("http"), "editor": status.get("editor_socket")}
        open_doors = {d: a for d, a in open_doors.items() if a and d in doors}
        slot_doors = assign_doors(clients, open_doors)
        warm_doors(open_doors)  # the gateway opens its own daemon connection on first use: not a leak
        plan = make_plan(requests, seed, max_prompt, max_tokens, kill_every, vocab=vocab)
        soak = Soak(open_doors, slot_doors, plan, warmup if warmup is not None else max(clients, requests // 10), c, final_timeout)
        soak._plan_by_n = {s["n"]: s for s in plan}
        report = soak.run(progress)
    report["config"] = {"requests": requests, "clients": clients, "doors": {d: slot_doors.count(d) for d in open_doors},
                        "seed": seed, "max_prompt_words": max_prompt, "max_tokens": max_tokens, "kill_every": kill_every,
                        "vocab": vocab}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt", type=int, default=24, help="most words in a prompt")
    p.add_argument("--max-tokens", type=int, default=24, help="most tokens a request asks for")
    p.add_argument("--kill-every", type=int, default=200, help="about one request in N kills its client mid-stream (0: none)")
    p.add_argument("--socket", default=None, help="soak this running daemon instead of starting one")
    p.add_argument("--model", default=None, help="model for the daemon started here (default: the embedded model, else a tiny random one)")
    p.add_argument("--out", default=None, help="write the JSON report here (default: stdout)")
    p.add_argument("--final-timeout", type=float, default=FINAL_TIMEOUT_S, help="seconds without a message before a request counts as lost")
    p.add_argument("--doors", default="zmq,http,editor", help="doors to soak through, of those the daemon has open")
    p.add_argument("--warmup", type=int, default=None, help="requests before the after-warm-up sample (default: a tenth, at least --clients)")
    p.add_argument("--worker", choices=("zmq", "http", "editor"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        {"zmq": worker, "http": http_worker, "editor": editor_worker}[args.worker](args.socket, args.final_timeout)
        return 0

    def progress(done, total):
        print(f"\rsoak: {done}/{total} requests", end="", file=sys.stderr, flush=True)

    started = None
    try:
        if args.socket:
            socket = Path(args.socket)
        else:
            started, socket = start_daemon(args.model)
        report = run_soak(socket, requests=args.requests, clients=args.clients, seed=args.seed, max_prompt=args.max_prompt,
                          max_tokens=args.max_tokens, kill_every=args.kill_every, warmup=args.warmup,
                          final_timeout=args.final_timeout, doors=tuple(args.doors.split(",")), progress=progress)
    finally:
        print(file=sys.stderr)
        if started is not None:
            started.kill()
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0 if report["lost"] == 0 and report["violations"] == 0 and report["worker_crashes"] == 0 else 1


def start_daemon(model: str | None):
    """A daemon on a private runtime dir, launched as the test suite launches its own (bench/launch.py)."""
    from bench.launch import DaemonProcess, make_tiny_model, short_tmpdir

    from moed.models import embedded_model_path

    if model is None:
        embedded = embedded_model_path()
        if (embedded / "config.json").is_file():
            model = embedded
        else:
            model = make_tiny_model(short_tmpdir("moed-soak-model-") / "tiny")
    d = DaemonProcess(Path(model), ("--http", "127.0.0.1:0"))
    try:
        d.wait_ready(300)
    except BaseException:
        d.kill()
        raise
    return d, d.socket


if __name__ == "__main__":
    sys.exit(main())
