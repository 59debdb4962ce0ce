"""Write MODEL_CARD.md for the embedded model from what can be measured now.

    python training/model_card.py [--model moed/embedded/model] [--out MODEL_CARD.md]

Training figures come from the model's ``training.json`` (written by
train_embedded.py); load time, the quality figures (training/quality.py) and the routing table are
measured by this command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.routing_stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "moed" / "embedded" / "model")
    ap.add_argument("--out", type=Path, default=ROOT / "MODEL_CARD.md")
    ap.add_argument("--corpus", type=Path, default=Path("/tmp/emb/corpus"), help="held-out files (training/corpus.py)")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    import mlx_lm

    t1 = time.perf_counter()
    model, tokenizer = mlx_lm.load(str(a.model))
    load_s = time.perf_counter() - t1
    import_s = t1 - t0

    from bench.routing_stats import DEFAULT_MODULES, markdown
    from moed.experts.routing import text_statistics
    import importlib
    import inspect

    texts = [inspect.getsource(importlib.import_module(m)) for m in DEFAULT_MODULES]
    stats = text_statistics(model, tokenizer, texts, max_tokens=256)
    from quality import TARGETS, measure

    q = measure(model, tokenizer, a.corpus)
    import gzip

    corpus = json.loads(gzip.open(ROOT / "training" / "corpus_manifest.json.gz").read())
    ho = q["held_out"]
    gen_rows = "\n".join(
        f"| {name} | `{g['prompt']!r}` | {g['distinct_4gram']:.3f} | {'yes' if g['parses'] else 'no'} |"
        for name, g in q["generations"].items())
    samples = "\n\n".join(f"`{g['prompt']!r}` ->\n\n```python\n{g['prompt']}{g['continuation']}\n```"
                           for g in q["generations"].values())
    fims = "\n\n".join(f"prefix `{f['before']!r}`, suffix `{f['after']!r}` -> middle `{f['middle']!r}` "
                        f"(whole parses: {'yes' if f['parses'] else 'no'})" for f in q["fim"])
    rec = json.loads((a.model / "training.json").read_text())
    cfg = json.loads((a.model / "config.json").read_text())
    size = sum(p.stat().st_size for p in a.model.iterdir() if p.is_file())
    p = rec["parameters"]
    s = stats["summary"]

    card = f"""# Model card: moed embedded default model

The model `moectl start` serves when no `--model` is given: a small 4-bit
Qwen3-MoE trained by the project itself (`training/`) on Python's standard
library and permissively licensed Python packages, shipped as package data in
`moed/embedded/model/`. It is there so that moed can be tried offline and every
test has a real MoE model with real, skewed routing. It writes Python-shaped
code and docstrings; it is not a useful assistant. To serve a real model:
`moectl start --model mlx-community/Qwen3-30B-A3B-4bit`.

This card was written by `python training/model_card.py` (training figures
from `moed/embedded/model/training.json`, the rest measured by that command on
the CPU, with `training/quality.py`).

## Quality (issue 21's targets)

| target | measured | met |
|---|---|---|
| held-out loss <= {TARGETS['held_out_loss']} nats/token | {ho['nats_per_token']:.3f} nats/token, {ho['bits_per_byte']:.3f} bits/byte ({ho['tokens']:,} tokens: {ho['tokens'] // 512} fixed 512-token windows of the held-out files; {ho['bytes_per_token']:.2f} bytes/token) | {'yes' if ho['nats_per_token'] <= TARGETS['held_out_loss'] else 'no'} |
| 64 greedy tokens per prompt, distinct 4-gram ratio >= {TARGETS['distinct_4gram']} | lowest {q['min_distinct_4gram']:.3f} | {'yes' if q['min_distinct_4gram'] >= TARGETS['distinct_4gram'] else 'no'} |
| most continuations parse once trimmed to their last complete line | {q['parsing']} of {len(q['generations'])} | {'yes' if 2 * q['parsing'] > len(q['generations']) else 'no'} |
| FIM infill returns code that fits | {sum(f['parses'] for f in q['fim'])} of {len(q['fim'])} infills make the file parse | {'yes' if all(f['parses'] for f in q['fim']) else 'no'} |

The previous model (2048-token vocabulary, 4 layers of 128, stdlib only, 1.35M
training tokens on a CPU) scores 4.901 nats/token, 2.621 bits/byte on these
held-out files (its tokenizer: 2.70 bytes/token; 48 windows of 256 tokens, where
this model scores 3.152 nats/token, 1.445 bits/byte; `quality.held_out_loss(model,
tokenizer, corpus, 48, 256)`), and greedy decoding looped on
`self.assertEqual(self.get_f_f_f...`.

| prompt | | distinct 4-grams | parses |
|---|---|---|---|
{gen_rows}

### Greedy samples (64 tokens)

{samples}

### Fill in the middle

{fims}

## Shape

| | |
|---|---|
| architecture | mlx-lm `qwen3_moe` (`layer.mlp.switch_mlp` is a `SwitchGLU`) |
| layers | {cfg['num_hidden_layers']} (all MoE) |
| hidden size | {cfg['hidden_size']}, {cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} KV heads of {cfg['head_dim']} |
| experts | {cfg['num_experts']} per layer, top-{cfg['num_experts_per_tok']}, expert intermediate size {cfg['moe_intermediate_size']} |
| vocabulary | {cfg['vocab_size']} (byte-level BPE), tied embeddings |
| context trained | {rec['context']} tokens (RoPE, `max_position_embeddings` {cfg['max_position_embeddings']}) |
| parameters | {p['total']:,} total, {p['active_per_token']:,} active per token ({p['per_expert']:,} per expert) |
| quantization | 4-bit affine, group size {cfg['quantization']['group_size']}, **float32** scales/biases (bf16 scales are several times slower on the MLX CPU backend); routers (`mlp.gate`) 8-bit, written as per-module overrides as `mlx_lm.convert` does |
| files | {size / 1e6:.1f} MB: `config.json`, shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json` (chat template inlined), `special_tokens_map.json`, `generation_config.json`, `training.json` |

## Tokenizer and special tokens

Byte-level BPE trained with `tokenizers` on the training files
(`training/tokenizer.py`). Newlines are split off before the GPT-2 style
byte-level pre-tokenizer, so `\\n` is always a token of its own and never merges
with the next line's indentation: a prompt ending in a newline is in
distribution. The vocabulary size was chosen by measuring held-out compression:
4096 tokens give 3.148 bytes/token, 8192 give 3.410 (8% fewer tokens for twice
the embedding and output-layer cost on the CPU), so 4096. Special tokens:
`<|endoftext|>` (eos, pad), `<|im_start|>`, `<|im_end|>` (ChatML template; the
model never saw chat data), and fill-in-the-middle `<|fim_prefix|>`,
`<|fim_suffix|>`, `<|fim_middle|>`. {rec['fim_rate']:.0%} of training chunks were
rewritten StarCoder-style (PSM), cut at line starts (two thirds) or anywhere (a
third) (`training/data.py`). To infill, prompt with
`<|fim_prefix|>{{before}}<|fim_suffix|>{{after}}<|fim_middle|>` and stop at
`<|endoftext|>`. Config `eos_token_id` is {cfg['eos_token_id']} (`<|endoftext|>`, `<|im_end|>`).

## Corpus

`training/corpus.py`: the `*.py` files of the standard library of Python
{corpus['packages'][0]['version']} and of {len(corpus['packages']) - 1} packages from the package index (wheels or
sdists as downloaded, never installed), each kept only when its metadata names
a permissive license; vendored copies (`_vendor/`) are left out. Also left out:
{corpus['excluded']}. Held out when `{corpus['held_out_rule']}`.
{corpus['files_train']:,} train files ({corpus['bytes_train']:,} bytes, {rec['tokens_train']:,} tokens), {corpus['files_held_out']} held-out files
({corpus['bytes_held_out']:,} bytes, {rec['tokens_held_out']:,} tokens). Every package, version, license and file
(path, bytes, sha1 prefix, split) is in `training/corpus_manifest.json.gz`.

## Training

| | |
|---|---|
| commands | `corpus.py`, `tokenizer.py --vocab 4096 8192`, `data.py --tokenizer .../4096`, then `{rec['command']}` |
| seed | {rec['seed']} (MLX init, the numpy generator for FIM and batches) |
| steps | {rec['steps']:,} x batch {rec['batch']} x {rec['context']} tokens = {rec['tokens_seen']:,} tokens seen (about {rec['tokens_seen'] / rec['tokens_train']:.0f} passes over the training tokens); the step count was chosen by the script from the measured step time to fit a 400 s budget (`--steps {rec['steps']}` repeats it) |
| optimizer | AdamW, peak lr {rec['learning_rate']}, {rec['warmup']} steps linear warmup then cosine to lr/10, grad clip 1.0, weight decay 0.01, float32 |
| load balancing | Switch-style auxiliary loss, coefficient {rec['load_balance_coef']} (modest: routing stays skewed) |
| device | one NVIDIA H100 80GB through MLX's CUDA backend (`{rec['device']}`, {rec['machine']}), MLX memory capped at 41.2 GB (60% of an assumed 64 GiB: this run read no card size; 48% of the card) |
| time | {rec['train_seconds']:.0f} s of training steps ({rec['tokens_per_second']:,.0f} tokens/s), {rec['total_seconds']:.0f} s in all (evaluation, quantization, saving); the first 10 steps of a fresh process spend about 100 s compiling CUDA kernels (not in this run: it followed a 300 s run at lr 3e-3 on the same machine, held-out 3.816 nats/token 4-bit) |

Losses at the end of training (nats per token, {rec['eval_tokens']:,} tokens of fixed windows, on the GPU):

| | train | held-out |
|---|---|---|
| float32, before quantization | {rec['loss_float32']['train']:.3f} | {rec['loss_float32']['held_out']:.3f} |
| shipped 4-bit | {rec['loss_4bit']['train']:.3f} | {rec['loss_4bit']['held_out']:.3f} |
| unigram baseline (add-one smoothed training token frequencies) | | {rec['unigram_baseline_held_out']:.3f} |

Running train loss over the last 100 steps: {rec['final_train_loss_running']:.3f}.

## Routing

Per-layer statistics from `moed.experts.routing` over the first 256 tokens of the
sources of {', '.join(DEFAULT_MODULES)} (teacher-forced), reproduced by
`python -m bench.routing_stats --markdown` (JSON without `--markdown`).
Reuse is the fraction of a token's experts that the previous token also
used; the uniform-routing value is in parentheses.

{markdown(stats)}

Mean normalized entropy {s['mean_normalized_entropy']:.3f} ({s['layers_entropy_below_0.95']} of {s['moe_layers']} layers below 0.95),
mean top-25% share {s['mean_top25_share']:.3f}, mean token-to-token reuse {s['mean_token_reuse']:.3f}.

## Known issues

- Held-out loss is above the 2.5 nats/token target (table above): the
  device budget allowed one {rec['train_seconds']:.0f} s run of this size, and the gap between train
  and held-out loss shows the {rec['tokens_train'] / 1e6:.1f}M-token corpus is already seen
  about {rec['tokens_seen'] / rec['tokens_train']:.0f} times; more permissive packages and a longer run are the way on.
- Greedy continuations after a `def` or `class` line open a docstring and write
  prose, so trimmed continuations often end inside an unclosed string and do
  not parse; FIM infills are not yet code that fits.
- Routing is skewed by design (weak load-balancing loss); see the table.
- Decoding on the CPU is slower than with the previous model (about 4.7x the
  active parameters per token, 6 layers instead of 4): 64 greedy tokens of the
  four quality prompts, two rounds each, ran at a median of about 88 tok/s
  against 150 tok/s for the previous model, measured alternately on the shared
  2-core machine under load 5-9 (noisy: 62-168 and 90-380 tok/s).

## Load time

`mlx_lm.load` took {load_s * 1000:.0f} ms (after {import_s:.1f} s importing mlx_lm), measured by this
command on a 2-core development machine shared with other work (page cache warm).
"""
    a.out.write_text(card)
    print(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
