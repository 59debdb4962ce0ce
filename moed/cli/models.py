"""moectl pull and profile: models and their expert profiles.

Profiling loads the model with MLX, which moectl never imports: it runs in a
child process (``python -m moed.experts.profiling``) whose progress lines are
shown here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from moed import models
from moed.cli.common import EXIT_USAGE, CommandError
from moed.cli.daemon import import_path_env
from moed.cli.runtime import ProgressLine
from moed.config import Config


def cmd_pull(args, cfg: Config) -> int:
    path = models.download(args.repo)  # huggingface_hub draws its own progress bars
    models.check_moe(path)
    print(path)
    return 0


def cmd_profile(args, cfg: Config) -> int:
    model = models.resolve_model(cfg.model)
    if args.prompts:  # read here too, so that a bad file is a usage error before the model loads
        try:
            prompts = [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
        except OSError as e:
            raise CommandError(f"cannot read prompts from {args.prompts}: {e.strerror}", EXIT_USAGE) from None
        if not prompts:
            raise CommandError(f"{args.prompts} holds no prompts", EXIT_USAGE)
    argv = [sys.executable, "-m", "moed.experts.profiling", str(model)]
    for flag, value in (("--prompts", args.prompts), ("--out", args.out), ("--capacity", cfg.capacity), ("--memory-budget", cfg.memory_budget)):
        if value is not None:
            argv += [flag, str(value)]
    out = run_child(argv)
    if out is None:
        raise CommandError("profiling ended without writing a profile")
    print(out)
    return 0


def run_child(argv: list[str]) -> str | None:
    """Run the profiler, showing the progress it prints as JSON lines; the path it wrote.

    Its stderr (warnings, a traceback) goes to ours as is.
    """
    line = ProgressLine(sys.stderr)
    t0, out = time.monotonic(), None
    env = dict(os.environ, **import_path_env())
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env) as child:
        try:
            for text in child.stdout:
                try:
                    event = json.loads(text)
                except ValueError:
                    event = None
                if not isinstance(event, dict):  # something the model code printed
                    sys.stderr.write(text)
                elif "out" in event:
                    out = event["out"]
                else:
                    line.show(event, time.monotonic() - t0)
        except BaseException:  # Ctrl-C: the child got it too; do not leave it running
            child.kill()
            raise
        finally:
            line.done()
    if child.returncode != 0:
        raise CommandError(f"profiling failed (exit status {child.returncode})")
    return out
