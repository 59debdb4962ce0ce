"""moectl status: the daemon's status reply, for a person or as JSON."""

from __future__ import annotations

import json

from moed import config as configuration
from moed import platform
from moed.cli.common import EXIT_FAILURE, EXIT_NOT_RUNNING, CommandError
from moed.cli.runtime import Runtime, pidfile_pid, query_status
from moed.config import Config


def model_name(status: dict) -> str:
    model = status.get("model")
    if isinstance(model, dict):
        return str(model.get("name") or model.get("path") or "?")
    return str(model or "?")


def status_object(cfg: Config) -> dict:
    """``moectl status --json``: the daemon's status reply plus running, socket, pidfile, log and service."""
    runtime = Runtime.of(cfg)
    status = query_status(runtime)
    manager = platform.service_manager()
    extra = {
        "socket": str(runtime.socket),
        "pidfile": str(runtime.pidfile),
        "log": str(cfg.log_path()),
        "service": {"manager": manager, "installed": platform.is_service_installed(manager) if manager else False},
    }
    if status is not None:
        status.pop("type", None)
        return {"running": True, **status, **extra}
    pid = pidfile_pid(runtime)
    return {"running": False, "state": "unresponsive" if pid else "stopped", "pid": pid, **extra}


def cmd_status(args, cfg: Config) -> int:
    obj = status_object(cfg)
    if args.json:
        print(json.dumps(obj, sort_keys=True))
    else:
        print(format_status(obj))
    if obj["running"]:
        return 0
    return EXIT_FAILURE if obj["state"] == "unresponsive" else EXIT_NOT_RUNNING


def cmd_http_token(args, cfg: Config) -> int:
    """``moectl http-token``: the HTTP gateway's token from its 0600 file, for ``Authorization: Bearer``."""
    from moed.doors import http_token

    token = http_token.load()
    if token is None:
        raise CommandError(f"no HTTP token yet in {http_token.token_file()}: start the daemon with --http once "
                           "(a token given by --http-token or MOED_HTTP_TOKEN is yours to know)")
    print(token)
    return 0


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}d {h}h {m:02d}m" if d else f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def format_status(obj: dict) -> str:
    size = configuration.format_size
    if not obj["running"]:
        if obj["state"] == "unresponsive":
            return f"moed (pid {obj['pid']}) holds {obj['pidfile']} but does not answer on {obj['socket']}; `moectl stop` stops it"
        return "moed is not running (start it with `moectl start`)"
    rows = []
    state = obj.get("state")
    head = f"moed is running ({state})"
    if state != "ready":
        p = obj.get("progress") or {}
        fraction = p.get("fraction")
        head += f": [{p.get('stage')}] {p.get('message')}" + (f" {100 * fraction:.0f}%" if isinstance(fraction, (int, float)) else "")
    engine = f" (engine {obj['engine_pid']})" if obj.get("engine_pid") else ""
    rows.append(("pid", f"{obj.get('pid')}{engine}, up {format_duration(obj.get('uptime_s') or 0)}"))
    model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
    rows.append(("model", f"{model_name(obj)}" + (f" ({model['path']})" if model.get("path") else "")))
    memory = obj.get("memory") or {}
    budget = memory.get("budget_bytes")
    experts = obj.get("experts")
    unbounded = "none" if experts else "none (whole model in memory)"
    rows.append(("memory", f"{size(memory.get('rss_bytes'))} resident, budget {size(budget) if budget else unbounded}"))
    requests = obj.get("requests") or {}
    rows.append(("requests", f"{requests.get('active', 0)} active, {requests.get('queued', 0)} queued; {obj.get('clients', 0)} client(s)"))
    rows.append(("speed", f"{obj.get('recent_tok_s') or 0:.1f} tok/s (recent)"))
    if isinstance(experts, dict) and experts:
        rows.append(("experts", format_experts(experts)))
    kv = obj.get("kv_cache") if isinstance(obj.get("kv_cache"), dict) else {}
    if kv.get("bits"):
        rows.append(("kv cache", f"{kv['bits']}-bit (group {kv.get('group_size')}), {size(kv.get('active_bytes'))} in use"))
    for r in obj.get("ranks") or []:
        rows.append((f"rank {r.get('rank')}", format_rank(r)))
    if isinstance(obj.get("prefill"), dict) and obj["prefill"].get("target_ms"):
        rows.append(("prefill", format_prefill(obj["prefill"])))
    rows.append(("socket", obj["socket"]))
    if obj.get("http"):
        no_auth = obj.get("http_auth") == "none"
        rows.append(("http", obj["http"] + (" WARNING: no token (--http-no-auth), every account on this machine can use it" if no_auth
                                            else " (token: `moectl http-token`)")))
    if obj.get("editor_socket"):
        rows.append(("editor", obj["editor_socket"]))
    rows.append(("log", obj["log"]))
    service = obj.get("service") or {}
    if service.get("installed"):
        rows.append(("service", f"{service['manager']} (installed)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


def format_prefill(prefill: dict) -> str:
    """The chunk clock: how long a prompt chunk may take, and what calibration at start measured."""
    text = f"chunks of {prefill.get('next_chunk')} tokens for {prefill['target_ms']:.0f} ms"
    forwards = (prefill.get("calibration") or {}).get("forwards") or []
    if forwards:
        text += " (measured at start: " + ", ".join(f"{f['tokens']} tokens in {f['ms']:.0f} ms" for f in forwards) + ")"
    if prefill.get("prefilling"):
        text += f"; {prefill['prefilling']} prompt(s) being fed"
    return text


def format_experts(experts: dict) -> str:
    """The expert-cache figures a person looks at; `status --json` has them all."""

    def pct(value) -> str:
        return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"

    prefetch = experts.get("prefetch") if isinstance(experts.get("prefetch"), dict) else {}
    parts = [f"hit rate {pct(experts.get('hit_rate'))}"]
    if prefetch:
        parts.append(f"prefetch recall {pct(prefetch.get('recall'))}, precision {pct(prefetch.get('precision'))}")
    parts.append(f"{configuration.format_size(experts.get('bytes_read'))} read from disk")
    if experts.get("decode_steps"):  # redone: an expert was missing, the exact pass ran again
        parts.append(f"{experts.get('redos', 0)}/{experts['decode_steps']} decode forwards redone")
    if experts.get("slots"):
        parts.append(f"{experts.get('resident', 0)}/{experts['slots']} slots filled ({experts.get('capacity')} per layer)")
    if experts.get("approximate"):
        parts.append("approximate")
    return ", ".join(parts)


def format_rank(r: dict) -> str:
    """One rank of a distributed engine: host, layers, memory, hit rate, bytes sent per token."""
    size = configuration.format_size
    first, end = r.get("layers") or (0, 0)
    hit = r.get("hit_rate")
    per_token = r.get("bytes_per_token")
    return ", ".join([
        f"{r.get('host')}", f"layers {first}-{end - 1}", f"{size(r.get('rss_bytes'))} resident",
        f"hit rate {100 * hit:.1f}%" if isinstance(hit, (int, float)) else "all experts resident",
        f"{size(per_token)} sent per token" if isinstance(per_token, (int, float)) else "nothing sent yet",
    ])
