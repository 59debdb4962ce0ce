"""The engine as an MLX distributed job (docs/distributed.md): 2 ring ranks on loopback, on the CPU.

Greedy output equals stock mlx-lm's for the embedded model (Qwen3-MoE: mlx-lm's own
pipeline()) and the Mixtral fixture (moed's generic split), with every expert
resident and with a few; a rank killed or hung mid-stream ends the job, clients get
engine_restarted and the restarted job serves again; a host that cannot be reached
is a clear error. No rank outlives its test (checked from /proc).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_for

from moed import cli
from moed.front import job
from moed_client import EngineRestarted
from test_cli import env  # noqa: F401 - the private runtime/log/home fixture
from test_cli_daemon import started  # noqa: F401

PROMPT = "def fibonacci(n):"
TOKENS = 24


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (a daemon's private runtime dir)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                if "State:\tZ" not in (p / "status").read_text():
                    found.append(int(p.name))
        except OSError:
            continue
    return found


def ranks_of(launcher: int) -> dict[int, int]:
    """rank -> pid of the job's rank processes (children of the launcher, rank from MLX_RANK)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(e.split("=", 1) for e in (p / "environ").read_text().split("\0") if "=" in e)
        except (OSError, ValueError, IndexError):
            continue
        if "MLX_RANK" in env:
            out[int(env["MLX_RANK"])] = int(p.name)
    return out


@pytest.fixture
def job_daemon(daemon):
    """``daemon`` with ``--ranks 2``; at the end every daemon is killed and no process of it may be left."""
    started_here = []

    def start(model, *args, **kwargs):
        d = daemon(model, "--ranks", "2", *args, **kwargs)
        started_here.append(d)
        return d

    yield start
    for d in started_here:
        d.kill()
    for d in started_here:
        wait_for(lambda: not processes_naming(str(d.runtime_dir)), timeout=15)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    from families import build

    return build("mixtral", tmp_path_factory.mktemp("mixtral") / "model")


def stock_tokens(path: Path, prompt: str, n: int) -> list[int]:
    """Stock mlx-lm's greedy tokens, up to the first end-of-sequence token (which moed does not send)."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tok = mlx_lm.load(str(path))
    out = []
    for t, _ in generate_step(mx.array(tok.encode(prompt)), model, max_tokens=n):
        if t in tok.eos_token_ids:
            break
        out.append(t)
    return out


@pytest.fixture(scope="module")
def glm4_moe(tmp_path_factory) -> Path:
    from families import build

    return build("glm4_moe", tmp_path_factory.mktemp("glm4_moe") / "model")


def model_of(name, test_model, mixtral):
    return test_model if name == "embedded" else mixtral


@pytest.mark.parametrize("name", ["embedded", "mixtral"])
@pytest.mark.parametrize("residency", ["full", "partial"])
def test_two_ranks_greedy_equals_stock(job_daemon, test_model, mixtral, name, residency):
    path = model_of(name, test_model, mixtral)
    expected = stock_tokens(path, PROMPT, TOKENS)
    d = job_daemon(path, *(["--capacity", "3"] if residency == "partial" else []))
    with d.client(timeout=120) as c:
        got = c.complete(PROMPT, max_tokens=TOKENS, temperature=0)
        assert got.token_ids == expected
        status = wait_for(lambda: (s := c.status())["ranks"] and s["ranks"][0]["tokens_generated"] >= len(expected) and s)
    ranks = status["ranks"]
    layers = status["model"]["num_layers"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[1]["layers"][0] == 0 and ranks[1]["layers"][1] == ranks[0]["layers"][0] and ranks[0]["layers"][1] == layers
    assert ranks[0]["split"] == ("mlx-lm pipeline()" if name == "embedded" else "generic")
    for r in ranks:
        assert r["pipeline_bytes"] > 0 and r["bytes_per_token"] > 0 and r["rss_bytes"] > 0
        if residency == "partial":  # each rank streams its own layers' experts, and some were missing
            assert r["resident"][0] <= 3 * (r["layers"][1] - r["layers"][0]) and r["hit_rate"] < 1
        else:
            assert r["hit_rate"] is None


def test_a_rank_without_experts_beside_a_lazy_one(job_daemon, glm4_moe):
    """GLM-4 MoE's layer 0 is dense: rank 1 holds only it (no expert manager, every forward direct)
    while rank 0 streams its experts (each forward evaluated inside itself). The ranks evaluate a
    prefill chunk differently, and its all_gather must still run on both (tied into the KV cache)."""
    expected = stock_tokens(glm4_moe, PROMPT, TOKENS)
    d = job_daemon(glm4_moe, "--capacity", "3")
    with d.client(timeout=120) as c:
        assert c.complete(PROMPT, max_tokens=TOKENS, temperature=0).token_ids == expected
        ranks = wait_for(lambda: (s := c.status()["ranks"]) and s[0]["tokens_generated"] >= len(expected) and s)
    assert ranks[1]["layers"] == [0, 1] and ranks[1]["resident"] is None
    assert ranks[0]["hit_rate"] < 1


@pytest.mark.parametrize("residency", ["full", "partial"])
def test_a_long_prompt_is_fed_in_chunks_alike_on_every_rank(job_daemon, test_model, residency):
    """A prompt several prefill chunks long (rank 0's chunk length, shared each turn) beside a short
    request that joins the batch: the same tokens as stock for both. (Decoding one request on mlx-lm's
    generation stream while the other's chunk is fed: every rank's collectives in one order.)"""
    long_prompt = "def fibonacci(n):\n    " + " ".join(f"x{i} = {i} * n" for i in range(120))
    expected = [stock_tokens(test_model, p, 12) for p in (long_prompt, PROMPT)]
    d = job_daemon(test_model, *(["--capacity", "3"] if residency == "partial" else []))
    with d.client(timeout=120) as a, d.client(timeout=120) as b:
        first = a.generate(long_prompt, max_tokens=12, temperature=0)
        second = b.generate(PROMPT, max_tokens=12, temperature=0)
        assert [first.collect().token_ids, second.collect().token_ids] == expected
        assert first.usage["prompt_tokens"] > 3 * 128


def test_turns_longer_than_one_all_sum_arrive_whole():
    import mlx.core as mx

    from moed.channel import Submit
    from moed.engine.lockstep import HEADER, Lockstep, Turn
    from moed_client import protocol as P

    lockstep = Lockstep(mx.distributed.init())  # a group of one: the all_sum hands back what went in
    for n in (0, 5, 3000):
        turn = Turn([(Submit(7, P.GenerateRequest(id="r", prompt="p" * n)), list(range(n)))], [3], False, True, 96)
        assert len(turn.pack()) > HEADER or n < 3000
        got = lockstep.share(turn)
        assert (got.submits[0][0].request.prompt, got.submits[0][1], got.cancels, got.stats, got.chunk) == \
            ("p" * n, list(range(n)), [3], True, 96)
    assert lockstep.gather({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_restarts_the_job(job_daemon, test_model, fault):
    expected = stock_tokens(test_model, PROMPT, 8)
    d = job_daemon(test_model, "--hang-timeout", "3")
    with d.client(timeout=60) as c:
        launcher = c.status()["engine_pid"]
        d.engine_pids.add(launcher)
        old = ranks_of(launcher)
        assert sorted(old) == [0, 1]
        stream = c.generate(PROMPT, max_tokens=30000, temperature=0)
        next(stream)
        os.kill(old[1], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(EngineRestarted) as e:
            list(stream)
        assert time.monotonic() - t0 < 30
        if fault == "hung":
            assert "hung" in str(e.value)
        status = wait_for(lambda: (s := c.status())["state"] == "ready" and s, timeout=60)
        d.engine_pids.add(status["engine_pid"])
        assert status["engine_restarts"] == 1 and status["engine_pid"] != launcher
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and "State:\tZ" not in Path(f"/proc/{p}/status").read_text()
                                 for p in old.values()), timeout=15)
        assert c.complete(PROMPT, max_tokens=8, temperature=0).token_ids == expected
        assert sorted(ranks_of(status["engine_pid"])) == [0, 1]


def test_a_host_that_cannot_be_reached_fails_moectl_start(env, started, test_model, tmp_path, capsys):  # noqa: F811
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                 {"ssh": "moed-unreachable.invalid", "ips": ["192.0.2.1"]}]))
    assert cli.main(["start", "--model", str(test_model), "--hosts", str(hosts), "--timeout", "60"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach host moed-unreachable.invalid" in err and "Traceback" not in err


def test_host_file_checks(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]}))
    with pytest.raises(job.JobError, match="at least 2"):
        job.read_hosts(path)
    path.write_text("[{")
    with pytest.raises(job.JobError, match="cannot read host file"):
        job.read_hosts(path)
    with pytest.raises(job.JobError, match="does not exist"):
        job.read_hosts(tmp_path / "none.json")
    far = [{"ssh": "192.0.2.1", "ips": ["192.0.2.1"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]
    with pytest.raises(job.JobError, match="must be this machine"):
        job.check_hosts(far, path)
    assert job.is_this_machine({"ssh": "localhost"}) and not job.is_this_machine({"ssh": "192.0.2.1"})


def test_layer_split_is_mlx_lms():
    from mlx_lm.models.pipeline import PipelineMixin

    from moed.engine.pipeline import bounds

    class Group:
        def __init__(self, rank, size):
            self.r, self.s = rank, size

        def rank(self):
            return self.r

        def size(self):
            return self.s

    for n, size in [(6, 2), (7, 2), (7, 3), (48, 4)]:
        for rank in range(size):
            m = PipelineMixin()
            m.layers = list(range(n))
            m.pipeline(Group(rank, size))
            assert bounds(n, rank, size) == (m.start_idx, m.end_idx)
    with pytest.raises(ValueError, match="at least one layer"):
        bounds(2, 0, 3)


def test_the_job_ends_with_the_front(job_daemon):
    d = job_daemon(None)
    assert len(processes_naming(str(d.runtime_dir))) == 3  # the launcher and its 2 ranks
    os.kill(d.pid, signal.SIGKILL)  # no shutdown: rank 0 finds its heartbeat unread and ends every rank's loop
    wait_for(lambda: not processes_naming(str(d.runtime_dir)), timeout=15)


def test_moectl_status_shows_each_rank():
    from moed.cli.status import format_status

    rank = {"host": "vm", "rss_bytes": 3 << 20, "hit_rate": 0.5, "bytes_per_token": 2080.0}
    text = format_status({"running": True, "state": "ready", "socket": "s", "log": "l", "model": {"name": "m"},
                          "ranks": [dict(rank, rank=0, layers=[3, 6]), dict(rank, rank=1, layers=[0, 3], hit_rate=None)]})
    rows = {line.split("  ", 2)[1]: line.rsplit("  ", 1)[1] for line in text.splitlines()[1:]}
    assert rows["rank 0"] == "vm, layers 3-5, 3.0 MiB resident, hit rate 50.0%, 2.0 KiB sent per token"
    assert rows["rank 1"] == "vm, layers 0-2, 3.0 MiB resident, all experts resident, 2.0 KiB sent per token"
