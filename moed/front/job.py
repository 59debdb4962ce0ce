"""The engine as one MLX distributed job (docs/distributed.md): its launch command, its hosts.

With ``--ranks N`` or ``--hosts FILE`` the supervisor starts ``mlx.launch`` instead of one
engine process; each rank runs ``python -m moed.engine`` on its slice of the layers and
rank 0 talks to the front. The launcher runs in a process group of its own, so the whole
job (launcher and local ranks) is killed at once and no rank outlives it. This module
reads the host file as JSON, in mlx.launch's format: the front never imports MLX.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path

LOCAL_HOST = "127.0.0.1"  # the name mlx.launch starts a rank on without ssh
SSH_TIMEOUT_S = 5
# mlx.launch's own entry point, run by the front's interpreter (the ranks get the same Python environment),
# with one fix: its relay threads select each rank's stdin pipe for writing, which is always writable, so
# each thread spins a core (measured: the launcher at 93% CPU with 2 idle ranks). moed never writes to the
# ranks' stdin: the launcher here selects for reading only.
LAUNCHER = ("import select, sys; import mlx._distributed_utils.launch as launch; "
            "launch.select = lambda r, w, x, t: select.select(r, [], x, t); sys.exit(launch.main())")


class JobError(Exception):
    """The job cannot start (a host file that does not parse, a host that cannot be reached)."""


def is_job(options) -> bool:
    return bool(options.hosts) or (options.ranks or 1) > 1


def read_hosts(path: str | Path) -> list[dict]:
    """The hosts of mlx.launch's host file: a list of ``{"ssh": name, "ips": [...]}``, or a map with
    ``hosts`` (and optionally ``backend``, ``envs``)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise JobError(f"host file {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise JobError(f"cannot read host file {path}: {e}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not all(isinstance(h, dict) and isinstance(h.get("ssh"), str) for h in hosts):
        raise JobError(f'host file {path}: expected a list of {{"ssh": HOST, "ips": [IP, ...]}} (mlx.launch\'s format)')
    if len(hosts) < 2:
        raise JobError(f"host file {path} names {len(hosts)} host(s): a distributed engine needs at least 2")
    return hosts


def is_this_machine(host: dict) -> bool:
    """Whether ``host`` is where the front runs: rank 0 must reach the front's private sockets."""
    names = [host["ssh"], *host.get("ips", [])]
    for name in names:
        if name in ("localhost", LOCAL_HOST):
            return True
        try:
            addr = ipaddress.ip_address(socket.gethostbyname(name))
        except (OSError, ValueError):
            continue
        if addr.is_loopback:
            return True
        try:
            with socket.socket() as s:  # an address of one of our own interfaces can be bound
                s.bind((str(addr), 0))
            return True
        except OSError:
            continue
    return False


def check_hosts(hosts: list[dict], path) -> None:
    """A clear error for a host the job cannot use, before mlx.launch waits on it forever."""
    if not is_this_machine(hosts[0]):
        raise JobError(f"host file {path}: the first host ({hosts[0]['ssh']}) must be this machine: "
                       "rank 0 talks to the daemon's local sockets")
    for host in hosts[1:]:
        if host["ssh"] == LOCAL_HOST:
            continue
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host["ssh"], "true"]
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=SSH_TIMEOUT_S * 3)
        except FileNotFoundError:
            raise JobError(f"cannot reach host {host['ssh']}: ssh is not installed") from None
        except subprocess.TimeoutExpired:
            raise JobError(f"cannot reach host {host['ssh']}: ssh did not answer in {SSH_TIMEOUT_S * 3} s") from None
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"ssh exited with code {r.returncode}"])[-1]
            raise JobError(f"cannot reach host {host['ssh']} over ssh (BatchMode: keys, no password): {why}")


def free_ports(n: int) -> int:
    """A first port of ``n`` consecutive free loopback ports, for the local ranks' ring."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((LOCAL_HOST, 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((LOCAL_HOST, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise JobError(f"no {n} consecutive free loopback ports for the ranks")


def launch_command(options, engine_argv: list[str]) -> list[str]:
    """``mlx.launch`` running ``python -m moed.engine ENGINE_ARGV`` on every rank."""
    cmd = [sys.executable, "-c", LAUNCHER, "--python", sys.executable]
    if options.hosts:
        path = Path(options.hosts).expanduser().resolve()
        check_hosts(read_hosts(path), path)
        cmd += ["--hostfile", str(path)]
    else:
        cmd += ["--hosts", LOCAL_HOST, "-n", str(options.ranks), "--backend", "ring",
                "--starting-port", str(free_ports(options.ranks))]
    return cmd + ["--", "-m", "moed.engine", *engine_argv]
