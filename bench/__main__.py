"""``python -m bench``: moed and its peers measured side by side, in one run, against physical limits.

    python -m bench [--smoke] [--out FILE] [--model DIR ...] [--synth SPEC ...]

For every model (the embedded one by default; ``--synth qwen3-next:2GB:skewed``
generates a synthetic checkpoint first, see ``bench/synth.py``):
- physical limits of the disk holding it (``bench.limits``), memory copy and the
  ZeroMQ + msgpack floor (once per run);
- peers (``bench.peers``): stock mlx-lm in process, everything resident, and
  mlx-lm's own HTTP server with 1, 2, 4, 8 clients;
- moed through the daemon (``bench.daemon_bench``: all resident, against
  in-process mlx-lm, 1/2/4/8 clients), through the daemon with lazy experts at
  each residency with and without prefetch (composed from daemon_bench's
  client functions), and in process (``bench.experts_bench``: residencies,
  prefetch, disk bytes per token, expert-load vs raw pread bandwidth);
- ratios of every moed figure to its peer and to its physical limit.

JSON goes to ``--out`` (default ``bench/out/bench-<time>.json``), a markdown
table to stdout and next to the JSON (``.md``), PNG plots next to it when
matplotlib is installed. A section whose module is missing or that fails says
so ("not measured: ...") instead of inventing numbers. Keys: bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform as pyplatform
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.ratios import dig, ratios

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 2, 4, 8)
RESIDENCIES = (1.0, 0.5, 0.25)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def optional(module: str):
    """The feature benchmark module, or None when it is not there (yet)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise


def guarded(what: str, fn, *args, **kwargs) -> dict:
    """Run one section; a failure becomes its result instead of ending the run."""
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        log(f"{what} failed: {type(e).__name__}: {e}")
        return {"not_measured": f"{what} failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(out, dict):
        out.setdefault("section_s", time.perf_counter() - t0)
    return out


# -- machine and models ----------------------------------------------------------

def machine() -> dict:
    from moed.platform import total_memory_bytes

    out = {"platform": pyplatform.platform(), "python": pyplatform.python_version(), "cpus": os.cpu_count(),
           "memory_bytes": total_memory_bytes(), "processor": pyplatform.processor() or pyplatform.machine()}
    try:
        import mlx.core as mx
        import mlx_lm

        out.update(mlx=mx.__version__, mlx_lm=mlx_lm.__version__, device=str(mx.default_device()))
        if mx.default_device() != mx.cpu:
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            out["accelerator"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
    except Exception as e:
        out["mlx_error"] = f"{type(e).__name__}: {e}"
    return out


def model_info(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
    files = list(path.glob("*.safetensors"))
    info = {"path": str(path), "model_type": config.get("model_type"), "layers": config.get("num_hidden_layers"),
            "experts_per_layer": experts, "top_k": config.get("num_experts_per_tok"),
            "bytes": sum(f.stat().st_size for f in files), "quantization": config.get("quantization")}
    synth = path / "synth.json"
    if synth.is_file():
        info["synth"] = json.loads(synth.read_text())
    return info


def default_model() -> tuple[Path, str]:
    from moed.models import embedded_model_path

    embedded = embedded_model_path()
    if (embedded / "config.json").is_file():
        return embedded, "embedded"
    # Before the embedded model exists: the test suite's tiny random model, said so in the JSON.
    from bench.launch import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="moed-bench-", dir="/tmp"))
    return make_tiny_model(root / "tiny"), "tiny random (embedded model missing)"


def synth_model(spec: str, root: Path) -> Path:
    """``shape:size[:routing[:layout]]`` -> a checkpoint under ``root`` (reused if already there)."""
    from bench.synth import generate, parse_size

    parts = spec.split(":")
    shape, size = parts[0], parts[1]
    routing = parts[2] if len(parts) > 2 else "random"
    layout = parts[3] if len(parts) > 3 else "stacked"
    out = root / f"synth-{shape}-{size}-{routing}-{layout}"
    if not (out / "synth.json").is_file():
        # Another routing of the same experts: share its layer shards (hard links) instead of writing them again.
        base = next((p for p in root.glob(f"synth-{shape}-{size}-*-{layout}") if (p / "synth.json").is_file()), None)
        log(f"generating {spec} in {out}" + (f" (layer shards linked from {base.name})" if base else ""))
        generate(out, shape=shape, size=parse_size(size), layout=layout, routing=routing, variant_of=base, progress=log)
    return out


def synth_routing(path: Path, max_bytes: int) -> dict:
    """Routing statistics of a synthetic checkpoint, measured on a 4-layer sibling (same knobs and seed)
    when the checkpoint itself is too large to load whole."""
    from bench.synth import generate, measure_routing

    info = json.loads((path / "synth.json").read_text())
    if "routing_stats" in info:
        return info["routing_stats"]
    target = path
    if info["bytes"] > max_bytes:
        target = path.parent / f"{path.name}-4l"
        if not (target / "synth.json").is_file():
            generate(target, shape=info["shape"], layers=4, layout=info["layout"], routing=info["routing"],
                     seed=info["seed"], dtype=info["float_dtype"], progress=log, **info["knobs"])
    stats = dict(measure_routing(target), measured_on_layers=json.loads((target / "synth.json").read_text())["layers"])
    info["routing_stats"] = stats
    (path / "synth.json").write_text(json.dumps(info, indent=1))
    return stats


# -- moed through the daemon with lazy experts -------------------------------------

def daemon_residency(model: Path, experts: int, *, tokens: int, repeats: int, concurrency, residencies,
                     prefetch_modes=(False, True), reference: list | None = None) -> dict:
    """moed serve --capacity at each residency, prefetch off/on: one stream and n clients.

    Uses daemon_bench's own client-side measurement functions (same definitions as its all-resident run)
    and its prompts, so each configuration's greedy tokens are checked against stock's (``reference``,
    daemon_bench's in-process tokens) when that section ran.
    """
    db = optional("bench.daemon_bench")
    if db is None:
        return {"not_measured": "bench.daemon_bench missing"}
    from bench.launch import DaemonProcess

    runs = []
    offset = 5000
    for share in residencies:
        for prefetch in prefetch_modes:
            if share >= 1.0 and prefetch:
                continue  # nothing to prefetch when every expert stays resident
            cap = max(1, round(experts * share))
            args = ["--capacity", str(cap), "--max-batch", str(max(concurrency))]
            if not prefetch:
                args.append("--no-prefetch")
            log(f"moed daemon: residency {share:.0%} ({cap}/{experts} experts per layer), prefetch {'on' if prefetch else 'off'}")
            entry = {"residency": share, "capacity": cap, "prefetch": prefetch}
            d = DaemonProcess(model, tuple(args))
            try:
                d.wait_ready(1800)
                with d.client() as c:
                    c.complete("warm up", max_tokens=4)
                    single = [db.through_daemon(c, db.prompt(i), tokens) for i in range(repeats)]
                    if reference:
                        entry["exact"] = all(r["tokens"] == ref for r, ref in zip(single, reference))
                    from bench.peers import MIN_RATE_TOKENS

                    entry["completion_tokens"] = [len(r["tokens"]) for r in single]
                    entry["decode_tok_s"] = db.median(r["decode_tok_s"] for r in single if len(r["tokens"]) >= MIN_RATE_TOKENS)
                    entry["ttft_s"] = db.median(r["ttft_s"] for r in single)
                    entry["concurrency"] = []
                    for n in concurrency:
                        s = db.concurrent(d, n, tokens, offset)
                        offset += n
                        entry["concurrency"].append({"clients": n, "aggregate_tok_s": s["aggregate_tok_s"],
                                                     "per_client_decode_tok_s": s["per_client_decode_tok_s"]})
                    status = c.status()
                    entry["experts"] = _expert_summary(status)
            except Exception as e:
                entry["not_measured"] = f"{type(e).__name__}: {e}"
            finally:
                d.kill()
            runs.append(entry)
    return {"runs": runs}


def _expert_summary(status: dict) -> dict | None:
    stats = status.get("experts") or (status.get("model") or {}).get("experts")
    if not isinstance(stats, dict):
        return None
    keep = ("hit_rate", "bytes_read", "fill_bytes", "load_time_s", "disk_bytes_per_token", "readbacks_per_token",
            "expert_wait_share", "capacity", "num_experts", "memory")
    return {k: stats[k] for k in keep if k in stats}


# -- the run ---------------------------------------------------------------------

def bench_model(path: Path, label: str, args, limits_common: dict, save=lambda r: None) -> dict:
    """Every section for one model; ``save(partial result)`` after each, so a run cut short keeps what it measured."""
    from bench import limits, peers

    info = model_info(path)
    log(f"model {label}: {info['bytes'] / 1e9:.2f} GB, {info['experts_per_layer']} experts x {info['layers']} layers")
    skip = set(args.skip)
    tokens, repeats, conc = args.tokens, args.repeats, args.concurrency
    prompt_list = [_prompt(i) for i in range(repeats)]
    fits = args.memory_limit is None or info["bytes"] * 1.15 < args.memory_limit
    too_big = f"not measured: model ({info['bytes'] / 1e9:.1f} GB) does not fit the memory limit ({(args.memory_limit or 0) / 1e9:.1f} GB)"

    result = {"label": label, "model": info}
    if "synth" in info and "routing" not in skip:
        result["routing"] = guarded("routing statistics", synth_routing, path, max_bytes=min(args.memory_limit or 8e9, 8e9))

    result.update(disk={}, peers={}, moed={}, ratios={})
    save(result)
    result["disk"] = {"not_measured": "skipped"} if "limits" in skip else guarded(
        "disk limits", limits.disk, path, max_bytes=(16 << 20) if args.smoke else args.disk_bytes)

    p = {}
    if "peers" in skip:
        p = {"not_measured": "skipped"}
    elif not fits:
        p = {"stock": {"not_measured": too_big}, "server": {"not_measured": too_big}}
    else:
        log("peer: stock mlx-lm in process")
        p["stock"] = guarded("stock mlx-lm", peers.stock, path, prompts=prompt_list, tokens=tokens)
        log("peer: mlx_lm server")
        p["server"] = guarded("mlx_lm server", peers.server, path, tokens=tokens, repeats=repeats,
                              concurrency=conc, progress=log)
    result["peers"] = p
    save(result)

    m = result["moed"]
    db, eb = optional("bench.daemon_bench"), optional("bench.experts_bench")
    if "daemon" in skip:
        m["daemon"] = {"not_measured": "skipped"}
    elif db is None:
        m["daemon"] = {"not_measured": "bench.daemon_bench missing"}
    elif not fits:
        m["daemon"] = {"not_measured": too_big + " (daemon_bench holds an in-process copy next to the daemon's)"}
    else:
        log("moed: daemon, all resident (bench.daemon_bench)")
        m["daemon"] = guarded("bench.daemon_bench", db.run, path, tokens=tokens, repeats=repeats, concurrency=conc,
                              progress=log)
    save(result)
    experts = info["experts_per_layer"]
    if "residency" in skip:
        m["daemon_residency"] = {"not_measured": "skipped"}
    else:
        m["daemon_residency"] = guarded("daemon residency sweep", daemon_residency, path, experts, tokens=tokens,
                                        repeats=repeats, concurrency=conc, residencies=args.residency,
                                        prefetch_modes=args.prefetch_modes,
                                        reference=dig(m, "daemon", "single", "reference_tokens"))
    save(result)
    if "experts" in skip:
        m["experts"] = {"not_measured": "skipped"}
    elif eb is None:
        m["experts"] = {"not_measured": "bench.experts_bench missing"}
    else:
        log("moed: lazy experts in process (bench.experts_bench)")
        m["experts"] = guarded("bench.experts_bench", lambda: {"models": [experts_bench(eb, path, tokens, prompt_list, args)]})
    result["ratios"] = ratios(limits_common, result["disk"], p, m)
    save(result)
    return result


def experts_bench(eb, path: Path, tokens: int, prompts: list[str], args) -> dict:
    """experts_bench.bench_model at the run's residencies, with whichever arguments its version takes."""
    params = inspect.signature(eb.bench_model).parameters
    # repeats: the md says "median of N", so the in-process section runs N rounds too
    kw = {"tokens": tokens, "prompts": prompts, "uncached": True, "progress": log, "repeats": args.repeats}
    if "configs" in params:
        kw["configs"] = {k: v for k, v in eb.CONFIGS.items()
                         if v[0] in args.residency and (v[0] >= 1.0 or bool(v[1].get("prefetch")) in args.prefetch_modes)}
    else:
        kw.update(residencies=args.residency, prefetch_too=True)
    return eb.bench_model(path, **{k: v for k, v in kw.items() if k in params})


def _prompt(i: int) -> str:
    db = optional("bench.daemon_bench")
    return db.prompt(i) if db else f"{i} the quick brown fox"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds-long run: embedded model, few tokens, 1-2 clients")
    ap.add_argument("--out", type=Path, help="JSON file (default bench/out/bench-<time>.json)")
    ap.add_argument("--model", type=Path, action="append", default=[], help="model directory (repeatable)")
    ap.add_argument("--synth", action="append", default=[], metavar="SHAPE:SIZE[:ROUTING[:LAYOUT]]",
                    help="generate and bench a synthetic checkpoint, e.g. qwen3-next:2GB:skewed (repeatable)")
    ap.add_argument("--synth-dir", type=Path, default=Path(os.environ.get("MOED_BENCH_DIR", tempfile.gettempdir())))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=lambda t: tuple(int(x) for x in t.split(",")), default=CONCURRENCY)
    ap.add_argument("--residency", type=lambda t: tuple(float(x) for x in t.split(",")), default=RESIDENCIES)
    ap.add_argument("--disk-bytes", type=int, default=1 << 30, help="bytes read per disk-limit pass")
    ap.add_argument("--memory-limit", type=float, default=None,
                    help="bytes; peers that must hold the whole model are skipped when it does not fit")
    ap.add_argument("--skip", type=lambda t: set(t.split(",")), default=set(),
                    help="comma list of sections: limits,routing,peers,daemon,residency,experts")
    args = ap.parse_args(argv)
    args.prefetch_modes = (False, True)
    if args.smoke:
        args.tokens, args.repeats = 8, 1
        args.concurrency, args.residency, args.prefetch_modes = (1, 2), (0.5,), (True,)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench import limits, report

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = args.out or REPO / "bench" / "out" / f"bench-{started.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    models: list[tuple[Path, str]] = [(Path(m), Path(m).name) for m in args.model]
    for spec in args.synth:
        models.append((synth_model(spec, args.synth_dir), f"synth {spec}"))
    if not models:
        models.append(default_model())
    result = {"started": started, "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "smoke": args.smoke, "tokens": args.tokens, "repeats": args.repeats,
              "concurrency": list(args.concurrency), "residencies": list(args.residency), "machine": machine()}
    log("limits: memory copy and zmq+msgpack floor")
    common = {}
    if "limits" not in args.skip:
        small = args.smoke
        common["memcpy"] = guarded("memcpy", limits.memcpy, nbytes=(32 if small else 512) << 20, repeats=3 if small else 5)
        common["ipc"] = guarded("ipc floor", limits.ipc_floor, round_trips=300 if small else 3000,
                                stream_messages=3000 if small else 30000)
    result["limits"] = common
    result.update(models={}, peers={}, moed={}, ratios={})
    result["limits"]["disk"] = {}

    def save(r: dict) -> None:
        # Top-level sections keyed by model label (one object: machine, limits, peers, moed, ratios).
        label = r["label"]
        result["models"][label] = {"info": r["model"], "routing": r.get("routing")}
        result["limits"]["disk"][label] = r["disk"]
        result["peers"][label] = r["peers"]
        result["moed"][label] = r["moed"]
        result["ratios"][label] = r["ratios"]
        out.write_text(json.dumps(result, indent=1, default=str))  # a run cut short keeps what it measured

    for path, label in models:
        bench_model(path, label, args, common, save)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.write_text(json.dumps(result, indent=1, default=str))
    table = report.markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    plots = report.plots(result, out.with_suffix(""))
    log(f"wrote {out}, {out.with_suffix('.md')}" + (f", {len(plots)} plots" if plots else " (no plots: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
