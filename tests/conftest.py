"""Shared fixtures: a test model and daemons on private runtime dirs.

- ``test_model``: the embedded model when it is there (real routing), else a
  tiny random Qwen3-MoE built once per session (``tiny_model``).
- ``daemon``: a factory, ``daemon(model=None, *extra_args, ready=True)`` ->
  ``DaemonProcess``; every daemon it starts (and its engine) is killed at the
  end of the test.
- ``shared_daemon``: one ready daemon on ``test_model`` per test module, for
  tests that do not break it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# Models


def make_tiny_model(out: Path, seed: int = 0, extra_special_tokens: tuple = ()) -> Path:
    """A random 2-layer Qwen3-MoE (8 experts, top-2, float32) with a small byte-level BPE tokenizer and chat template.

    ``extra_special_tokens`` become added tokens of the tokenizer (e.g. FIM markers) and part of the vocabulary.
    """
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.models import qwen3_moe
    from mlx_lm.utils import save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, this is moed serving a model.",
        "def main():\n    return 42\n",
        "user assistant system: a chat between friends",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template})
    )
    config = dict(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=32, rms_norm_eps=1e-6, vocab_size=tok.get_vocab_size(),
        rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=4096, norm_topk_prob=True,
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )
    mx.random.seed(seed)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    save_model(out, model)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


LONG_PROMPTS = ("hello world", "the the the the", "aaaa", "1 2 3 4 5 6 7 8 9 10 11 12", "def main():")


def find_long_generation(client, seconds: float = 3.0) -> tuple[str, int, float]:
    """(prompt, max_tokens, measured seconds) of a greedy request that runs to max_tokens, for about ``seconds``.

    For tests that need a request to stay busy (cancel, disconnect, queue
    limits) whatever the test model: the first of LONG_PROMPTS that the model
    does not end early with EOS.
    """
    probe = client.complete(LONG_PROMPTS[0], max_tokens=64, temperature=0)
    rate = probe.timings.get("decode_tok_s") or 50.0
    max_tokens = int(min(4000, max(200, rate * seconds)))
    for prompt in LONG_PROMPTS:
        ref = client.complete(prompt, max_tokens=max_tokens, temperature=0)
        if ref.finish_reason == "length":
            return prompt, max_tokens, ref.timings["total_s"]
    raise AssertionError(f"every prompt of {LONG_PROMPTS} ends before {max_tokens} tokens on this model")


def wait_for(predicate, timeout=30.0, interval=0.02):
    """Poll ``predicate`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def short_tmpdir(prefix: str = "moed-") -> Path:
    """A temp dir under /tmp: ipc socket paths must stay under ~100 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="session", autouse=True)
def private_user_dirs():
    """Keep every test (and every daemon it starts) away from the user's own config,
    profiles and warm-start state: a test run must neither read nor leave them."""
    root = Path(tempfile.mkdtemp(prefix="moed-user-"))
    saved = {k: os.environ.get(k) for k in ("MOED_STATE_DIR", "MOED_PROFILE_DIR", "MOED_CONFIG")}
    os.environ["MOED_STATE_DIR"] = str(root / "state")
    os.environ["MOED_PROFILE_DIR"] = str(root / "profiles")
    os.environ["MOED_CONFIG"] = str(root / "config.toml")
    try:
        yield root
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model():
    path = short_tmpdir("moed-model-")
    try:
        yield make_tiny_model(path / "tiny")
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def test_model(request) -> Path:
    """The embedded model if it has been trained into the tree, else the tiny random one."""
    from moed.models import embedded_model_path

    embedded = embedded_model_path()
    if (embedded / "config.json").is_file() and any(embedded.glob("*.safetensors")):
        return embedded
    return request.getfixturevalue("tiny_model")


# --------------------------------------------------------------------------
# Daemons


class DaemonProcess:
    """One ``moed serve`` started by a test, on its own runtime and log dirs."""

    def __init__(self, model: Path, args: tuple, env: dict | None = None):
        self.model = model
        self.runtime_dir = short_tmpdir()
        self.log_dir = self.runtime_dir / "logs"
        self.socket = self.runtime_dir / "moed.sock"
        self.env = {**os.environ, "MOED_RUNTIME_DIR": str(self.runtime_dir), "MOED_LOG_DIR": str(self.log_dir), **(env or {})}
        cmd = [sys.executable, "-m", "moed.daemon", "serve", *(["--model", str(model)] if model else []), *map(str, args)]
        # A file, not a pipe: nobody reads a pipe while the daemon runs, and once its 64 KiB fill up the
        # daemon blocks in its next log write (a long soak wedged the front that way).
        self._out = tempfile.TemporaryFile()
        # A session of its own: cleanup kills the whole group, engine included, whatever state it is in.
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, start_new_session=True, stdout=self._out, stderr=subprocess.STDOUT)
        self.engine_pids: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, **kwargs):
        from moed_client import Client

        return Client(self.socket, **kwargs)

    def async_client(self, **kwargs):
        from moed_client import AsyncClient

        return AsyncClient(self.socket, **kwargs)

    def wait_socket(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"moed exited with {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"moed did not bind {self.socket} in {timeout} s")
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Poll status until the model is loaded; the status."""
        self.wait_socket(timeout)
        deadline = time.monotonic() + timeout
        with self.client(timeout=15) as c:
            while True:
                status = c.status()
                if status.get("engine_pid"):
                    self.engine_pids.add(status["engine_pid"])
                if status["state"] == "ready":
                    return status
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moed not ready (state {status['state']}): {self.output()}")
                time.sleep(0.05)

    def engine_pid(self) -> int:
        with self.client(timeout=15) as c:
            pid = c.status()["engine_pid"]
        self.engine_pids.add(pid)
        return pid

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        self._out.seek(0)
        return self._out.read().decode(errors="replace")

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))

    def kill(self) -> None:
        """Kill the daemon and every engine it ran, then remove its dirs."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.engine_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def _factory(default_model: Path):
    started: list[DaemonProcess] = []

    def start(model: Path | None = None, *args, ready: bool = True, env: dict | None = None, timeout: float = 60.0) -> DaemonProcess:
        d = DaemonProcess(model or default_model, args, env)
        started.append(d)
        if ready:
            d.wait_ready(timeout)
        return d

    return start, started


@pytest.fixture
def daemon(test_model):
    """Factory: ``daemon(model=None, *extra_args, ready=True, env=None)``; all are killed after the test."""
    start, started = _factory(test_model)
    try:
        yield start
    finally:
        for d in started:
            d.kill()


@pytest.fixture(scope="module")
def shared_daemon(test_model):
    """One ready daemon on the test model, shared by a module's tests."""
    start, started = _factory(test_model)
    try:
        yield start()
    finally:
        for d in started:
            d.kill()
