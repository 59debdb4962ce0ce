"""``moed serve --kv-bits``: mlx-lm's quantized KV cache on the solo path; greedy tokens equal stock
mlx-lm's ``generate_step`` with the same kv_bits, kv_group_size and quantized_kv_start."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

PROMPT = "def fibonacci(n):"  # on the embedded model, 4-bit KV changes its first 40 greedy tokens
N = 40


@pytest.fixture(scope="module")
def stock(test_model):
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tokenizer = mlx_lm.load(str(test_model))
    ids = tokenizer.encode(PROMPT)

    def run(**kv):
        out = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=N, **kv):
            if token in tokenizer.eos_token_ids:
                break
            out.append(token)
        return out

    return run


def test_quantized_kv_equals_stock_one_request_at_a_time(daemon, stock):
    want = stock(kv_bits=4, kv_group_size=64, quantized_kv_start=0)
    d = daemon(None, "--kv-bits", "4", "--quantized-kv-start", "0")
    got = {}

    def ask(i):
        with d.client() as c:
            got[i] = c.complete(PROMPT, max_tokens=N, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[0].token_ids, got[1].token_ids] == [want, want]
    assert {got[0].timings["max_batch"], got[1].timings["max_batch"]} == {1}  # never batched: BatchGenerator has no quantized KV
    with d.client() as c:
        kv = c.status()["kv_cache"]
    assert kv["bits"] == 4 and kv["group_size"] == 64


def test_the_setting_changes_output_here(stock):
    """So the test above can tell a quantized KV cache from a plain one."""
    assert stock(kv_bits=4, quantized_kv_start=0) != stock()


def test_other_bit_widths_are_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moed.front", "serve", "--kv-bits", "3", "--socket", str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--kv-bits must be 4 or 8" in r.stderr


def test_a_distributed_job_with_quantized_kv_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moed.front", "serve", "--kv-bits", "4", "--ranks", "2", "--socket",
                        str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not supported in a distributed job" in r.stderr
