"""moectl list, show, rm and ps: the models on this machine and the one the daemon has loaded."""

from __future__ import annotations

import json
import sys
import time

from moed import catalog
from moed.cli.common import EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_USAGE, CommandError
from moed.cli.runtime import Runtime, query_status
from moed.cli.status import format_duration, model_name
from moed.config import Config, format_size


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def fits(value: bool | None) -> str:
    return "?" if value is None else "yes" if value else "no"


def cmd_list(args, cfg: Config) -> int:
    found = catalog.list_models()
    if args.json:
        print(json.dumps([m.to_dict() for m in found], sort_keys=True))
        return 0
    rows = [["NAME", "SIZE", "LAYERS", "EXPERTS", "TOP-K", "QUANT", "FITS IN RAM"]]
    for m in found:
        rows.append([m.name, format_size(m.size_bytes), str(m.layers or "?"), str(m.experts), str(m.top_k or "?"),
                     m.quantization, fits(m.fits_in_ram)])
    print(table(rows))
    return 0


def cmd_show(args, cfg: Config) -> int:
    path, name = catalog.find(args.model)
    info = catalog.describe(path, name)
    figures = catalog.expert_figures(path, info)
    if args.json:
        print(json.dumps({**info.to_dict(), **figures, "config": catalog.models.read_config(path)}, sort_keys=True))
        return 0
    budget = figures["suggested_memory_budget"]
    rows = [
        ("model", f"{info.name} ({info.model_type or '?'})"),
        ("path", info.path),
        ("size", f"{format_size(info.size_bytes)} ({info.quantization}); fits in RAM: {fits(info.fits_in_ram)} "
                 f"(RAM {format_size(figures['ram_bytes'])})"),
        ("layers", f"{info.layers or '?'} ({figures['moe_layers']} with experts)"),
        ("experts", f"{info.experts} per layer, top-{info.top_k or '?'} per token"),
        ("per expert", format_size(figures["bytes_per_expert"])),
        ("experts total", format_size(figures["expert_bytes"])),
        ("dense weights", format_size(figures["dense_bytes"])),
        ("memory budget", f"--memory-budget {format_size(budget).replace(' ', '').replace('iB', '')}" if budget
                          else "none needed: the whole model fits in memory"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def cmd_rm(args, cfg: Config) -> int:
    if args.model == "embedded":
        raise CommandError("the embedded model ships with moed and cannot be removed", EXIT_USAGE)
    strategy, size = catalog.delete_plan(args.model)
    status = query_status(Runtime.of(cfg))
    serving = status is not None and model_name(status) == args.model
    if serving:
        print(f"moectl: the running daemon serves {args.model}; it keeps its open files until it stops", file=sys.stderr)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CommandError(f"not removing {args.model} without confirmation: pass --yes", EXIT_USAGE)
        answer = input(f"remove {args.model} ({format_size(size)}) from {catalog.hub_cache_dir()}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return EXIT_FAILURE
    strategy.execute()
    print(f"removed {args.model} ({format_size(strategy.expected_freed_size)} freed)")
    return 0


def ps_object(status: dict) -> dict:
    model = status.get("model") if isinstance(status.get("model"), dict) else {}
    experts = status.get("experts") if isinstance(status.get("experts"), dict) else {}
    ready_at = status.get("model_ready_at")
    return {
        "model": model_name(status), "path": model.get("path"), "state": status.get("state"),
        "memory_bytes": (status.get("memory") or {}).get("rss_bytes"),
        "budget_bytes": (status.get("memory") or {}).get("budget_bytes"),
        "resident_experts": experts.get("resident"), "expert_slots": experts.get("slots"),
        "hit_rate": experts.get("hit_rate"), "clients": status.get("clients", 0),
        "requests": status.get("requests") or {}, "since": ready_at,
    }


def cmd_ps(args, cfg: Config) -> int:
    status = query_status(Runtime.of(cfg))
    if status is None:
        if args.json:
            print("[]")
        else:
            print("moed is not running")
        return EXIT_NOT_RUNNING
    obj = ps_object(status)
    if args.json:
        print(json.dumps([obj], sort_keys=True))
        return 0
    if obj["expert_slots"]:
        residency = f"{obj['resident_experts'] or 0}/{obj['expert_slots']} experts"
    else:
        residency = "whole model" if obj["state"] == "ready" else "-"
    since = "-"
    if isinstance(obj["since"], (int, float)):
        since = f"{time.strftime('%H:%M:%S', time.localtime(obj['since']))} ({format_duration(time.time() - obj['since'])} ago)"
    requests = obj["requests"]
    rows = [["NAME", "STATE", "MEMORY", "RESIDENT", "CLIENTS", "REQUESTS", "SINCE"],
            [obj["model"], str(obj["state"]), format_size(obj["memory_bytes"]), residency, str(obj["clients"]),
             f"{requests.get('active', 0)} active, {requests.get('queued', 0)} queued", since]]
    print(table(rows))
    return 0
