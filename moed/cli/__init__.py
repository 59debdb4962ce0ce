"""moectl: start, stop and watch the moed daemon, and talk to its model.

Every command reads the configuration (config.toml < MOED_* < flags, see
moed.config) and talks protocol v1 through moed_client. Exit codes: 0 success,
1 failure, 2 usage error, 3 ``status``: not running, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from moed import config as configuration
from moed import platform
from moed.cli.common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, CommandError
from moed.cli.daemon import cmd_logs, cmd_service, cmd_start, cmd_stop
from moed.cli.chat import cmd_chat
from moed.cli.generate import cmd_run
from moed.cli.inventory import cmd_list, cmd_ps, cmd_rm, cmd_show
from moed.cli.models import cmd_profile, cmd_pull
from moed.cli.status import cmd_http_token, cmd_status
from moed.cli.switch import cmd_load
from moed.cli.verify import cmd_verify
from moed.config import ConfigError
from moed.models import ModelError  # not `models.`: the package attribute `models` is the moed.cli.models submodule
from moed_client import MoedError


def add_daemon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local model directory or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--memory-budget", metavar="SIZE", help="memory for expert caches, e.g. 8G (default: whole model in memory)")
    p.add_argument("--capacity", type=int, metavar="N", help="expert slots per layer")
    p.add_argument("--approximate", action="store_true", default=None, help="allow approximate output")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false", default=None, help="do not prefetch experts")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also listen for protocol v1 on TCP")
    p.add_argument("--http", metavar="HOST:PORT", help="serve the OpenAI-compatible gateway")
    p.add_argument("--max-clients", type=int, metavar="N", help="clients per door before 'busy'")
    p.add_argument("--keep-alive", metavar="DURATION", help="unload the model after this long idle, e.g. 5m (0: after each request, -1: never)")
    p.add_argument("--allow-switching", action="store_true", default=None, help="let a request naming another model switch to it")
    p.add_argument("--timeout", dest="start_timeout", type=float, metavar="S", help="seconds to wait for the model to be ready")
    for setting in configuration.DAEMON:  # every other `moed serve` option, under its config.toml name
        flag = "--" + setting.name.replace("_", "-")
        if setting.kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=setting.help)
        else:
            p.add_argument(flag, metavar=setting.name.upper(), help=setting.help)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, metavar="N", help="most tokens per answer")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None, help="go on past end-of-sequence tokens, to --max-tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: keep the top tokens holding P of the mass")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens (0: off)")
    p.add_argument("--min-p", type=float, metavar="P", help="drop tokens below P times the likeliest one's probability")
    p.add_argument("--repetition-penalty", type=float, metavar="X", help="divide repeated tokens' logits by X (1: off)")
    p.add_argument("--presence-penalty", type=float, metavar="X", help="subtract X from tokens seen recently (-2..2)")
    p.add_argument("--frequency-penalty", type=float, metavar="X", help="subtract X per recent occurrence (-2..2)")
    p.add_argument("--json-object", action="store_true", help="answer with one JSON object (constrained decoding; needs llguidance)")
    p.add_argument("--json-schema", metavar="SCHEMA", help="answer with JSON matching this schema (JSON text, or @FILE)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moectl", description="Control the moed daemon and talk to its model.")
    p.add_argument("--socket", metavar="PATH", help="daemon socket (default: moed.sock in the runtime dir)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("start", help="start the daemon and wait until the model is ready")
    add_daemon_flags(s)
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("stop", help="stop the daemon (in-flight requests finish unless --now)")
    s.add_argument("--now", action="store_true", help="cancel in-flight requests")
    s.add_argument("--timeout", type=float, metavar="S", help="seconds before SIGTERM, then SIGKILL")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("status", help="is the daemon running, and how is it doing (exit 3: not running)")
    s.add_argument("--json", action="store_true", help="one JSON object (keys in the README)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("http-token", help="print the HTTP gateway's bearer token (made at the gateway's first start)")
    s.set_defaults(func=cmd_http_token)

    s = sub.add_parser("run", help="stream the answer to a prompt (stdin when none is given)")
    s.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    s.add_argument("--json", action="store_true", help="print events as JSON lines")
    add_sampling_flags(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("chat", help="interactive multi-turn chat")
    s.add_argument("--system", help="system message")
    add_sampling_flags(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("load", help="switch the running daemon to another model (with progress)")
    s.add_argument("model", help="embedded, a hub repo id or a model directory")
    s.add_argument("--cancel", action="store_true", help="cancel in-flight requests instead of letting them finish")
    s.add_argument("--timeout", dest="start_timeout", type=float, metavar="S", help="seconds to wait for the new model")
    s.set_defaults(func=cmd_load)

    s = sub.add_parser("logs", help="print the daemon's log")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    s.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="last N lines (default 50)")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("pull", help="download a model from the Hugging Face hub")
    s.add_argument("repo", help="repo id, e.g. mlx-community/Qwen3-30B-A3B-4bit")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("list", aliases=["ls"], help="models on this machine: the embedded one and MoE models in the Hugging Face cache")
    s.add_argument("--json", action="store_true", help="a JSON list")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="a model's config, bytes per expert and a suggested memory budget")
    s.add_argument("model", help="embedded, a repo id from `moectl list`, or a model directory")
    s.add_argument("--json", action="store_true", help="one JSON object, config.json included")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("rm", help="remove a model from the Hugging Face cache")
    s.add_argument("model", help="repo id, as `moectl list` shows it")
    s.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("ps", help="the model the daemon has loaded: memory, residency, clients, since when")
    s.add_argument("--json", action="store_true", help="a JSON list")
    s.set_defaults(func=cmd_ps)

    s = sub.add_parser("service", help="install or remove moed as a launchd/systemd user service")
    s.add_argument("action", choices=("install", "uninstall"))
    add_daemon_flags(s)
    s.add_argument("--no-start", action="store_true", help="install only; do not start it now")
    s.set_defaults(func=cmd_service)

    s = sub.add_parser("profile", help="record which experts a set of prompts routes to (for prefetch)")
    s.add_argument("--model", help="model (default: the configured one)")
    s.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: the built-in set)")
    s.add_argument("--out", metavar="FILE", help="where to write the profile (default: the user profile dir, where moed looks)")
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("verify", help="check a model's files against their Hugging Face hashes and moed's manifest")
    s.add_argument("model", nargs="?", default=None, help="model directory or hub repo id (default: the configured one)")
    s.add_argument("--reset", action="store_true", help="forget the manifest (after changing the model's files on purpose)")
    s.set_defaults(func=cmd_verify)
    return p


def flags_of(args) -> dict:
    """The settings given as flags (None: not given)."""
    return {name: getattr(args, name, None) for name in configuration.BY_NAME}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = configuration.load(flags_of(args))
        return args.func(args, cfg)
    except CommandError as e:
        print(f"moectl: {e}", file=sys.stderr)
        return e.code
    except ConfigError as e:
        print(f"moectl: configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (MoedError, ModelError, platform.ServiceError) as e:
        print(f"moectl: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `moectl run ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
