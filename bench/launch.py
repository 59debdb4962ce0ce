"""Start ``moed serve`` on private runtime and log dirs, and build the tiny test model.

Shared by the test suite (tests/conftest.py) and the benchmarks, which both need
a daemon that touches none of the user's own sockets, logs or state, and that
is killed with everything it started.
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

from bench.tokenizer import write_tokenizer

REPO = Path(__file__).resolve().parent.parent


def http_auth() -> dict:
    """The header the HTTP gateway's token asks for (the token file of this user, or of the tests' private dirs)."""
    from moed.doors import http_token

    token = http_token.load()
    return {"Authorization": f"Bearer {token}"} if token else {}
TINY_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is moed serving a model.",
    "def main():\n    return 42\n",
    "user assistant system: a chat between friends",
] * 20


def short_tmpdir(prefix: str = "moed-") -> Path:
    """A temp dir under /tmp: ipc socket paths must stay under ~100 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def make_tiny_model(out: Path, seed: int = 0, extra_special_tokens: tuple = ()) -> Path:
    """A random 2-layer Qwen3-MoE (8 experts, top-2, float32) with a small byte-level BPE tokenizer and chat template.

    ``extra_special_tokens`` become added tokens of the tokenizer (e.g. FIM markers) and part of the vocabulary.
    """
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.models import qwen3_moe
    from mlx_lm.utils import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out, 400, TINY_CORPUS, extra_special_tokens)
    config = dict(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=32, rms_norm_eps=1e-6, vocab_size=tok["vocab_size"],
        rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=4096, norm_topk_prob=True,
        eos_token_id=tok["eos_token_id"],
    )
    mx.random.seed(seed)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    save_model(out, model)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


class DaemonProcess:
    """One ``moed serve`` started by a test or a benchmark, on its own runtime and log dirs."""

    def __init__(self, model: Path, args: tuple, env: dict | None = None):
        self.model = model
        self.runtime_dir = short_tmpdir()
        self.log_dir = self.runtime_dir / "logs"
        self.socket = self.runtime_dir / "moed.sock"
        self.env = {**os.environ, "MOED_RUNTIME_DIR": str(self.runtime_dir), "MOED_LOG_DIR": str(self.log_dir), **(env or {})}
        cmd = [sys.executable, "-m", "moed.front", "serve", *(["--model", str(model)] if model else []), *map(str, args)]
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
            # an engine run as an mlx.launch job leads a process group of its own: its ranks go with it
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
