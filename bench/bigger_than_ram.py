"""Decode a checkpoint larger than RAM under a memory budget, against stock mlx-lm on a sibling that fits.

Stock mlx-lm cannot load a model larger than the machine's memory, so the yardstick
(issue 17) is stock on a *sibling*: a checkpoint of the same shape and routing with
fewer layers, which fits in RAM. Decode cost grows with the layer count, so stock's
rate on the sibling is scaled by ``sibling_layers / big_layers``:

    ratio = moed tok/s on the big model / (stock tok/s on the sibling x sibling layers / big layers)

Rounds interleave stock and every config, each a fresh process with the page cache
dropped (``bench.experts_bench.measure_one``). Exactness on the big model cannot be
checked against stock here (stock cannot load it); the test suite checks it on every
family at 100/50/25% and below top-k.

    python -m bench.synth --shape qwen3-next --size 30GB --routing skewed --out /tmp/big
    python -m bench.synth --shape qwen3-next --layers 4 --routing skewed --out /tmp/sibling
    python -m bench.bigger_than_ram --big /tmp/big --sibling /tmp/sibling --memory-budget 6G \\
        --tokens 64 --repeats 3 --out bench/results/cpu-bigger-than-ram.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.experts_bench import PROMPTS, _subprocess

CONFIGS = {
    "on-demand": {"prefetch": False, "profile": None},
    "prefetch": {"prefetch": True, "profile": "auto"},
    "on-demand-resume": {"prefetch": False, "profile": None, "redo_mode": "resume"},
    "prefetch-resume": {"prefetch": True, "profile": "auto", "redo_mode": "resume"},
}
# the decode mode fixed instead of chosen by auto (manager.py): "NAME-sync-decode", "NAME-speculative"
CONFIGS.update({f"{name}-{mode}": {**opts, "decode_mode": mode.removesuffix("-decode")}
                for name, opts in list(CONFIGS.items()) if not name.endswith("-resume")
                for mode in ("sync-decode", "speculative")})


def layers(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"])


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def summarize(run: dict) -> dict:
    s = run.get("stats") or {}
    return {"decode_tps": run.get("decode_tps"), "capacity": run.get("capacity"), "hit_rate": s.get("hit_rate"),
            "redos": s.get("redos"), "rollbacks": s.get("rollbacks"), "resumes": s.get("resumes"),
            "disk_bytes_per_token": s.get("disk_bytes_per_token"), "fill_bytes": s.get("fill_bytes"),
            "expert_wait_share": s.get("expert_wait_share"), "mode_steps": s.get("mode_steps"),
            "decode_step_ms": s.get("decode_step_ms"), "ms_per_redo": s.get("ms_per_redo"),
            "ms_per_redo_parts": s.get("ms_per_redo_parts"), "mode_costs": s.get("mode_costs"),
            "rss_end": run.get("rss_end"), "load_s": run.get("load_s"),
            "tokens": [x["tokens"] for x in run.get("runs", [])]}


def run(big: Path, sibling: Path, memory_budget: str, tokens: int, repeats: int, names: list[str],
        progress=print) -> dict:
    scale = layers(sibling) / layers(big)
    prompts = PROMPTS[:2]
    rounds: dict[str, list] = {"stock-sibling": [], **{n: [] for n in names}}
    for i in range(repeats):
        progress(f"round {i + 1}/{repeats}: stock mlx-lm on the sibling ({layers(sibling)} layers)")
        rounds["stock-sibling"].append(_subprocess(sibling, None, tokens, prompts, True))
        progress(f"  {json.dumps(summarize(rounds['stock-sibling'][-1]) | {'tokens': None})}")
        for name in names:
            progress(f"round {i + 1}/{repeats}: {name} on the big model, budget {memory_budget}")
            rounds[name].append(_subprocess(big, None, tokens, prompts, True, memory_budget=memory_budget, **CONFIGS[name]))
            progress(f"  {json.dumps(summarize(rounds[name][-1]) | {'tokens': None})}")  # a run cut short keeps these
    errors = {n: r["error"] for n, rs in rounds.items() for r in rs if "error" in r}
    stock = [r.get("decode_tps") for r in rounds["stock-sibling"]]
    out = {"big": {"path": str(big), "layers": layers(big), "bytes": checkpoint_bytes(big)},
           "sibling": {"path": str(sibling), "layers": layers(sibling), "bytes": checkpoint_bytes(sibling)},
           "ram_bytes": ram_bytes(), "memory_budget": memory_budget, "tokens": tokens, "repeats": repeats,
           "layer_scale": scale, "stock_sibling_tps": stock, "errors": errors, "configs": {}}
    for name in names:
        runs = [r for r in rounds[name] if "error" not in r]
        if not runs or None in stock:
            continue
        best = max(runs, key=lambda r: r["decode_tps"])
        paired = [r["decode_tps"] / (s * scale) for r, s in zip(rounds[name], stock) if "error" not in r]
        out["configs"][name] = {
            **summarize(best),
            "all_decode_tps": [r["decode_tps"] for r in runs],
            "vs_scaled_stock_best": best["decode_tps"] / (max(stock) * scale),
            "vs_scaled_stock_median_paired": statistics.median(paired),
            "same_tokens_every_round": all(summarize(r)["tokens"] == summarize(best)["tokens"] for r in runs),
        }
    return out


def markdown(result: dict) -> str:
    lines = [f"# Bigger than RAM: {result['big']['bytes'] / 1e9:.1f} GB ({result['big']['layers']} layers), "
             f"budget {result['memory_budget']}, RAM {(result['ram_bytes'] or 0) / 2**30:.0f} GiB",
             "", f"stock mlx-lm on the {result['sibling']['layers']}-layer sibling: "
             + ", ".join(f"{t:.2f}" for t in result["stock_sibling_tps"] if t) + " tok/s "
             f"(scaled by {result['layer_scale']:.3f})", "",
             "| config | tok/s (best) | / scaled stock (best) | median paired | hit rate | MB/token | redos | experts/layer |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in result["configs"].items():
        mb = (c["disk_bytes_per_token"] or 0) / 1e6
        lines.append(f"| {name} | {c['decode_tps']:.2f} | {c['vs_scaled_stock_best']:.2f} | "
                     f"{c['vs_scaled_stock_median_paired']:.2f} | {c['hit_rate']:.4f} | {mb:.1f} | {c['redos']} | {c['capacity']} |")
    if result["errors"]:
        lines += ["", "errors: " + "; ".join(f"{k}: {v[-200:]}" for k, v in result["errors"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big", type=Path, required=True, help="the checkpoint larger than RAM")
    ap.add_argument("--sibling", type=Path, required=True, help="same shape and routing, fewer layers, fits in RAM")
    ap.add_argument("--memory-budget", default="6G")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", type=lambda t: t.split(","), default=["on-demand", "prefetch"],
                    help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--out", type=Path, help="JSON here, and the markdown next to it")
    args = ap.parse_args(argv)
    unknown = [n for n in args.configs if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load0 = os.getloadavg()
    result = run(args.big, args.sibling, args.memory_budget, args.tokens, args.repeats, args.configs,
                 progress=lambda m: print(m, flush=True))
    result.update(started=started, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  load_avg_start=load0, load_avg_end=os.getloadavg())
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
