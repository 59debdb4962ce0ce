"""Lazy experts against stock mlx-lm: tok/s, memory, disk bytes per token and
expert-load throughput against raw ``pread`` bandwidth, in one run.

    python -m bench.experts_bench --out experts.json [--model DIR] [--no-synthetic] [--repeats 3] [--tokens 32]

Every configuration (stock, and lazy at each residency) runs in a fresh
process so its memory is its own. Tokens of every lazy run are compared with
stock's (greedy): ``exact`` must be true. Shard pages are dropped from the OS
page cache before each run and after each expert read (``--cached`` keeps
them), so expert loads really come from the disk; raw bandwidth is measured
the same way, on the same shards, in the same run, with preads of the very
expert extents the loader reads.

Prefetch against on-demand loading is also measured paired (``--paired-rounds``,
embedded or given model only): in one process, every config loaded fresh each
round in a new random order, so the per-prompt ratios compare runs made under
the same machine load. ``targets_issue6`` takes its speed-up and "never slower
on any prompt" from there, and reports the oracle bound beside them: all
experts resident (with the check on) against on-demand at 50%, the most any
prefetcher could give.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from bench import emit, log
from bench.tokenizer import write_tokenizer

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "The capital of France is",
    "Explain in one sentence why the sky is blue.",
]
RESIDENCIES = (1.0, 0.5, 0.25)

def synthetic_checkpoint(out: Path, *, layers: int = 16, hidden: int = 1024, experts: int = 64, top_k: int = 4,
                         moe_intermediate: int = 512, seed: int = 0, progress=print) -> Path:
    """A random 4-bit Qwen3-MoE with real-model shapes (float32 scales), built a
    layer at a time so the float weights never all exist at once."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3_moe

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out)
    config = dict(model_type="qwen3_moe", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 2,
                  num_attention_heads=max(hidden // 128, 1), num_key_value_heads=max(hidden // 512, 1), head_dim=128,
                  num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
                  moe_intermediate_size=moe_intermediate, rms_norm_eps=1e-6, vocab_size=tok["vocab_size"],
                  rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=4096, norm_topk_prob=True,
                  eos_token_id=tok["eos_token_id"], quantization={"group_size": 64, "bits": 4})
    mx.random.seed(seed)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("mlp.gate"))
    weights = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.weight = layer.mlp.gate.weight * 8.0  # spread routing over the experts
        params = dict(tree_flatten(layer.parameters()))
        mx.eval(params)
        weights.update({f"model.layers.{i}.{k}": v for k, v in params.items()})
        progress(f"synthetic checkpoint: layer {i + 1}/{layers}")
    rest = {k: v for k, v in tree_flatten(model.parameters()) if ".layers." not in f".{k}"}
    mx.eval(rest)
    weights.update(rest)
    shards, limit, current, size = [], 512 << 20, {}, 0
    for k in sorted(weights):
        if size + weights[k].nbytes > limit and current:
            shards.append(current)
            current, size = {}, 0
        current[k] = weights[k]
        size += weights[k].nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


# -- one configuration, in its own process -------------------------------------

def _evict_shards(model_dir: Path) -> bool:
    from moed.platform import drop_file_cache

    return all([drop_file_cache(p) for p in Path(model_dir).glob("*.safetensors")])


def teacher_forced_nll(model, tok, text: str, continuation: list[int]) -> float:
    """Mean negative log-likelihood of ``continuation`` after ``text``, one
    token per forward (as decoding feeds them)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    ids = list(text) if not isinstance(text, str) else tok.encode(text)  # chat templates may return ids
    logits = model(mx.array(ids)[None], cache=cache)[:, -1, :]
    total = 0.0
    for t in continuation:
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total -= logp[0, t].item()
        logits = model(mx.array([[t]]), cache=cache)[:, -1, :]
    return total / max(len(continuation), 1)


def measure_one(model_dir: str, capacity: int | None, tokens: int, prompts: list[str], uncached: bool,
                prefetch: bool = False, approximate: bool = False, reference: list | None = None,
                profile: str | None = "auto", always_check: bool = False, defer: bool = True,
                redo_mode: str = "sync", memory_budget: str | None = None, restart_clears: bool = False,
                decode_mode: str = "auto") -> dict:
    """Load (stock when ``capacity`` and ``memory_budget`` are None), greedy-decode each prompt, report.
    Decoding is the engine's solo loop (``moed.experts.decode.generate``: mlx-lm's
    ``generate_step``, with the residency checks one token late unless ``defer``
    is off). Always a cold start: no warm-start state is read or written. ``restart_clears``: a restart
    after a rollback empties MLX's buffer cache as generate_step does by itself (decode.py). ``decode_mode``:
    the manager's (auto, speculative or sync; manager.py)."""
    import mlx.core as mx

    # set or removed on every call: paired_in_process runs every config in one process, and a "-clears"
    # config must not leave the old behaviour on for the configs after it
    if restart_clears:
        os.environ["MOED_RESTART_CLEARS_CACHE"] = "1"
    else:
        os.environ.pop("MOED_RESTART_CLEARS_CACHE", None)

    from moed.experts import load_model
    from moed.experts.decode import generate
    from moed.platform import process_rss_bytes

    if uncached:
        _evict_shards(Path(model_dir))
    rss0 = process_rss_bytes()
    t0 = time.perf_counter()
    model, tok, manager = load_model(model_dir, capacity=capacity, memory_budget=memory_budget, prefetch=prefetch,
                                     approximate=approximate, profile=profile, warm_start=False)
    if manager is not None and uncached:
        manager.reader.uncached = True
    if manager is not None:
        manager.always_check = always_check
        manager.defer_checks = defer
        manager.redo_mode = redo_mode
        manager.decode_mode = decode_mode
    load_s = time.perf_counter() - t0
    rss_loaded = process_rss_bytes()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    for text in texts:  # an id past the embedding table reads garbage: no reference, no exactness to check
        top = max(list(text) if not isinstance(text, str) else tok.encode(text))
        if vocab is not None and top >= vocab:
            raise ValueError(f"{model_dir}: a prompt holds token id {top}, past the model's {vocab}-row embedding table")
    # quality first, from the cold cache a fresh start has (approximate mode skips most then):
    # NLL of the exact continuation, fed one token per forward as decoding does
    nll = [teacher_forced_nll(model, tok, text, ref) for text, ref in zip(texts, reference)] if reference else None
    runs = []
    for text in texts:
        ids = _prompt_ids(tok, text)
        out, first = [], None
        t = time.perf_counter()
        for token, _ in generate(mx.array(ids), model, manager, max_tokens=tokens):
            first = first or time.perf_counter()
            if token in tok.eos_token_ids:  # as stream_generate does
                break
            out.append(token)
        end = time.perf_counter()
        # as mlx_lm.stream_generate counts: the prompt up to the first token, the rest after it
        runs.append({"tokens": out, "decode_tps": (len(out) - 1) / (end - first) if len(out) > 1 else None,
                     "prefill_tps": len(ids) / (first - t), "wall_s": end - t})
        if nll is not None:
            runs[-1]["nll_of_reference"] = nll[len(runs) - 1]
    result = {
        "capacity": manager.caches[0].capacity if manager is not None else capacity,
        "load_s": load_s,
        "rss_before_load": rss0,
        "rss_loaded": rss_loaded,
        "rss_end": process_rss_bytes(),
        "peak_device_bytes": mx.get_peak_memory(),
        "runs": runs,
        "decode_tps": sum(r["decode_tps"] for r in runs) / len(runs),
    }
    if manager is not None:
        result["stats"] = manager.stats()
        manager.close()
    return result


def _prompt_ids(tok, text) -> list[int]:
    """Token ids as the engine makes them (a chat template may have tokenized already)."""
    from moed.engine.loading import encode_prompt

    return encode_prompt(tok, text) if isinstance(text, str) else list(text)


def _child(flag: str, spec: dict) -> dict:
    """``python -m bench.experts_bench FLAG SPEC`` in a fresh process: its JSON, or its error."""
    proc = subprocess.run([sys.executable, "-m", "bench.experts_bench", flag, json.dumps(spec)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _subprocess(model_dir: Path, capacity, tokens, prompts, uncached, **kw) -> dict:
    out = _child("--one", {"model_dir": str(model_dir), "capacity": capacity, "tokens": tokens, "prompts": prompts,
                           "uncached": uncached, **kw})
    return {"capacity": capacity, **out} if "error" in out else out


def experts_per_layer(model_dir) -> int:
    """Experts per MoE layer, from the model's structure (nothing is read)."""
    import mlx_lm

    from moed.experts import families

    model, _ = mlx_lm.load(str(model_dir), lazy=True)
    return families.experts_per_layer(model)


# -- raw disk, same extents ------------------------------------------------------

def raw_expert_preads(model_dir: Path, max_bytes: int = 256 << 20, seed: int = 0) -> dict:
    """pread the exact byte extents of random experts, page cache dropped: the
    bandwidth the disk gives the loader's access pattern with nothing else around."""
    import mmap

    import mlx_lm

    from moed.experts.families import find_moe_sites
    from moed.experts.lazy import expert_parts
    from moed.experts.store import Checkpoint
    from moed.platform import open_uncached

    ckpt = Checkpoint(model_dir)
    model, _ = mlx_lm.load(str(model_dir), lazy=True)
    sites = find_moe_sites(model)
    experts = [[p.extents[e] for p in expert_parts(ckpt, s)] for s in sites for e in range(s.num_experts)]
    random.Random(seed).shuffle(experts)
    fds = {f: open_uncached(f) for f in ckpt.files}
    biggest = max(x.nbytes for ex in experts for x in ex)
    buf = memoryview(mmap.mmap(-1, biggest))
    _evict_shards(model_dir)
    done, count = 0, 0
    t0 = time.perf_counter()
    for ex in experts:
        for x in ex:
            os.preadv(fds[x.file], [buf[: x.nbytes]], x.offset)
            done += x.nbytes
        count += 1
        if done >= max_bytes:
            break
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return {"experts": count, "bytes": done, "seconds": dt, "gb_s": done / dt / 1e9,
            "expert_bytes": sum(x.nbytes for x in experts[0]), "preads_per_expert": len(experts[0])}


# name -> (share of experts resident, load_model options); "on-demand" is issue 5
# alone (no prefetcher, no profile), "prefetch" adds the prefetcher and the profile.
# "checked-100" keeps every expert resident but runs the exactness check anyway
# (one readback per token): the ceiling of any residency below 100%, prefetch or not.
CONFIGS = {
    "lazy-100": (1.0, {"prefetch": False, "profile": None}),
    "checked-100": (1.0, {"prefetch": False, "profile": None, "always_check": True}),
    "on-demand-50": (0.5, {"prefetch": False, "profile": None}),
    "prefetch-50": (0.5, {"prefetch": True, "profile": "auto"}),
    "on-demand-25": (0.25, {"prefetch": False, "profile": None}),
    "prefetch-25": (0.25, {"prefetch": True, "profile": "auto"}),
}
# every check inside its own forward (ExpertManager.defer_checks off): what deferring them gives
INLINE = {
    "checked-100-inline": (1.0, {"prefetch": False, "profile": None, "always_check": True, "defer": False}),
    "prefetch-50-inline": (0.5, {"prefetch": True, "profile": "auto", "defer": False}),
    "prefetch-25-inline": (0.25, {"prefetch": True, "profile": "auto", "defer": False}),
}
# a pass that missed resumed speculatively from the missed layer (redo.py) against the default, layer
# by layer in sync from it: "NAME-sync-redo" is NAME with sync redos named explicitly, "NAME-resume" with resumes
SYNC_REDO = {f"{name}-sync-redo": (share, {**opts, "redo_mode": "sync"}) for name, (share, opts) in CONFIGS.items()
             if share < 1.0}
SYNC_REDO.update({f"{name}-resume": (share, {**opts, "redo_mode": "resume"})
                  for name, (share, opts) in {**CONFIGS, **INLINE}.items() if share < 1.0})
# "NAME-clears": NAME with generate_step's buffer-cache clear at every restart after a rollback (decode.py)
SYNC_REDO.update({f"{name}-clears": (share, {**opts, "restart_clears": True})
                  for name, (share, opts) in CONFIGS.items() if share < 1.0})
# "NAME-sync-decode" / "NAME-speculative": NAME with the decode mode fixed instead of chosen by auto (manager.py)
SYNC_REDO.update({f"{name}-{mode}": (share, {**opts, "decode_mode": mode.removesuffix("-decode")})
                  for name, (share, opts) in CONFIGS.items() if share < 1.0 for mode in ("sync-decode", "speculative")})
APPROXIMATE = {
    "approximate-50": (0.5, {"prefetch": False, "profile": None, "approximate": True}),
    "approximate-25": (0.25, {"prefetch": False, "profile": None, "approximate": True}),
}


# -- prefetch against on-demand, paired in one process --------------------------

# "NAME#2" runs NAME a second time: on-demand against itself (A/A) shows how far two
# identical configurations drift apart on the machine, the yardstick for the other ratios
PAIRED = ("checked-100", "on-demand-50", "on-demand-50#2", "prefetch-50", "on-demand-25", "prefetch-25",
          "checked-100-inline", "prefetch-50-inline")


def paired_in_process(model_dir: str, names: list[str], rounds: int, tokens: int, prompts: list[str],
                      uncached: bool, seed: int = 0) -> dict:
    """Each round loads every config fresh (a cold start, as a new daemon has)
    and decodes every prompt, configs in a new random order each round, all in
    this one process: the configs share the machine's state of the moment, so
    per-prompt ratios between them are paired, round by round."""
    import random

    num_experts = experts_per_layer(model_dir)
    rng = random.Random(seed)
    tps = {name: [] for name in names}  # name -> per round, per prompt decode tok/s
    stats = {}
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        for name in order:
            share, opts = {**CONFIGS, **INLINE, **SYNC_REDO}[name.split("#")[0]]
            r = measure_one(model_dir, max(1, round(num_experts * share)), tokens, prompts, uncached, **opts)
            tps[name].append([x["decode_tps"] for x in r["runs"]])
            stats[name] = {k: r["stats"].get(k) for k in ("hit_rate", "redos", "readbacks_per_token",
                                                          "expert_wait_share", "mode_steps", "deferred_checks",
                                                          "rollbacks", "resumes", "resume_misses",
                                                          "ms_per_redo", "ms_per_redo_parts", "decode_step_ms")}
            stats[name]["payoff"] = (r["stats"].get("prefetch") or {}).get("payoff")
    return {"rounds": rounds, "tps": tps, "last_round_stats": stats}


def paired_ratios(tps: dict, a: str, b: str) -> dict | None:
    """Per prompt: the median over rounds of a's tok/s / b's tok/s in the same
    round, and the share of rounds where a was at least as fast."""
    if a not in tps or b not in tps:
        return None
    per_prompt = [[x / y for x, y in zip(ra_p, rb_p)]
                  for ra_p, rb_p in zip(zip(*tps[a]), zip(*tps[b]))]  # prompt -> rounds
    return {"per_round": per_prompt,
            "median": [statistics.median(r) for r in per_prompt],
            "rounds_not_slower": [sum(x >= 1.0 for x in r) / len(r) for r in per_prompt],
            "all_prompts_median": statistics.median(x for r in per_prompt for x in r)}


def bench_paired(model_dir: Path, *, rounds: int, tokens: int, prompts: list[str], uncached: bool,
                 names=PAIRED) -> dict:
    out = _child("--paired", {"model_dir": str(model_dir), "names": list(names), "rounds": rounds, "tokens": tokens,
                              "prompts": prompts, "uncached": uncached})
    if "error" in out:
        return out
    tps = out["tps"]
    out["median_tps"] = {name: statistics.median(x for r in rounds_ for x in r) for name, rounds_ in tps.items()}
    out["prefetch_vs_on_demand"] = {str(share): paired_ratios(tps, f"prefetch-{share}", f"on-demand-{share}")
                                    for share in (50, 25)}
    out["same_config_twice"] = {"50": paired_ratios(tps, "on-demand-50#2", "on-demand-50")}
    # all resident with the check on, against on-demand: the most any prefetcher could give at that residency
    out["oracle_vs_on_demand"] = {str(share): paired_ratios(tps, "checked-100", f"on-demand-{share}")
                                  for share in (50, 25)}
    out["deferred_vs_inline_check"] = {name: paired_ratios(tps, name, f"{name}-inline")
                                       for name in ("checked-100", "prefetch-50")}
    return out


def _summary(r: dict, ref: list, stock: dict, raw_gb_s: float | None) -> dict:
    s = r["stats"]
    pf = s.get("prefetch") or {}
    load_gb_s = s["bytes_read"] / s["load_time_s"] / 1e9 if s["load_time_s"] else None
    return {
        "capacity": r["capacity"],
        "decode_tps": r["decode_tps"],
        "speed_vs_stock": r["decode_tps"] / stock["decode_tps"],
        "exact": [x["tokens"] for x in r["runs"]] == ref,
        "token_agreement": sum(a == b for x, rt in zip(r["runs"], ref) for a, b in zip(x["tokens"], rt))
        / max(sum(len(rt) for rt in ref), 1),
        "hit_rate": s["hit_rate"],
        "readbacks_per_token": s["readbacks_per_token"],
        "redos": s["redos"],
        "rollbacks": s.get("rollbacks"),
        "redo_mode": s.get("redo_mode"),
        "resumes": s.get("resumes"),
        "resume_misses": s.get("resume_misses"),
        "mode_steps": s["mode_steps"],
        "disk_bytes_per_token": s["disk_bytes_per_token"],  # after the initial fill
        "fill_bytes": s.get("fill_bytes"),  # read before the first decode step (profile seed, prefill)
        "expert_wait_share": s["expert_wait_share"],
        "recall": pf.get("recall"),
        "precision": pf.get("precision"),
        "predictors": {k: v["recall"] for k, v in pf.get("predictors", {}).items()},
        "decode_step_ms": s.get("decode_step_ms"),
        "ms_per_redo": s.get("ms_per_redo"),
        "ms_per_redo_parts": s.get("ms_per_redo_parts"),
        "payoff": pf.get("payoff"),
        "load_gb_s": load_gb_s,
        "load_vs_raw_pread": load_gb_s / raw_gb_s if load_gb_s and raw_gb_s else None,
        "prefetch_stream_gb_s": pf.get("stream_gb_s"),
        "prefetch_stream_vs_raw_pread": pf["stream_gb_s"] / raw_gb_s if pf.get("stream_gb_s") and raw_gb_s else None,
        "rss_bytes": r["rss_end"],
        "rss_vs_stock": r["rss_end"] / stock["rss_end"],
        "expert_bytes": s["memory"]["expert_bytes"],
        "seeded": s.get("seeded"),
        "per_prompt_decode_tps": [x["decode_tps"] for x in r["runs"]],
    }


def _bar(value, target, at_most: bool = False) -> dict:
    if value is None or isinstance(target, bool):
        met = value == target if value is not None else None
    else:
        met = value <= target if at_most else value >= target
    return {"value": value, "target": (f"<= {target}" if at_most else f">= {target}") if not isinstance(target, bool)
            else target, "met": met}


def _ratio(configs: dict, a: str, b: str):
    x, y = configs.get(a, {}), configs.get(b, {})
    return x["decode_tps"] / y["decode_tps"] if "decode_tps" in x and "decode_tps" in y else None


def bench_model(model_dir: Path, *, tokens: int, prompts: list[str], uncached: bool, repeats: int = 1,
                configs: dict = CONFIGS, approximate_too: bool = False, paired_rounds: int = 0,
                progress=print, save_rounds=None) -> dict:
    """Stock and every config, ``repeats`` interleaved rounds; per config the
    fastest round is kept (the least disturbed by other load on the machine),
    and every round must be exact. ``save_rounds(rounds)`` after each round: the
    raw rounds of a run cut short survive."""
    num_experts = experts_per_layer(model_dir)
    progress(f"{model_dir.name}: raw expert preads")
    raw = raw_expert_preads(model_dir)
    out = {"model": str(model_dir), "num_experts": num_experts, "repeats": repeats, "raw_pread": raw, "configs": {}}
    todo = dict(configs)
    if approximate_too:
        todo.update(APPROXIMATE)
    rounds: dict[str, list] = {"stock": []}
    ref = None
    for i in range(repeats):
        progress(f"{model_dir.name}: stock mlx-lm (round {i + 1}/{repeats})")
        rounds["stock"].append(_subprocess(model_dir, None, tokens, prompts, uncached))
        if "error" in rounds["stock"][-1]:
            out["stock"] = rounds["stock"][-1]
            return out
        ref = ref or [x["tokens"] for x in rounds["stock"][0]["runs"]]
        for name, (share, opts) in todo.items():
            cap = max(1, round(num_experts * share))
            progress(f"{model_dir.name}: {name} ({cap} experts/layer, round {i + 1}/{repeats})")
            extra = {"reference": ref} if opts.get("approximate") else {}
            rounds.setdefault(name, []).append(_subprocess(model_dir, cap, tokens, prompts, uncached, **opts, **extra))
        if save_rounds:
            save_rounds(rounds)
    stock = max(rounds["stock"], key=lambda r: r["decode_tps"])
    out["stock"] = {"decode_tps": stock["decode_tps"], "all_decode_tps": [r["decode_tps"] for r in rounds["stock"]],
                    "rss_bytes": stock["rss_end"], "load_s": stock["load_s"],
                    "deterministic": all([x["tokens"] for x in r["runs"]] == ref for r in rounds["stock"])}
    for name in todo:
        runs = rounds[name]
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            out["configs"][name] = {"error": errors[0]}
            continue
        best = max(runs, key=lambda r: r["decode_tps"])
        summary = _summary(best, ref, stock, raw.get("gb_s"))
        summary["residency"] = todo[name][0]
        summary["all_decode_tps"] = [r["decode_tps"] for r in runs]
        # paired with the stock run of the same round: robust to slow drifts in machine load
        summary["median_paired_vs_stock"] = statistics.median(
            r["decode_tps"] / s["decode_tps"] for r, s in zip(runs, rounds["stock"]))
        summary["exact_every_round"] = all([x["tokens"] for x in r["runs"]] == ref for r in runs)
        if todo[name][1].get("approximate"):
            summary["nll_of_exact_tokens"] = [x.get("nll_of_reference") for x in best["runs"]]
        out["configs"][name] = summary
    if approximate_too:  # the exact model's NLL of its own greedy tokens: the yardstick
        exact = _subprocess(model_dir, num_experts, tokens, prompts, uncached, profile=None, reference=ref)
        out["exact_nll_of_exact_tokens"] = [x.get("nll_of_reference") for x in exact.get("runs", [])]
    c = out["configs"]

    def paired(a: str, b: str):
        if a not in rounds or b not in rounds or any("error" in r for r in rounds[a] + rounds[b]):
            return None
        return statistics.median(x["decode_tps"] / y["decode_tps"] for x, y in zip(rounds[a], rounds[b]))

    def paired_per_prompt(a: str, b: str):
        if a not in rounds or b not in rounds or any("error" in r for r in rounds[a] + rounds[b]):
            return None
        per_round = [[x["decode_tps"] / y["decode_tps"] for x, y in zip(ra["runs"], rb["runs"])]
                     for ra, rb in zip(rounds[a], rounds[b])]
        return [statistics.median(col) for col in zip(*per_round)]

    # per prompt, the median over rounds of (prefetch tok/s / on-demand tok/s) of the same round
    per_prompt = {share: paired_per_prompt(f"prefetch-{share}", f"on-demand-{share}") for share in (50, 25)}
    out["prefetch_vs_on_demand_per_prompt"] = per_prompt
    out["median_paired_ratios"] = {
        "lazy_100_vs_stock": paired("lazy-100", "stock"),
        "checked_100_vs_all_resident": paired("checked-100", "lazy-100"),
        "on_demand_50_vs_all_resident": paired("on-demand-50", "lazy-100"),
        "on_demand_25_vs_all_resident": paired("on-demand-25", "lazy-100"),
        "prefetch_50_vs_all_resident": paired("prefetch-50", "lazy-100"),
        "prefetch_50_vs_on_demand_50": paired("prefetch-50", "on-demand-50"),
        "prefetch_25_vs_all_resident": paired("prefetch-25", "lazy-100"),
        "prefetch_25_vs_on_demand_25": paired("prefetch-25", "on-demand-25"),
    }
    out["targets"] = {
        "lazy_100_vs_stock": c.get("lazy-100", {}).get("speed_vs_stock"),
        "exact_everywhere": all(v.get("exact_every_round") for k, v in c.items() if not k.startswith("approximate")),
        "prefetch_50_vs_all_resident": _ratio(c, "prefetch-50", "lazy-100"),
        "prefetch_50_vs_on_demand_50": _ratio(c, "prefetch-50", "on-demand-50"),
        "prefetch_25_vs_all_resident": _ratio(c, "prefetch-25", "lazy-100"),
        "prefetch_25_vs_on_demand_25": _ratio(c, "prefetch-25", "on-demand-25"),
        "prefetch_50_recall": c.get("prefetch-50", {}).get("recall"),
        "prefetch_50_gate1_recall": (c.get("prefetch-50", {}).get("predictors") or {}).get("gate+1"),
        "prefetch_50_expert_wait_share": c.get("prefetch-50", {}).get("expert_wait_share"),
        "load_vs_raw_pread_best": max((v.get("load_vs_raw_pread") or 0) for v in c.values()) or None,
        "prefetch_stream_vs_raw_pread_best": max((v.get("prefetch_stream_vs_raw_pread") or 0) for v in c.values()) or None,
        # every prompt's median paired ratio (prefetch_vs_on_demand_per_prompt) >= 1
        "prefetch_never_slower_per_prompt": {share: all(r >= 1.0 for r in ratios)
                                             for share, ratios in per_prompt.items() if ratios},
    }
    if paired_rounds:
        progress(f"{model_dir.name}: prefetch against on-demand, paired in one process ({paired_rounds} rounds)")
        out["paired"] = bench_paired(model_dir, rounds=paired_rounds, tokens=tokens, prompts=prompts,
                                     uncached=uncached)
    m, t = out["median_paired_ratios"], out["targets"]
    never = t["prefetch_never_slower_per_prompt"]
    speedup_50 = m["prefetch_50_vs_on_demand_50"]
    paired = out.get("paired") or {}
    pv = paired.get("prefetch_vs_on_demand")
    if pv and pv.get("50") and pv.get("25"):  # the paired, same-process figures are the finer measurement
        speedup_50 = pv["50"]["all_prompts_median"]
        never = {share: all(x >= 1.0 for x in pv[share]["median"]) for share in ("50", "25")}
    out["targets_issue6"] = {  # issue 6 item 6: each figure (ratios: medians of paired rounds) against its bar
        "exact_everywhere": _bar(t["exact_everywhere"], True),
        "recall_50": _bar(t["prefetch_50_recall"], 0.80),
        "gate1_recall_50": _bar(t["prefetch_50_gate1_recall"], 0.80),
        "prefetch_50_vs_all_resident": _bar(m["prefetch_50_vs_all_resident"], 0.60),
        "prefetch_50_vs_on_demand_50": _bar(speedup_50, 1.3),
        "expert_wait_share_50": _bar(t["prefetch_50_expert_wait_share"], 0.10, at_most=True),
        "prefetch_never_slower_per_prompt": _bar(bool(never) and all(never.values()), True),
        "prefetch_25_vs_all_resident": _bar(m["prefetch_25_vs_all_resident"], 0.40),
        # the issue sets this bar on a larger synthetic checkpoint; tiny experts stream far below raw preads
        "stream_vs_raw_pread_best": _bar(t["prefetch_stream_vs_raw_pread_best"], 0.70),
        # not a target: all resident with the check on bounds every partial residency
        "ceiling_checked_100_vs_all_resident": m["checked_100_vs_all_resident"],
        # not a target: every expert resident (checked-100) against on-demand at 50%, the most any
        # prefetcher could give there; when it is under 1.3 that bar cannot be met on this model
        "oracle_50_vs_on_demand_50": ((paired.get("oracle_vs_on_demand") or {}).get("50") or {}).get(
            "all_prompts_median"),
        # not a target: on-demand at 50% against itself, per prompt: the spread two identical configs show
        "same_config_twice_50": ((paired.get("same_config_twice") or {}).get("50") or {}).get("median"),
        "measured_by": "paired, one process" if pv else "separate processes",
    }
    return out


def pick_configs(names: list[str]) -> dict:
    """The named configurations (CONFIGS, INLINE, SYNC_REDO, APPROXIMATE), in the order given."""
    every = {**CONFIGS, **INLINE, **SYNC_REDO, **APPROXIMATE}
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"unknown configs {', '.join(unknown)}: choose from {', '.join(every)}")
    return {n: every[n] for n in names}


def run(*, model: Path | None = None, synthetic: bool = True, tokens: int = 32, uncached: bool = True,
        synthetic_layers: int = 16, repeats: int = 3, synthetic_repeats: int | None = None, paired_rounds: int = 8,
        progress=print, checkpoint=None, configs: list[str] | None = None, save_rounds=None) -> dict:
    """The whole benchmark as a JSON-safe dict (``python -m bench`` calls this).

    The embedded (or given) model: every config, ``repeats`` rounds, plus the
    approximate mode's quality. The synthetic checkpoint (real-model shapes,
    about 1 GB): every config ``synthetic_repeats`` rounds (default: ``repeats``),
    page cache dropped, for the disk figures."""
    import platform as _platform

    from moed.models import embedded_model_path

    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tokens": tokens, "prompts": PROMPTS,
              "page_cache_dropped": uncached,
              "machine": {"system": _platform.system(), "machine": _platform.machine(), "cpus": os.cpu_count(),
                          "load_avg_start": os.getloadavg()},
              "models": []}
    model = Path(model) if model else embedded_model_path()
    old_state = os.environ.get("MOED_STATE_DIR")
    with tempfile.TemporaryDirectory(prefix="moed-bench-state-") as state:
        os.environ["MOED_STATE_DIR"] = state  # subprocesses inherit it: nothing read from or left in the user's dirs
        try:
            if (model / "config.json").is_file():
                chosen = {"configs": pick_configs(configs)} if configs else {"approximate_too": True}
                result["models"].append(bench_model(model, tokens=tokens, prompts=PROMPTS, uncached=uncached,
                                                    repeats=repeats, paired_rounds=paired_rounds, progress=progress,
                                                    save_rounds=save_rounds, **chosen))
                if checkpoint:  # a partial result survives a run cut short
                    checkpoint(result)
            else:
                result["skipped"] = f"{model}: no model there"
            if synthetic:
                root = Path(os.environ.get("MOED_BENCH_DIR", tempfile.gettempdir())) / f"moed-synth-qwen3moe-{synthetic_layers}l"
                target = synthetic_checkpoint(root, layers=synthetic_layers, progress=progress)
                result["models"].append(bench_model(target, tokens=tokens, prompts=PROMPTS[:2], uncached=uncached,
                                                    repeats=synthetic_repeats or repeats, progress=progress))
        finally:
            if old_state is None:
                os.environ.pop("MOED_STATE_DIR", None)
            else:
                os.environ["MOED_STATE_DIR"] = old_state
    result["machine"]["load_avg_end"] = os.getloadavg()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    ap.add_argument("--model", type=Path, help="model directory (default: the embedded model)")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the larger synthetic checkpoint")
    ap.add_argument("--synthetic-layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds on every model (best kept)")
    ap.add_argument("--cached", action="store_true", help="leave the OS page cache alone")
    ap.add_argument("--paired-rounds", type=int, default=8,
                    help="rounds of the in-process paired prefetch/on-demand comparison (0: skip)")
    ap.add_argument("--paired-only", action="store_true", help="only the paired comparison, on the embedded or given model")
    ap.add_argument("--configs", type=lambda t: t.split(","), help="only these configs on the given or embedded "
                    "model, comma-separated (e.g. on-demand-50,on-demand-50-sync-redo); no approximate runs")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--paired", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(**json.loads(args.one))))
        return 0
    if args.paired:
        print(json.dumps(paired_in_process(**json.loads(args.paired))))
        return 0
    if args.paired_only:
        from moed.models import embedded_model_path

        model = args.model or embedded_model_path()
        result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": str(model),
                  "tokens": args.tokens, "prompts": PROMPTS, "page_cache_dropped": not args.cached,
                  "paired": bench_paired(model, rounds=args.paired_rounds, tokens=args.tokens, prompts=PROMPTS,
                                         uncached=not args.cached, **({"names": args.configs} if args.configs else {}))}
        if args.configs:  # NAME-resume against NAME (sync redos, the default), where both ran
            tps = result["paired"].get("tps", {})
            result["paired"]["resume_vs_sync_redo"] = {n: paired_ratios(tps, f"{n}-resume", n) for n in args.configs
                                                       if f"{n}-resume" in args.configs}
        emit(result, args.out)
        return 0
    save = (lambda r: args.out.write_text(json.dumps(r, indent=1))) if args.out else None
    rounds_file = args.out.with_suffix(".rounds.json") if args.out else None
    save_rounds = (lambda r: rounds_file.write_text(json.dumps(r, indent=1))) if rounds_file else None
    result = run(model=args.model, synthetic=not args.no_synthetic, tokens=args.tokens, uncached=not args.cached,
                 synthetic_layers=args.synthetic_layers, repeats=args.repeats, paired_rounds=args.paired_rounds,
                 progress=log, checkpoint=save, configs=args.configs, save_rounds=save_rounds)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
