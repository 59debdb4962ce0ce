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


def parse_duration(text: str) -> float:
    from moed import config

    try:
        return config.parse_duration(text)
    except config.ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def apply_config(args) -> None:
    """Settings shared with moectl come from config.toml < MOED_* environment < these flags."""
    from moed import config

    flags = {
        "model": args.model, "memory_budget": args.memory_budget, "capacity": args.capacity,
        "approximate": True if args.approximate else None, "prefetch": False if args.no_prefetch else None,
        "socket": args.socket, "tcp": args.tcp, "http": getattr(args, "http", None), "max_clients": args.max_clients,
        "keep_alive": getattr(args, "keep_alive", None), "allow_switching": True if getattr(args, "allow_switching", False) else None,
    }
    cfg = config.load(flags)
    given = getattr(args, "given", set())
    for setting in config.DAEMON:  # the rest of the flags: config.toml and MOED_* fill those not on the command line
        dest = setting.serve_flag[2:].replace("-", "_")
        value = cfg.daemon[setting.name]
        if dest not in given and value is not None and hasattr(args, dest):
            setattr(args, dest, value)
    args.model, args.memory_budget, args.capacity = cfg.model, cfg.memory_budget, cfg.capacity
    args.approximate, args.no_prefetch = cfg.approximate, not cfg.prefetch
    args.socket, args.tcp, args.max_clients = cfg.socket, cfg.tcp, cfg.max_clients
    args.keep_alive, args.allow_switching = cfg.keep_alive, cfg.allow_switching
    if hasattr(args, "http"):
        args.http = cfg.http
    if cfg.log_dir:
        os.environ["MOED_LOG_DIR"] = str(Path(cfg.log_dir).expanduser())  # the engine reads it too


def build_parser() -> argparse.ArgumentParser:
    from moed.front.supervisor import ENGINE_HANG_TIMEOUT_S, ENGINE_STALL_TIMEOUT_S

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
    s.add_argument("--keep-alive", type=parse_duration, default=None, metavar="DURATION",
                   help="unload the model after this long idle, e.g. 5m (0: after each request; -1: never, the default; "
                        "config keep_alive); the next request loads it again")
    s.add_argument("--allow-switching", action="store_true", default=None,
                   help="let a request naming another model switch the daemon to it (default: model_not_found)")
    s.add_argument("--max-tokens", type=int, default=1 << 16, help="largest max_tokens a request may ask for")
    s.add_argument("--shutdown-timeout", type=float, default=GRACEFUL_SHUTDOWN_S, help="seconds in-flight requests get on shutdown")
    s.add_argument("--engine-timeout", type=float, default=ENGINE_STALL_TIMEOUT_S,
                   help="seconds without a heartbeat from the engine before it is killed and restarted (0: never)")
    s.add_argument("--hang-timeout", type=float, default=ENGINE_HANG_TIMEOUT_S,
                   help="seconds a ready engine may beat without making progress (no decode step or prefill chunk "
                        "finished, not waiting for work) before it is killed and restarted (0: never)")
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
    if getattr(args, "kv_bits", None) is not None:
        if args.kv_bits not in (4, 8):
            print(f"moed: --kv-bits must be 4 or 8, not {args.kv_bits}", file=sys.stderr)
            return 2
        if (getattr(args, "ranks", None) or 1) > 1 or getattr(args, "hosts", None):
            print("moed: --kv-bits is not supported in a distributed job (--ranks/--hosts) yet", file=sys.stderr)
            return 2
        args.max_batch = 1  # no quantized KV cache in BatchGenerator: one request at a time, solo (channel.EngineOptions)
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


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the ``moed serve`` options written on the command line (argparse's prefixes too)."""
    serve = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    tokens = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    return {action.dest for action in serve._actions
            if any(o.startswith(t) for t in tokens for o in action.option_strings if o.startswith("--"))}


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.given = given_options(parser, argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
