"""Shared fixtures: a test model and daemons on private runtime dirs.

- ``test_model``: the embedded model when it is there (real routing), else a
  tiny random Qwen3-MoE built once per session (``tiny_model``).
- ``daemon``: a factory, ``daemon(model=None, *extra_args, ready=True)`` ->
  ``DaemonProcess``; every daemon it starts (and its engine) is killed at the
  end of the test.
- ``shared_daemon``: one ready daemon on ``test_model`` per test module, for
  tests that do not break it.

The launcher (``DaemonProcess``) and the tiny model live in ``bench/launch.py``,
which the benchmarks use too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from bench.launch import DaemonProcess, make_tiny_model, short_tmpdir  # noqa: F401 (tests import them from here)


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


@pytest.fixture(scope="session", autouse=True)
def private_user_dirs():
    """Keep every test (and every daemon it starts) away from the user's own config,
    profiles and warm-start state: a test run must neither read nor leave them."""
    root = Path(tempfile.mkdtemp(prefix="moed-user-"))
    saved = {k: os.environ.get(k) for k in ("MOED_STATE_DIR", "MOED_PROFILE_DIR", "MOED_CONFIG", "MOED_HTTP_TOKEN_FILE")}
    os.environ["MOED_STATE_DIR"] = str(root / "state")
    os.environ["MOED_PROFILE_DIR"] = str(root / "profiles")
    os.environ["MOED_CONFIG"] = str(root / "config.toml")
    os.environ["MOED_HTTP_TOKEN_FILE"] = str(root / "config" / "http-token")
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


def _factory(default_model: Path):
    started: list[DaemonProcess] = []

    def start(model: Path | None = None, *args, ready: bool = True, env: dict | None = None, timeout: float = 60.0) -> DaemonProcess:
        d = DaemonProcess(model or default_model, args, env)
        started.append(d)
        if ready:
            d.wait_ready(timeout)
        return d

    return start, started


@contextlib.contextmanager
def gateway_daemon(model: Path, *args: str):
    """A ready daemon with the HTTP gateway on an ephemeral loopback port: ``(daemon, base url)``; killed after."""
    d = DaemonProcess(model, ("--http", "127.0.0.1:0", *args))
    try:
        yield d, d.wait_ready()["http"]
    finally:
        d.kill()


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
