"""moectl run and chat: talking to the model."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from moed.cli.common import EXIT_USAGE, CommandError
from moed.cli.runtime import Runtime, console_log, pidfile_pid, query_status, wait_until_ready
from moed.cli.status import model_name
from moed.config import Config
from moed_client import Client, MoedError


def connect_ready(cfg: Config) -> Client:
    """A connected client to a ready daemon, waiting (with progress) while the model loads."""
    runtime = Runtime.of(cfg)
    status = query_status(runtime)
    if status is None:
        raise CommandError("moed is not running; start it with `moectl start`")
    if status.get("state") != "ready":
        wait_until_ready(runtime, cfg.start_timeout, lambda: pidfile_pid(runtime) is not None, console_log(cfg))
    client = Client(runtime.socket, name="moectl")
    client.connect()
    return client


def sampling(args, cfg: Config) -> dict:
    params = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    if getattr(args, "seed", None) is not None:
        params["seed"] = args.seed
    if getattr(args, "stop", None):
        params["stop"] = args.stop
    for name in ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if getattr(args, name, None) is not None:  # the daemon checks their ranges
            params[name] = getattr(args, name)
    return params


def stream(client: Client, out: TextIO, as_json: bool, **request) -> str:
    """Stream one answer to ``out`` (text, or one JSON event per line); the whole text."""
    with client.generate(**request) as s:
        for chunk in s:
            if as_json:
                out.write(json.dumps({"type": "chunk", "text": chunk.text, "token_ids": chunk.token_ids}) + "\n")
            else:
                out.write(chunk.text)
            out.flush()
        if as_json:
            out.write(json.dumps({"type": "done", "finish_reason": s.finish_reason, "usage": s.usage, "timings": s.timings}) + "\n")
        return s.text


def cmd_run(args, cfg: Config) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end with Ctrl-D)", file=sys.stderr)
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CommandError("the prompt is empty", EXIT_USAGE)
    client = connect_ready(cfg)
    try:
        text = stream(client, sys.stdout, args.json, prompt=prompt, **sampling(args, cfg))
    except MoedError as e:
        if args.json:
            print(json.dumps({"type": "error", "code": e.code, "message": e.message}), flush=True)
        raise
    finally:
        client.close()
    if not args.json and sys.stdout.isatty() and not text.endswith("\n"):
        print()
    return 0


CHAT_HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer."


def read_turn() -> str:
    """The next user message: with line editing and a prompt on a terminal, a plain line from a pipe."""
    if sys.stdin.isatty():
        return input("> ")
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def cmd_chat(args, cfg: Config) -> int:
    client = connect_ready(cfg)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"moed chat with {model_name(client.status())}. {CHAT_HELP}", file=sys.stderr)
    try:
        while True:
            try:
                line = read_turn()
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return 0
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                messages = messages[:1] if args.system else []
                print("(conversation reset)", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            try:
                answer = stream(client, sys.stdout, False, messages=messages, **sampling(args, cfg))
            except KeyboardInterrupt:
                print("\n(answer stopped)", file=sys.stderr)
                messages.pop()
                continue
            except MoedError as e:
                print(f"\nmoectl: {e}", file=sys.stderr)
                messages.pop()
                continue
            print()
            messages.append({"role": "assistant", "content": answer})
    finally:
        client.close()
