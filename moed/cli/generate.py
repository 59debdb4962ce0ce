"""moectl run and chat: talking to the model."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from moed.cli.common import EXIT_USAGE, CommandError
from moed.cli.runtime import READY_STATES, STATUS_TIMEOUT_S, Runtime, console_log, pidfile_pid, query_status, wait_until_ready
from moed.config import Config
from moed_client import Client, MoedError


def connect_ready(cfg: Config) -> Client:
    """A connected client to a ready daemon, waiting (with progress) while the model loads."""
    runtime = Runtime.of(cfg)
    status = query_status(runtime)
    if status is None:
        raise CommandError("moed is not running; start it with `moectl start`")
    if status.get("state") not in READY_STATES:
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
    if getattr(args, "ignore_eos", None):
        params["ignore_eos"] = True
    for name in ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if getattr(args, name, None) is not None:  # the daemon checks their ranges
            params[name] = getattr(args, name)
    fmt = response_format(args)
    if fmt is not None:
        params["response_format"] = fmt
    return params


def response_format(args) -> dict | None:
    """``--json-schema SCHEMA`` (JSON text, or @FILE) or ``--json-object``: constrained decoding."""
    schema = getattr(args, "json_schema", None)
    if schema is None:
        return {"type": "json_object"} if getattr(args, "json_object", False) else None
    try:
        text = open(schema[1:], encoding="utf-8").read() if schema.startswith("@") else schema
        value = json.loads(text)
    except (OSError, ValueError) as e:
        raise CommandError(f"--json-schema: not a JSON schema ({type(e).__name__}: {e})", EXIT_USAGE) from None
    if not isinstance(value, dict):
        raise CommandError("--json-schema: the schema must be a JSON object", EXIT_USAGE)
    return {"type": "json_schema", "schema": value}


class CutShort(CommandError):
    """The daemon cancelled the answer (``moectl stop --now``, ``moectl load --cancel``)."""

    def __init__(self, message: str, text: str):
        super().__init__(message)
        self.text = text


def why_cancelled(client: Client) -> str:
    client.timeout = STATUS_TIMEOUT_S  # a daemon that exits right after the final answers nothing more
    try:
        state = client.status().get("state")
    except MoedError:
        return "moed stopped (`moectl stop --now`)"
    if state in ("stopping", None):
        return "moed is stopping (`moectl stop --now`)"
    return f"the daemon cancelled it (state {state}: `moectl load --cancel` switches models that way)"


def stream(client: Client, out: TextIO, as_json: bool, shown: list | None = None, **request) -> str:
    """Stream one answer to ``out`` (text, or one JSON event per line); the whole text.

    An answer the daemon cancelled raises CutShort once what came is written; ``shown`` collects the text
    written so far, for a caller that must end the line after an error."""
    with client.generate(**request) as s:
        for chunk in s:
            if as_json:
                out.write(json.dumps({"type": "chunk", "text": chunk.text, "token_ids": chunk.token_ids}) + "\n")
            else:
                out.write(chunk.text)
            out.flush()
            if shown is not None:
                shown.append(chunk.text)
        if as_json:
            out.write(json.dumps({"type": "done", "finish_reason": s.finish_reason, "usage": s.usage, "timings": s.timings}) + "\n")
        if s.finish_reason == "cancelled":
            raise CutShort(f"the answer was cut short: {why_cancelled(client)}", s.text)
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
    shown: list[str] = []
    try:
        text = stream(client, sys.stdout, args.json, shown, prompt=prompt, **sampling(args, cfg))
    except CutShort as e:
        end_line(args, e.text)
        raise
    except MoedError as e:
        if shown:
            end_line(args, "".join(shown))
        if args.json:
            print(json.dumps({"type": "error", "code": e.code, "message": e.message}), flush=True)
        raise
    finally:
        client.close()
    end_line(args, text)
    return 0


def end_line(args, text: str) -> None:
    """Output ends with a newline (a shell prompt after it starts on its own line); JSON lines already do."""
    if not args.json and not text.endswith("\n"):
        print(flush=True)
