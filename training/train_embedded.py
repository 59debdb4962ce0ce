"""Train moed's embedded default model: a tiny 4-bit Qwen3-MoE on Python's own sources.

Runs offline on a CPU in minutes, so every machine has a real MoE model with
real (skewed, persistent) routing. Everything is fixed by ``--seed`` and
``--steps``: the corpus is the standard library of the running interpreter,
read in sorted order, with a held-out split chosen by a hash of each path.

    python training/train_embedded.py --out moed/embedded/model

On Linux, MLX's wheel links the reference BLAS (about 3 GFLOP/s sgemm); run it
with OpenBLAS preloaded for about 3x the speed (recorded in training.json):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python training/train_embedded.py --out moed/embedded/model

Writes an mlx-lm model directory that stock ``mlx_lm.load`` reads, plus
``training.json`` with the seed, corpus, steps, timings and losses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_lm.models import qwen3_moe
from mlx_lm.utils import quantize_model, save_config

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

HELD_OUT_EVERY = 20  # one file in twenty, by path hash
CHUNK_CHARS = 2048  # documents are split into chunks before FIM and packing
LOAD_BALANCE_COEF = 0.003


def model_args(vocab_size: int, context: int) -> dict:
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_experts": 32,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4 * context,
        "tie_word_embeddings": True,
    }


# ---------------------------------------------------------------- corpus


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    return root, files


def is_held_out(relpath: str) -> bool:
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def read_corpus() -> dict:
    root, files = stdlib_files()
    train, held = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        (held if is_held_out(rel) else train).append(text)
    return {"root": str(root), "train": train, "held_out": held}


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Split at line boundaries into pieces of about ``size`` characters."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def fim(text: str, rng: np.random.Generator) -> str:
    """StarCoder-style prefix-suffix-middle transform at two random character cuts."""
    a, b = sorted(rng.integers(0, len(text) + 1, size=2))
    prefix, middle, suffix = text[:a], text[a:b], text[b:]
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}{middle}"


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Newlines are tokens of their own: merged with the next line's indentation, a prompt
    # ending in a bare "\n" is a token the model never saw, and greedy decoding then
    # repeats it. Runs of spaces (indentation) stay tokens of their own via ByteLevel's regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("\n"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX],
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"eos_token": EOS, "pad_token": EOS, "additional_special_tokens": config["additional_special_tokens"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def token_stream(tok, texts: list[str], rng: np.random.Generator, fim_rate: float) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    docs = []
    for text in texts:
        for piece in chunks(text):
            docs.append(fim(piece, rng) if rng.random() < fim_rate else piece)
    ids = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.int32)


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
    windows = np.stack([stream[s : s + context + 1] for s in starts])
    return mx.array(windows[:, :-1]), mx.array(windows[:, 1:])


def fixed_windows(stream: np.ndarray, count: int, context: int) -> np.ndarray:
    step = max((len(stream) - context - 1) // count, 1)
    return np.stack([stream[i * step : i * step + context + 1] for i in range(count)])


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


def blas_library() -> str:
    """The BLAS the MLX CPU backend resolved to (its matmul speed decides training time)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return "platform default"
    libs = {Path(line.split()[-1]).name for line in maps.read_text().splitlines() if "blas" in line.lower()}
    return ", ".join(sorted(libs)) or "unknown"


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "moed" / "embedded" / "model")
    ap.add_argument("--steps", type=int, default=330)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--fim-rate", type=float, default=0.4)
    ap.add_argument("--load-balance", type=float, default=LOAD_BALANCE_COEF,
                    help="weight of the Switch-Transformer load-balancing loss")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=64)
    a = ap.parse_args(argv)
    mx.set_default_device(mx.cpu)  # the recipe is defined on the CPU so any machine reproduces it
    t_start = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    rng = np.random.default_rng(a.seed)
    mx.random.seed(a.seed)
    corpus = read_corpus()
    log(f"corpus: {len(corpus['train'])} train files, {len(corpus['held_out'])} held-out files from {corpus['root']}")
    tok = train_tokenizer(corpus["train"], a.vocab)
    vocab_size = tok.get_vocab_size()
    log(f"tokenizer: byte-level BPE, {vocab_size} tokens")
    train_ids = token_stream(tok, corpus["train"], rng, a.fim_rate)
    held_ids = token_stream(tok, corpus["held_out"], np.random.default_rng(a.seed + 1), 0.0)
    log(f"tokens: {len(train_ids):,} train, {len(held_ids):,} held-out")

    args = model_args(vocab_size, a.context)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(args))
    model.set_dtype(mx.float32)
    swap_gates(model, RecordedGate)
    mx.eval(model.parameters())
    top_k = args["num_experts_per_tok"]

    warmup = max(a.steps // 20, 1)
    schedule = optim.join_schedules(
        [optim.linear_schedule(a.lr / 100, a.lr, warmup), optim.cosine_decay(a.lr, max(a.steps - warmup, 1), a.lr / 10)],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

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
    history = []
    t_train = time.perf_counter()
    for i in range(1, a.steps + 1):
        x, y = batches(train_ids, a.batch, a.context, rng)
        ce, aux = step(x, y)
        mx.eval(state, ce, aux)
        history.append((ce.item(), aux.item()))
        if i % 25 == 0 or i == a.steps:
            recent = np.mean([h[0] for h in history[-25:]])
            el = time.perf_counter() - t_train
            log(f"step {i}/{a.steps} loss {recent:.3f} aux {aux.item():.3f} ({i * a.batch * a.context / el:.0f} tok/s, eta {el / i * (a.steps - i):.0f}s)")
    train_seconds = time.perf_counter() - t_train
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    swap_gates(model, nn.Linear)
    train_eval = fixed_windows(train_ids, a.eval_windows, a.context)
    held_eval = fixed_windows(held_ids, a.eval_windows, a.context)
    losses_f32 = {"train": mean_loss(model, train_eval), "held_out": mean_loss(model, held_eval)}
    log(f"float32: train {losses_f32['train']:.3f}, held-out {losses_f32['held_out']:.3f}")

    config = {**args, "torch_dtype": "float32", "eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(IM_END)]}
    model, config = quantize_model(model, config, group_size=64, bits=4)  # qwen3_moe's predicate keeps routers at 8 bits
    losses_q4 = {"train": mean_loss(model, train_eval), "held_out": mean_loss(model, held_eval)}
    unigram = unigram_loss(train_ids, held_eval[:, 1:].reshape(-1), vocab_size)
    log(f"4-bit: train {losses_q4['train']:.3f}, held-out {losses_q4['held_out']:.3f}; unigram baseline {unigram:.3f}")

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors"):
        old.unlink()
    save_sharded(model, out, a.shards)
    save_config(config, out / "config.json")
    save_tokenizer(tok, out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}, indent=2) + "\n")
    record = {
        "seed": a.seed,
        "steps": a.steps,
        "batch": a.batch,
        "context": a.context,
        "tokens_seen": a.steps * a.batch * a.context,
        "learning_rate": a.lr,
        "load_balance_coef": a.load_balance,
        "fim_rate": a.fim_rate,
        "corpus": {
            "description": "*.py files of the Python standard library of the training interpreter",
            "python": platform.python_version(),
            "files_train": len(corpus["train"]),
            "files_held_out": len(corpus["held_out"]),
            "held_out_rule": f"sha1(relative path) % {HELD_OUT_EVERY} == 0",
            "tokens_train": int(len(train_ids)),
            "tokens_held_out": int(len(held_ids)),
        },
        "tokenizer": {"type": "byte-level BPE (tokenizers), newlines split off before byte-level pre-tokenization", "vocab_size": vocab_size, "special_tokens": SPECIAL_TOKENS},
        "parameters": parameter_counts(args),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_train_loss_running": float(np.mean([h[0] for h in history[-50:]])),
        "loss_float32": losses_f32,
        "loss_4bit": losses_q4,
        "unigram_baseline_held_out": unigram,
        "eval_tokens": int(held_eval[:, 1:].size),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, mlx {mx.__version__}",
        "blas": blas_library(),
        "load_average_1min": {"start": load_before and load_before[0], "end": load_after and load_after[0]},
        "tokens_per_second": round(a.steps * a.batch * a.context / train_seconds, 1),
        "loss_curve": [[i + 1, round(float(np.mean([h[0] for h in history[max(0, i - 24) : i + 1]])), 4)] for i in range(24, len(history), 25)],
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
