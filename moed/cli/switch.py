"""moectl load, and whether a running daemon serves the model a command asks for."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from moed import models
from moed.cli.common import CommandError
from moed.cli.runtime import POLL_S, STATUS_TIMEOUT_S, ProgressLine, Runtime, query_status
from moed.cli.status import model_name
from moed.config import Config
from moed_client import Client


def names_of(spec: str | None) -> set[str]:
    """The names a served model answering to ``spec`` may go by in status (name, path, hub id)."""
    if not spec:
        return {"embedded", str(models.embedded_model_path()), str(models.embedded_model_path().resolve())}
    path = Path(spec).expanduser()
    if path.exists():
        return {str(path.resolve()), str(path.absolute()), models.display_name(path)}
    return {spec}


def serves(status: dict, spec: str | None) -> bool:
    model = status.get("model") if isinstance(status.get("model"), dict) else {}
    served = {model_name(status)}
    if model.get("path"):
        served |= {model["path"], str(Path(model["path"]).resolve()), models.display_name(Path(model["path"]))}
    return bool(served & names_of(spec))


def check_serves(cfg: Config, status: dict) -> None:
    """A daemon already running another model than the one configured is an error, not a success."""
    if cfg.source is not None and cfg.source.get("model") == "default":
        return  # no model asked for: whatever it serves is fine
    if not serves(status, cfg.model):
        raise CommandError(
            f"moed is already running (pid {status.get('pid')}) with model {model_name(status)}, not {cfg.model or 'embedded'}: "
            f"`moectl load {cfg.model or 'embedded'}` switches it, or `moectl stop` first"
        )


def cmd_load(args, cfg: Config) -> int:
    runtime = Runtime.of(cfg)
    spec = None if args.model in (None, "", "embedded") else args.model
    if spec is not None and Path(spec).expanduser().exists():
        spec = str(Path(spec).expanduser().absolute())  # the daemon runs in another directory
    status = query_status(runtime)
    if status is None:
        raise CommandError("moed is not running; `moectl start --model MODEL` starts it with that model")
    if serves(status, spec) and status.get("state") in ("ready", "unloaded"):
        print(f"moed already serves {model_name(status)}")
        return 0
    with Client(runtime.socket, timeout=STATUS_TIMEOUT_S, name="moectl") as client:
        client.load(spec, drain=not args.cancel)
    what = "cancelling" if args.cancel else "letting finish"
    active = (status.get("requests") or {}).get("active", 0)
    print(f"switching to {spec or 'embedded'}; {what} {active} in-flight request(s)", file=sys.stderr)
    status = wait_for_switch(runtime, cfg.start_timeout)
    print(f"moed now serves {model_name(status)}")
    return 0


def wait_for_switch(runtime: Runtime, timeout: float, out=sys.stderr) -> dict:
    start, line = time.monotonic(), ProgressLine(out)
    try:
        while True:
            elapsed = time.monotonic() - start
            status = query_status(runtime, timeout=2.0)
            if status is None:
                raise CommandError("moed stopped while switching models (`moectl logs` shows why)")
            switch = status.get("switch") or {}
            if switch.get("state") == "failed":
                raise CommandError(f"cannot load {switch.get('model')}: {switch.get('error')} (moed still serves {model_name(status)})")
            if switch.get("state") == "done" and status.get("state") == "ready":
                return status
            line.show(status.get("progress") if status.get("state") != "ready" else
                      {"stage": switch.get("state"), "message": f"switching to {switch.get('model')}"}, elapsed)
            if elapsed > timeout:
                raise CommandError(f"the switch is not done after {timeout:.0f} s; `moectl status` shows its progress")
            time.sleep(POLL_S)
    finally:
        line.done()
