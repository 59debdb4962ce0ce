"""`python -m bench --smoke` runs end to end: every section measured or saying why not, JSON and markdown written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmpdir_short():
    path = Path(tempfile.mkdtemp(prefix="moed-bench-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_bench_smoke_end_to_end(tmpdir_short):
    out = tmpdir_short / "smoke.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("machine", "limits", "peers", "moed", "ratios"):
        assert key in result
    (label,) = result["peers"]
    # Physical limits were measured, not invented.
    assert result["limits"]["memcpy"]["host_copy_gb_s"] > 0
    assert result["limits"]["ipc"]["round_trip_us_p50"] > 0
    assert result["limits"]["disk"][label]["sequential"]["bytes"] > 0
    # Both peers ran.
    peers = result["peers"][label]
    assert peers["stock"]["decode_tok_s"] > 0, peers["stock"]
    assert [r["clients"] for r in peers["server"]["runs"]] == [1, 2], peers["server"]
    # moed: each section either measured or says why not; none failed.
    moed = result["moed"][label]
    for section in ("daemon", "daemon_residency", "experts"):
        assert "not_measured" not in moed[section], moed[section]
    assert [r["clients"] for r in moed["daemon"]["concurrency"]["runs"]] == [1, 2]
    assert [(r["residency"], r["prefetch"]) for r in moed["daemon_residency"]["runs"]] == [(0.5, True)]
    assert all("not_measured" not in r for r in moed["daemon_residency"]["runs"])
    # through the daemon too, lazy experts give stock's greedy tokens (checked against daemon_bench's in-process run)
    assert moed["daemon"]["single"]["greedy_tokens_identical"]
    assert all(r["exact"] is True for r in moed["daemon_residency"]["runs"])
    from bench.report import expert_runs

    runs = expert_runs(moed["experts"]["models"][0])
    assert runs and all(r.get("exact") for r in runs), "lazy experts changed greedy output"
    ratio = result["ratios"][label]["daemon_vs_mlx_server_1_clients"]
    assert ratio["ratio"] == pytest.approx(ratio["moed"] / ratio["limit"])
    table = out.with_suffix(".md").read_text()
    assert "mlx_lm server (HTTP)" in table and "moed daemon, 50% experts resident, prefetch" in table
    assert table in proc.stdout


def test_synth_routing_knobs_and_layouts(tmpdir_short):
    """Synthetic checkpoints load in stock mlx-lm; the routing knobs do what bench/README.md says."""
    import mlx_lm

    from bench.synth import generate, measure_routing

    root = tmpdir_short
    stats = {}
    for routing in ("uniform", "skewed"):
        base = root / "uniform" if routing == "skewed" else None
        info = generate(root / routing, shape="tiny", layers=2, routing=routing, variant_of=base, progress=lambda m: None)
        assert info["layers"] == 2 and info["experts_per_layer"] == 32
        stats[routing] = measure_routing(root / routing, tokens=48, sequences=3)
    # The variant shares the layer shards: same inode, no second copy on disk.
    assert (root / "uniform" / "model-00002-of-00003.safetensors").stat().st_ino == \
        (root / "skewed" / "model-00002-of-00003.safetensors").stat().st_ino
    uniform, skewed = stats["uniform"], stats["skewed"]
    # Every id a chat prompt holds has an embedding row (an id past the table is an
    # out-of-bounds gather: garbage, NaN logits in stock mlx-lm); the EOS stays out of reach.
    import mlx.core as mx

    model, tokenizer = mlx_lm.load(str(root / "skewed"))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert max(ids) < model.args.vocab_size <= min(tokenizer.eos_token_ids)
    assert bool(mx.isfinite(model(mx.array(ids)[None])).all())
    assert uniform["mean_normalized_entropy"] > 0.9 > skewed["mean_normalized_entropy"] + 0.1
    assert skewed["mean_top25_share"] > uniform["mean_top25_share"] + 0.3
    assert uniform["mean_token_reuse"] < 0.3 < skewed["mean_token_reuse"]

    # Hugging Face per-expert layout (Mixtral names), stacked by mlx-lm's own sanitize at load time.
    generate(root / "mixtral", shape="tiny-mixtral", layers=1, layout="per-expert", routing="skewed", progress=lambda m: None)
    index = json.loads((root / "mixtral" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.7.w2.scales" in index
    model, tokenizer = mlx_lm.load(str(root / "mixtral"))
    assert len(mlx_lm.generate(model, tokenizer, "hello", max_tokens=4)) > 0
    with pytest.raises(ValueError, match="per-expert layout"):
        generate(root / "bad", shape="tiny", layers=1, layout="per-expert")


def test_paired_ratios_are_per_prompt_and_per_round():
    from bench.experts_bench import paired_ratios

    tps = {  # config -> per round, per prompt tok/s
        "prefetch-50": [[110, 90, 200], [120, 100, 200], [100, 95, 210]],
        "on-demand-50": [[100, 100, 200], [100, 100, 100], [100, 100, 200]],
    }
    r = paired_ratios(tps, "prefetch-50", "on-demand-50")
    assert r["per_round"][0] == [1.1, 1.2, 1.0]  # prompt 1, rounds 1-3
    assert r["median"] == [1.1, 0.95, 1.05]
    assert r["rounds_not_slower"] == [1.0, 1 / 3, 1.0]
    assert r["all_prompts_median"] == 1.0  # over all nine ratios
    assert paired_ratios(tps, "prefetch-25", "on-demand-25") is None


def test_paired_section_runs_and_reports_the_oracle(tmp_path):
    """The paired comparison end to end on the embedded model, one short round."""
    from bench.experts_bench import PROMPTS, bench_paired
    from moed.models import embedded_model_path

    names = ("checked-100", "on-demand-50", "on-demand-50#2", "prefetch-50", "checked-100-inline")
    out = bench_paired(embedded_model_path(), rounds=1, tokens=4, prompts=PROMPTS[:2], uncached=False, names=names)
    assert "error" not in out, out.get("error")
    assert set(out["median_tps"]) == set(names)
    assert len(out["deferred_vs_inline_check"]["checked-100"]["median"]) == 2
    assert out["deferred_vs_inline_check"]["prefetch-50"] is None
    stats = out["last_round_stats"]
    assert stats["checked-100"]["deferred_checks"] > 0 and stats["checked-100-inline"]["deferred_checks"] == 0
    assert len(out["same_config_twice"]["50"]["median"]) == 2
    for key in ("prefetch_vs_on_demand", "oracle_vs_on_demand"):
        assert len(out[key]["50"]["median"]) == 2 and out[key]["25"] is None
    assert out["last_round_stats"]["prefetch-50"]["payoff"]["arms"].keys() == {"off", "runahead", "ahead"}


def test_gpu_run_synth_writes_only_the_routings_asked_for(tmpdir_short):
    """`gpu_run.sh synth SIZE skewed` writes the skewed checkpoint alone; with both, skewed shares uniform's experts."""
    import os

    env = dict(os.environ, MOED_GPU_ROOT=str(tmpdir_short), MOED_SYNTH_SHAPE="tiny", MOED_MLX_MEMORY_LIMIT="0",
               PYTHONPATH=str(REPO))
    script = str(REPO / "bench" / "gpu_run.sh")
    proc = subprocess.run(["bash", script, "synth", "4MB", "skewed"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (tmpdir_short / "synth").iterdir()) == ["synth-tiny-4MB-skewed-stacked"]
    proc = subprocess.run(["bash", script, "synth", "4MB", "uniform", "skewed"], cwd=REPO, env=dict(env, MOED_GPU_ROOT=str(tmpdir_short / "both")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    both = tmpdir_short / "both" / "synth"
    assert sorted(p.name for p in both.iterdir()) == ["synth-tiny-4MB-skewed-stacked", "synth-tiny-4MB-uniform-stacked"]
    shard = "model-00002-of-00003.safetensors"
    assert (both / "synth-tiny-4MB-uniform-stacked" / shard).stat().st_ino == \
        (both / "synth-tiny-4MB-skewed-stacked" / shard).stat().st_ino


def test_one_client_aggregate_rate_is_the_decode_rate():
    """The concurrency section's 1-client figure uses the single section's definition (prefill left out)."""
    from bench.daemon_bench import aggregate_decode_rate, rate

    one = {"tokens": list(range(33)), "first_at": 10.0, "last_at": 10.32}  # 32 tokens after the first in 0.32 s
    assert aggregate_decode_rate([one]) == pytest.approx(rate(33, 10.0, 10.32)) == pytest.approx(100.0)
    two = [one, {"tokens": list(range(17)), "first_at": 10.1, "last_at": 10.42}]
    assert aggregate_decode_rate(two) == pytest.approx((32 + 16) / 0.42)
    assert aggregate_decode_rate([{"tokens": [], "first_at": None, "last_at": None}]) is None


def test_token_overhead_compares_the_daemon_with_its_own_engine():
    """Per request, the client's time per token minus the engine's: a faster in-process loop elsewhere cannot make it negative."""
    from bench.daemon_bench import token_overhead_us

    served = [{"decode_tok_s": 95.0, "daemon_timings": {"engine_decode_tok_s": 100.0}},
              {"decode_tok_s": 90.0, "daemon_timings": {"engine_decode_tok_s": 100.0}},
              {"decode_tok_s": 99.0, "daemon_timings": {"engine_decode_tok_s": 100.0}}]
    assert token_overhead_us(served) == pytest.approx((1 / 95 - 1 / 100) * 1e6)
    assert token_overhead_us([{"decode_tok_s": 95.0, "daemon_timings": {}}]) is None


def test_experts_section_runs_the_rounds_asked_for(monkeypatch):
    """`python -m bench --repeats N` gives experts_bench N rounds (the md says "median of N")."""
    import argparse

    import bench.__main__ as suite
    from bench import experts_bench as eb

    seen = {}

    def bench_model(model_dir, *, tokens, prompts, uncached, repeats=1, configs=eb.CONFIGS, progress=print):
        seen.update(repeats=repeats, configs=configs)
        return {}

    monkeypatch.setattr(eb, "bench_model", bench_model)
    args = argparse.Namespace(repeats=4, residency=[0.5], prefetch_modes=[True])
    suite.experts_bench(eb, Path("/nonexistent"), 8, ["p"], args)
    assert seen["repeats"] == 4
    monkeypatch.setattr(eb, "synthetic_checkpoint", lambda root, **kw: Path(root))
    monkeypatch.setattr(eb, "bench_model", lambda path, **kw: {"repeats": kw["repeats"]})
    out = eb.run(model=Path("/nonexistent"), repeats=3, progress=lambda m: None)
    assert [m["repeats"] for m in out["models"]] == [3]


def test_disk_per_token_leaves_the_initial_fill_out(tmp_path):
    """Bytes read before the first decode step are the fill, reported apart from the per-token figure."""
    import mlx.core as mx

    from moed.experts import load_model
    from moed.experts.decode import generate
    from moed.models import embedded_model_path

    model, tok, manager = load_model(embedded_model_path(), capacity=8, prefetch=False, profile=None, warm_start=False)
    try:
        ids = tok.encode("The capital of France is")
        for _ in generate(mx.array(ids), model, manager, max_tokens=6):
            pass
        s = manager.stats()
        assert s["fill_bytes"] > 0  # the prompt's prefill loaded experts
        assert s["disk_bytes_per_token"] == pytest.approx((s["bytes_read"] - s["fill_bytes"]) / s["decode_steps"])
    finally:
        manager.close()


def test_slot_write_bench_reads_back_what_it_wrote():
    from bench import slot_write

    r = slot_write.measure(64 * 1024, slots=4, repeats=3)
    assert r["expert_bytes"] == 64 * 1024 and r["slots"] == 4
    for key in ("host_copy_ms", "slot_write_ms", "steady_read_ms", "read_after_write_ms"):
        assert r[key] > 0
