"""The ``moed serve`` command line: its flags, the settings they share with moectl, and the daemon's start."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from moed_client import paths

from moed.channel import EngineOptions
from moed.logs import LogDirError, setup_logging

log = logging.getLogger("moed.daemon")

GRACEFUL_SHUTDOWN_S = 30.0
# Left unset by the parser: moed.config fills them from config.toml, the environment, or its own defaults.
FROM_CONFIG = ("capacity", "memory_budget")


def parse_size(text: str) -> int:
    from moed import config

    try:
        return config.parse_size(text)
    except config.ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def apply_config(args) -> None:
    """Settings shared with moectl come from config.toml < MOED_* environment < these flags."""
    from moed import config

    flags = {
        "model": args.model, "memory_budget": args.memory_budget, "capacity": args.capacity,
        "approximate": True if args.approximate else None, "prefetch": False if args.no_prefetch else None,
        "socket": args.socket, "tcp": args.tcp, "http": getattr(args, "http", None), "max_clients": args.max_clients,
    }
    cfg = config.load(flags)
    args.model, args.memory_budget, args.capacity = cfg.model, cfg.memory_budget, cfg.capacity
    args.approximate, args.no_prefetch = cfg.approximate, not cfg.prefetch
    args.socket, args.tcp, args.max_clients = cfg.socket, cfg.tcp, cfg.max_clients
    if hasattr(args, "http"):
        args.http = cfg.http
    if cfg.log_dir:
        os.environ["MOED_LOG_DIR"] = str(Path(cfg.log_dir).expanduser())  # the engine reads it too


def build_parser() -> argparse.ArgumentParser:
    from moed.front.supervisor import ENGINE_STALL_TIMEOUT_S

    p = argparse.ArgumentParser(prog="moed", description="moed: one warm Mixture-of-Experts model, shared by many clients")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--model", default=None, help="model directory or Hugging Face repo id (default: the embedded model)")
    s.add_argument("--socket", default=None, help="socket path (default: moed.sock in the runtime dir)")
    s.add_argument("--tcp", default=None, metavar="127.0.0.1:PORT", help="also listen on TCP, CURVE-authenticated (off by default)")
    s.add_argument("--tcp-allow-remote", action="store_true", help="allow --tcp on a non-loopback address")
    EngineOptions.add_arguments(s, size=parse_size, unset=FROM_CONFIG)
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 'busy'")
    s.add_argument("--max-clients", type=int, default=None,
                   help="clients per door before 'busy': ZeroMQ clients with requests in flight, editor connections, "
                        "HTTP requests in flight (default 64; config max_clients)")
    s.add_argument("--max-tokens", type=int, default=1 << 16, help="largest max_tokens a request may ask for")
    s.add_argument("--shutdown-timeout", type=float, default=GRACEFUL_SHUTDOWN_S, help="seconds in-flight requests get on shutdown")
    s.add_argument("--engine-timeout", type=float, default=ENGINE_STALL_TIMEOUT_S,
                   help="seconds without a heartbeat from the engine before it is killed and restarted (0: never)")
    from moed.doors import editor, http

    editor.add_arguments(s)
    http.add_arguments(s)
    return p


def serve(args) -> int:
    from moed.config import ConfigError
    from moed.front.runtime import DaemonError, RuntimeFiles
    from moed.front.server import Daemon

    try:
        apply_config(args)
    except ConfigError as e:
        print(f"moed: configuration: {e}", file=sys.stderr)
        return 1
    try:
        logfile = setup_logging("moed", args.debug)
    except LogDirError as e:
        print(f"moed: {e}", file=sys.stderr)
        return 1
    if args.socket:
        os.environ.setdefault("MOED_RUNTIME_DIR", str(Path(args.socket).parent))
    socket_path = Path(args.socket) if args.socket else paths.daemon_socket()
    runtime = RuntimeFiles(socket_path)
    try:
        runtime.acquire()
    except (DaemonError, PermissionError) as e:
        print(f"moed: {e}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(Daemon(args, runtime).run())
    except DaemonError as e:
        log.error("%s", e)
        print(f"moed: {e} (log: {logfile})", file=sys.stderr)
        return 1
    finally:
        runtime.release()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
