"""Train moed's embedded default model: a small 4-bit Qwen3-MoE on permissively licensed Python.

Three steps on the CPU prepare the data, then this script trains (on a GPU through
MLX's CUDA backend, or on the CPU) and writes an mlx-lm model directory:

    python training/corpus.py --packages PKGS --out /tmp/emb/corpus     # files + manifest
    python training/tokenizer.py --vocab 4096 --out /tmp/emb/tok         # byte-level BPE
    python training/data.py --tokenizer /tmp/emb/tok/4096                # tokens.npz
    python training/train_embedded.py --data /tmp/emb/tokens.npz --out OUT --time-budget 300

With ``--steps 0`` (the default) the number of steps is chosen after the warmup
from the measured step time so that training fits ``--time-budget``; the count
used is recorded in ``training.json`` and ``--steps N`` repeats that run. Weights
are quantized to 4 bits with float32 scales (bf16 scales are several times slower
on the MLX CPU backend), routers to 8 bits, as ``mlx_lm.convert`` does. The
tokenizer files are not written here: copy them from the tokenizer folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_lm.models import qwen3_moe, switch_layers
from mlx_lm.utils import quantize_model, save_config

LOAD_BALANCE_COEF = 0.003
EOS_IDS = [0, 2]  # <|endoftext|>, <|im_end|> (tokenizer.SPECIAL_TOKENS order)


def model_args(a) -> dict:
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": a.vocab,
        "hidden_size": a.hidden,
        "num_hidden_layers": a.layers,
        "intermediate_size": 2 * a.hidden,
        "num_attention_heads": a.hidden // 64,
        "num_key_value_heads": max(a.hidden // 128, 1),
        "head_dim": 64,
        "num_experts": a.experts,
        "num_experts_per_tok": a.top_k,
        "moe_intermediate_size": a.expert_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4 * a.context,
        "tie_word_embeddings": True,
    }


def dense_switch_glu(self, x, indices):
    """Every expert on every token, then the chosen ones: the same function as SwitchGLU's
    gather path, for backends whose gather_mm has no gradient (16x the expert FLOPs at top-2 of 32)."""
    lead, (n_exp, m, h) = x.shape[:-1], self.gate_proj.weight.shape
    flat = x.reshape(-1, h)
    g = (flat @ self.gate_proj.weight.reshape(n_exp * m, h).T).reshape(-1, n_exp, m)
    u = (flat @ self.up_proj.weight.reshape(n_exp * m, h).T).reshape(-1, n_exp, m)
    act = (nn.silu(g) * u).transpose(1, 0, 2)  # [experts, tokens, m]
    y = (act @ self.down_proj.weight.transpose(0, 2, 1)).transpose(1, 0, 2).reshape(*lead, n_exp, h)
    return mx.take_along_axis(y, indices[..., None], axis=-2)


# ---------------------------------------------------------------- model and loss


class RecordedGate(nn.Linear):
    """A router that keeps its logits so the loss can add a load-balancing term."""

    log: list = []

    def __call__(self, x):
        y = super().__call__(x)
        RecordedGate.log.append(y)
        return y


def swap_gates(model, cls) -> None:
    for layer in model.layers:
        old = layer.mlp.gate
        new = cls(old.weight.shape[1], old.weight.shape[0], bias=False)
        new.weight = old.weight
        layer.mlp.gate = new


def load_balance_loss(logits: mx.array, top_k: int) -> mx.array:
    """Switch-Transformer auxiliary loss: experts * sum(fraction routed * mean prob); 1.0 when uniform."""
    n = logits.shape[-1]
    probs = mx.softmax(logits.reshape(-1, n).astype(mx.float32), axis=-1)
    chosen = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[:, :top_k]
    routed = mx.zeros_like(probs)
    routed = mx.put_along_axis(routed, chosen, mx.array(1.0), axis=-1)
    fraction = mx.stop_gradient(routed.mean(axis=0)) / top_k
    return n * (fraction * probs.mean(axis=0)).sum()


def losses(model, inputs, targets, top_k):
    RecordedGate.log.clear()
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")
    aux = sum(load_balance_loss(g, top_k) for g in RecordedGate.log) / len(RecordedGate.log)
    RecordedGate.log.clear()
    return ce, aux


def batches(stream: np.ndarray, batch: int, context: int, rng: np.random.Generator):
    starts = rng.integers(0, len(stream) - context - 1, size=batch)
    windows = np.stack([stream[s : s + context + 1] for s in starts]).astype(np.int32)
    return mx.array(windows[:, :-1]), mx.array(windows[:, 1:])


def fixed_windows(stream: np.ndarray, count: int, context: int) -> np.ndarray:
    step = max((len(stream) - context - 1) // count, 1)
    return np.stack([stream[i * step : i * step + context + 1] for i in range(count)]).astype(np.int32)


def mean_loss(model, windows: np.ndarray, batch: int = 16) -> float:
    total, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = mx.array(windows[i : i + batch])
        logits = model(w[:, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, w[:, 1:], reduction="sum")
        total += loss.item()
        n += w[:, 1:].size
    return total / n


def unigram_loss(train: np.ndarray, held: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one-smoothed training unigram counts."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[held].mean())


def parameter_counts(args: dict) -> dict:
    h, L, e, k, mi = (args[x] for x in ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "moe_intermediate_size"))
    heads, kv, hd = args["num_attention_heads"], args["num_key_value_heads"], args["head_dim"]
    attn = h * hd * (2 * heads + 2 * kv) + 2 * hd
    expert = 3 * h * mi
    norms = 2 * h
    embed = args["vocab_size"] * h
    total = embed + h + L * (attn + norms + h * e + e * expert)
    active = embed + h + L * (attn + norms + h * e + k * expert)
    return {"total": total, "active_per_token": active, "per_expert": expert}


# ---------------------------------------------------------------- saving


def save_sharded(model, out: Path, shards: int) -> None:
    """Write weights as ``model-0000i-of-0000n.safetensors`` plus the HF index, split by bytes."""
    weights = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in weights.values())
    names = list(weights)
    groups, acc = [[] for _ in range(shards)], 0
    for name in names:
        groups[min(acc * shards // total, shards - 1)].append(name)
        acc += weights[name].nbytes
    groups = [g for g in groups if g]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        mx.save_safetensors(str(out / fname), {n: weights[n] for n in group}, metadata={"format": "mlx"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- main


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step <= warmup:
        return peak * step / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return peak / 10 + (peak - peak / 10) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def nvidia_smi(field: str) -> str | None:
    """One field of GPU 0 as nvidia-smi reports it (MLX's CUDA device_info may not say), None without one."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def card_memory() -> int | None:
    size = nvidia_smi("memory.total")  # MiB
    return int(size) << 20 if size and size.isdigit() else None


def cap_memory(fraction: float) -> int | None:
    """Cap MLX's memory at a fraction of the device's: MLX CUDA allocates managed memory,
    and asking for more than the card has free can hang the GPU for everyone on it."""
    if mx.default_device().type == mx.cpu:
        return None
    info = mx.device_info()
    size = info.get("memory_size") or info.get("total_memory") or card_memory()  # Metal / CUDA / nvidia-smi
    size = size or 64 << 30  # unknown card: assume a small one
    limit = int(size * fraction)
    mx.set_memory_limit(limit)
    return limit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/emb/tokens.npz"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=0, help="0: as many as fit --time-budget")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds of training steps when --steps is 0")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-size", type=int, default=192)
    ap.add_argument("--load-balance", type=float, default=LOAD_BALANCE_COEF,
                    help="weight of the Switch-Transformer load-balancing loss")
    ap.add_argument("--dense-experts", action="store_true", help="train through dense_switch_glu")
    ap.add_argument("--memory-fraction", type=float, default=0.6)
    ap.add_argument("--eval-windows", type=int, default=256)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    memory_limit = cap_memory(a.memory_fraction)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    log(f"mlx {mx.__version__} on {mx.default_device()}, memory limit {memory_limit}")
    data = np.load(a.data)
    train_ids, held_ids = data["train"], data["held_out"]
    rng = np.random.default_rng(a.seed)
    mx.random.seed(a.seed)
    args = model_args(a)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(args))
    model.set_dtype(mx.float32)
    swap_gates(model, RecordedGate)
    mx.eval(model.parameters())
    gather_switch_glu = switch_layers.SwitchGLU.__call__
    if a.dense_experts:
        switch_layers.SwitchGLU.__call__ = dense_switch_glu
    top_k = args["num_experts_per_tok"]
    optimizer = optim.AdamW(learning_rate=0.0, weight_decay=0.01)

    def objective(model, x, y):
        ce, aux = losses(model, x, y, top_k)
        return ce + a.load_balance * aux, (ce, aux)

    grad_fn = nn.value_and_grad(model, objective)
    state = [model.state, optimizer.state]

    def step(x, y):
        (_, (ce, aux)), grads = grad_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return ce, aux

    step = mx.compile(step, inputs=state, outputs=state)
    total = a.steps or 10**9
    history, t_probe, i, first_steps_seconds = [], None, 0, 0.0
    t_train = time.perf_counter()
    while i < total:
        i += 1
        optimizer.learning_rate = mx.array(lr_at(i, total, a.warmup, a.lr))
        x, y = batches(train_ids, a.batch, a.context, rng)
        ce, aux = step(x, y)
        mx.eval(state, ce, aux)
        history.append((ce.item(), aux.item()))
        if i == 10:  # compile and kernel JIT are behind us
            t_probe = time.perf_counter()
            first_steps_seconds = t_probe - t_train
        if i == a.warmup and not a.steps:
            per_step = (time.perf_counter() - t_probe) / (a.warmup - 10)
            total = a.warmup + int((a.time_budget - (time.perf_counter() - t_train)) / per_step)
            log(f"{per_step * 1000:.1f} ms/step -> {total} steps")
        if i % 100 == 0 or i == total:
            el = time.perf_counter() - t_train
            log(f"step {i}/{total} loss {np.mean([h[0] for h in history[-100:]]):.3f} aux {aux.item():.3f} "
                f"({i * a.batch * a.context / el:.0f} tok/s)")
    train_seconds = time.perf_counter() - t_train

    swap_gates(model, nn.Linear)
    switch_layers.SwitchGLU.__call__ = gather_switch_glu  # evaluate and ship the stock path
    train_eval = fixed_windows(train_ids, a.eval_windows, a.context)
    held_eval = fixed_windows(held_ids, a.eval_windows, a.context)
    losses_f32 = {"train": mean_loss(model, train_eval), "held_out": mean_loss(model, held_eval)}
    log(f"float32: train {losses_f32['train']:.3f}, held-out {losses_f32['held_out']:.3f}")
    config = {**args, "torch_dtype": "float32", "eos_token_id": EOS_IDS}
    model, config = quantize_model(model, config, group_size=64, bits=4)  # qwen3_moe's predicate keeps routers at 8 bits
    losses_q4 = {"train": mean_loss(model, train_eval), "held_out": mean_loss(model, held_eval)}
    unigram = unigram_loss(train_ids, held_eval[:, 1:].reshape(-1), a.vocab)
    log(f"4-bit: train {losses_q4['train']:.3f}, held-out {losses_q4['held_out']:.3f}; unigram baseline {unigram:.3f}")

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    save_sharded(model, out, max(2, math.ceil(sum(v.nbytes for v in weights.values()) / (12 << 20))))
    save_config(config, out / "config.json")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS_IDS}, indent=2) + "\n")
    bytes_per_token = float(data["held_out_bytes"]) / len(held_ids)
    record = {
        "seed": a.seed,
        "steps": i,
        "warmup": a.warmup,
        "batch": a.batch,
        "context": a.context,
        "tokens_seen": i * a.batch * a.context,
        "learning_rate": a.lr,
        "load_balance_coef": a.load_balance,
        "fim_rate": float(data["fim_rate"]),
        "dense_experts": a.dense_experts,
        "tokens_train": int(len(train_ids)),
        "tokens_held_out": int(len(held_ids)),
        "held_out_bytes_per_token": bytes_per_token,
        "parameters": parameter_counts(args),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_train_loss_running": float(np.mean([h[0] for h in history[-100:]])),
        "loss_float32": losses_f32,
        "loss_4bit": losses_q4,
        "bits_per_byte_4bit": losses_q4["held_out"] / math.log(2) / bytes_per_token,
        "unigram_baseline_held_out": unigram,
        "eval_tokens": int(held_eval[:, 1:].size),
        "device": str(mx.default_device()),
        "card": nvidia_smi("name") if mx.default_device().type == mx.gpu else None,
        "memory_limit": memory_limit,
        "first_10_steps_seconds": round(first_steps_seconds, 1),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, mlx {mx.__version__}",
        "tokens_per_second": round(i * a.batch * a.context / train_seconds, 1),
        "loss_curve": [[j + 1, round(float(np.mean([h[0] for h in history[max(0, j - 99) : j + 1]])), 4)]
                       for j in range(99, len(history), 100)],
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
