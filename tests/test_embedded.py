"""The shipped default model: layout, format, determinism, and that it learned Python."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.models.switch_layers import QuantizedSwitchLinear  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from moed.models import embedded_model_path  # noqa: E402

MODEL = embedded_model_path()
FIB = "def fibonacci(n):\n"
KEYWORDS = {"return", "if", "else", "elif", "for", "while", "in", "not", "is", "None", "and", "or", "self", "def", "raise", "True", "False"}


@pytest.fixture(scope="module")
def loaded():
    return mlx_lm.load(str(MODEL))


def generate(model, tokenizer, prompt, tokens=40, sampler=None):
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=tokens, sampler=sampler)


def test_directory_layout_and_size():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] > 0
    index = json.loads((MODEL / "model.safetensors.index.json").read_text())
    shards = sorted(MODEL.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s.name) for s in shards)
    stored = {}
    for shard in shards:
        for name, value in mx.load(str(shard)).items():
            stored[name] = (shard.name, value)
    assert index["weight_map"] == {name: shard for name, (shard, _) in stored.items()}
    assert index["metadata"]["total_size"] == sum(v.nbytes for _, v in stored.values())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (MODEL / name).is_file()
    assert json.loads((MODEL / "tokenizer_config.json").read_text())["chat_template"]
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= 50 * 1000 * 1000  # issue 21: at most about 50 MB in the package


def test_loads_in_under_a_second():
    import time

    mlx_lm.load(str(MODEL))  # page cache warm, imports done
    t0 = time.perf_counter()
    mlx_lm.load(str(MODEL))
    assert time.perf_counter() - t0 < 1.0


def test_quantized_like_mlx_community(loaded):
    model, _ = loaded
    config = json.loads((MODEL / "config.json").read_text())
    assert config["num_hidden_layers"] >= 4 and config["num_experts"] >= 16
    assert 2 <= config["num_experts_per_tok"] <= 4
    for layer in model.layers:
        experts = layer.mlp.switch_mlp
        for proj in (experts.gate_proj, experts.up_proj, experts.down_proj):
            assert isinstance(proj, QuantizedSwitchLinear) and proj.bits == 4
            assert proj.scales.dtype == mx.float32  # bf16 scales are several times slower on the CPU
        router = layer.mlp.gate
        assert isinstance(router, nn.QuantizedLinear) and router.bits == 8


def test_special_tokens_and_chat_template(loaded):
    _, tokenizer = loaded
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"):
        assert len(tokenizer.encode(token)) == 1, token
    assert tokenizer.eos_token == "<|endoftext|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_round_trips_python(loaded):
    _, tokenizer = loaded
    source = Path(json.__file__).read_text()[:2000]
    assert tokenizer.decode(tokenizer.encode(source)) == source


def test_greedy_generation_is_deterministic(loaded):
    model, tokenizer = loaded
    first = generate(model, tokenizer, FIB)
    assert generate(model, tokenizer, FIB) == first


def test_newlines_are_tokens_of_their_own(loaded):
    # A newline merged with the next line's indentation makes a prompt ending in "\n" out of
    # distribution (greedy decoding then repeats newlines).
    _, tokenizer = loaded
    source = "def f(x):\n    if x:\n\n        return x\n"
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(source)]
    assert "".join(pieces) == source
    assert all(p == "\n" or "\n" not in p for p in pieces), pieces
    assert pieces.count("\n") == source.count("\n")


def test_greedy_continuation_is_python_shaped(loaded):
    model, tokenizer = loaded
    # Decoded whole: mlx-lm's streaming detokenizer drops the first token's leading space.
    first = tokenizer.decode([r.token for r in mlx_lm.stream_generate(model, tokenizer, FIB, max_tokens=48)])
    # A trained model indents the body of a def; a random one almost never emits indentation first.
    assert first.startswith(("    ", "\t")), repr(first)
    assert first.strip(), repr(first)  # not just blank lines
    words = set(re.findall(r"[A-Za-z_]+", first))
    assert words & KEYWORDS, repr(first)
    assert re.search(r"[A-Za-z_]\w*[.(]", first), repr(first)  # an attribute access or a call


def distinct_4gram_ratio(tokens):
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams)


@pytest.mark.parametrize("prompt", [FIB, "class Stack:\n", "import os\n\n\ndef list_files(path):\n", "total = 0\nfor i in range(10):\n"])
def test_greedy_continuation_does_not_loop(loaded, prompt):
    # The previous model looped on `self.get_f_f_f_f...` (issue 21): 64 greedy tokens must keep
    # at least 60% of their 4-grams distinct.
    model, tokenizer = loaded
    tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=64)]
    assert len(tokens) == 64 or tokens[-1] in tokenizer.eos_token_ids
    assert distinct_4gram_ratio(tokens) >= 0.6, repr(tokenizer.decode(tokens))


def test_sampling_is_deterministic_under_a_seed(loaded):
    model, tokenizer = loaded
    sampler = make_sampler(temp=0.9, top_p=0.95)
    runs = []
    for _ in range(2):
        mx.random.seed(1234)
        runs.append(generate(model, tokenizer, "import os\n", tokens=24, sampler=sampler))
    assert runs[0] == runs[1]


def test_model_predicts_python_clearly_better_than_a_unigram_baseline(loaded):
    model, tokenizer = loaded
    import importlib
    import inspect
    import textwrap

    import numpy as np

    counts = np.ones(tokenizer.vocab_size)
    for name in ("os", "json.decoder", "string", "heapq", "fractions", "shlex", "bisect", "csv"):
        np.add.at(counts, tokenizer.encode(inspect.getsource(importlib.import_module(name))), 1)
    tokens = tokenizer.encode(Path(textwrap.__file__).read_text())[:513]
    unigram = float(-np.log(counts / counts.sum())[tokens[1:]].mean())
    x = mx.array(tokens)[None]
    loss = nn.losses.cross_entropy(model(x[:, :-1]).astype(mx.float32), x[:, 1:], reduction="mean").item()
    assert loss < unigram - 2.0, (loss, unigram)
    assert loss < 0.55 * math.log(tokenizer.vocab_size), loss  # 4.03 nats here (ln 4096 = 8.32)
