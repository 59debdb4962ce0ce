"""moectl against real daemons: start, status, run, stop (graceful, --now, frozen daemon), start failures.

These run on the tiny random model (conftest): lifecycle does not depend on what the model says,
and it loads and decodes fastest.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moed import cli
from moed.cli import daemon as cli_daemon, runtime as cli_runtime
from moed_client import Client
from test_cli import env  # noqa: F401 - the private runtime/log/home fixture

ROOT = Path(__file__).resolve().parents[1]
STATUS_KEYS = {
    "running", "state", "pid", "engine_pid", "uptime_s", "model", "memory", "requests", "clients", "recent_tok_s",
    "experts", "editor_socket", "progress", "socket", "pidfile", "log", "service",
}


@pytest.fixture
def started(env):  # noqa: F811
    """Daemons that moectl starts in a test are killed (with their engines) at its end, whatever happened."""
    pids = set()
    yield pids
    try:
        pids.add(int((env / "moed.pid").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def start(model, capsys, *flags) -> str:
    assert cli.main(["start", "--model", str(model), *flags]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def status_json(capsys) -> tuple[int, dict]:
    code = cli.main(["status", "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_start_status_run_stop(env, started, tiny_model, capsys, monkeypatch):  # noqa: F811
    out = start(tiny_model, capsys)
    assert out.startswith("moed is ready in ")
    code, status = status_json(capsys)
    started.add(status["pid"])
    assert code == 0 and status["running"] is True and status["state"] == "ready"
    assert STATUS_KEYS <= set(status), STATUS_KEYS - set(status)
    assert status["pid"] == int((env / "moed.pid").read_text())
    assert status["model"]["path"] == str(tiny_model)
    assert status["memory"]["rss_bytes"] > 0

    assert cli.main(["start"]) == 0
    assert "already running" in capsys.readouterr().out
    assert cli.main(["status"]) == 0
    assert capsys.readouterr().out.startswith("moed is running (ready)")

    prompt = "def fibonacci(n):"
    with Client(env / "moed.sock") as c:
        expected = c.complete(prompt, max_tokens=12, temperature=0.0)
    assert expected.text

    ended = expected.text if expected.text.endswith("\n") else expected.text + "\n"  # run ends its output with a newline
    assert cli.main(["run", prompt, "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == ended

    monkeypatch.setattr("sys.stdin", io.StringIO(prompt))
    assert cli.main(["run", "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == ended

    assert cli.main(["run", prompt, "--max-tokens", "12", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in events[:-1]] == ["chunk"] * (len(events) - 1)
    assert "".join(e["text"] for e in events[:-1]) == expected.text
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == expected.finish_reason
    assert events[-1]["usage"]["completion_tokens"] == len(expected.token_ids)

    # chat: two turns from stdin, the first answer as the chat API gives it
    with Client(env / "moed.sock") as c:
        first = c.chat([{"role": "user", "content": "hello"}], max_tokens=8, temperature=0.0).collect()
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhello\n"))
    assert cli.main(["chat", "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{first.text}\n{first.text}\n"  # /reset: the second turn starts from scratch
    assert "conversation reset" in err

    assert cli.main(["stop"]) == 0
    assert "moed stopped" in capsys.readouterr().out
    assert not cli_runtime.pid_alive(status["pid"]) and not cli_runtime.pid_alive(status["engine_pid"])
    assert sorted(p.name for p in env.iterdir()) == []  # no socket, no pidfile
    assert status_json(capsys)[0] == 3


def stream_in_background(socket, **request):
    """Start a request, wait for its first chunk, and finish reading it in a thread; (result dict, thread)."""
    result = {}
    client = Client(socket, timeout=60)
    stream = client.generate("def f(x):", temperature=0.0, **request)
    first = next(stream)

    def read():
        try:
            result["text"] = first.text + "".join(c.text for c in stream)
            result["finish_reason"] = stream.finish_reason
            result["tokens"] = len(stream.token_ids)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e
        finally:
            client.close()

    thread = threading.Thread(target=read)
    thread.start()
    return result, thread


@pytest.mark.slow
def test_graceful_stop_lets_requests_finish_and_now_cancels_them(env, started, tiny_model, capsys):  # noqa: F811
    start(tiny_model, capsys)
    with Client(env / "moed.sock") as c:
        # An answer that takes ~2 s on this machine, so it is surely in flight when stop arrives.
        rate = c.complete("def f(x):", max_tokens=30, temperature=0.0).timings["decode_tok_s"]
        n = int(min(max(2 * rate, 40), 20000))
        reference = c.complete("def f(x):", max_tokens=n, temperature=0.0)
    assert len(reference.token_ids) > n // 2, "the model stops too early for this test"
    result, thread = stream_in_background(env / "moed.sock", max_tokens=n)
    assert cli.main(["stop"]) == 0
    thread.join(60)
    assert "letting finish 1 in-flight request(s)" in capsys.readouterr().err
    assert result.get("text") == reference.text and result["finish_reason"] == reference.finish_reason, result

    start(tiny_model, capsys)
    result, thread = stream_in_background(env / "moed.sock", max_tokens=20000)
    assert cli.main(["stop", "--now"]) == 0
    thread.join(60)
    assert "cancelling 1 in-flight request(s)" in capsys.readouterr().err
    assert result.get("finish_reason") == "cancelled" or getattr(result.get("error"), "code", None) == "shutting_down", result
    assert result.get("tokens", 0) < 20000
    assert sorted(p.name for p in env.iterdir()) == []


@pytest.mark.slow
def test_stop_kills_a_frozen_daemon_and_cleans_up(env, started, tiny_model, capsys, monkeypatch):  # noqa: F811
    start(tiny_model, capsys)
    code, status = status_json(capsys)
    pid, engine = status["pid"], status["engine_pid"]
    started.add(pid)
    os.kill(pid, signal.SIGSTOP)  # answers nothing, handles no signal but SIGKILL
    monkeypatch.setattr(cli_runtime, "STATUS_TIMEOUT_S", 1.0)
    monkeypatch.setattr(cli_daemon, "TERM_GRACE_S", 1.0)
    assert cli.main(["stop", "--timeout", "1"]) == 0
    err = capsys.readouterr().err
    assert "does not answer" in err and "SIGTERM" in err and "SIGKILL" in err
    deadline = time.monotonic() + 10
    while cli_runtime.pid_alive(engine) and time.monotonic() < deadline:  # killed with the daemon's process group
        time.sleep(0.05)
    assert not cli_runtime.pid_alive(pid) and not cli_runtime.pid_alive(engine)
    assert sorted(p.name for p in env.iterdir()) == []  # SIGKILL left them; stop removed them


def test_dense_model_is_refused_by_moectl_and_by_the_daemon(env, started, capsys, tmp_path):  # noqa: F811
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert cli.main(["start", "--model", str(dense)]) == 1
    err = capsys.readouterr().err
    assert "is not a Mixture-of-Experts model" in err and "Traceback" not in err
    assert status_json(capsys)[0] == 3
    assert sorted(p.name for p in env.iterdir()) == []

    # The same model given to the daemon directly (as a service would): a message and exit 1.
    result = subprocess.run(
        [sys.executable, "-m", "moed.front", "serve", "--model", str(dense)],
        cwd=ROOT, env={**os.environ, **cli_daemon.import_path_env()}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "is not a Mixture-of-Experts model" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in env.iterdir()) == []


def test_start_waits_for_a_daemon_that_is_already_loading(env, daemon, tiny_model, capsys, monkeypatch):  # noqa: F811
    d = daemon(tiny_model, ready=False)
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(d.runtime_dir))
    monkeypatch.setenv("MOED_LOG_DIR", str(d.log_dir))
    deadline = time.monotonic() + 30
    while cli_runtime.pidfile_pid(cli_runtime.Runtime.of(cli.configuration.load())) != d.pid:  # the daemon has begun
        assert time.monotonic() < deadline and d.proc.poll() is None
        time.sleep(0.01)
    assert cli.main(["start"]) == 0
    out, err = capsys.readouterr()
    assert f"moed (pid {d.pid}) is already starting; waiting for it" in err or "already running" in out
    assert out.startswith(("moed is ready", "moed is already running"))
    assert d.proc.poll() is None  # the one daemon, still serving
    with d.client(timeout=5) as c:
        assert c.status()["state"] == "ready" and c.status()["pid"] == d.pid


@pytest.mark.slow
def test_profile_writes_a_profile_for_the_model(env, tiny_model, capsys, tmp_path):  # noqa: F811
    from moed.models import expert_count, read_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n\nclass Stack:\n")
    out = tmp_path / "profile.json"
    assert cli.main(["profile", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "[profile] prompt 2/2" in captured.err
    profile = json.loads(out.read_text())
    config = read_config(tiny_model)
    assert profile["kind"] == "moed-expert-profile" and profile["prompt_mix"] == ["def add(a, b):", "class Stack:"]
    assert 0 < len(profile["layers"]) <= config["num_hidden_layers"]  # MoE layers (some families keep dense ones)
    experts = expert_count(config)
    assert all(len(layer["counts"]) == experts and sum(layer["counts"]) > 0 for layer in profile["layers"])


@pytest.mark.slow
def test_profile_loads_the_model_in_a_child_process(env, tiny_model, tmp_path):  # noqa: F811
    """moectl itself cannot import MLX or the expert code here, and `moectl profile` still works."""
    out = tmp_path / "profile.json"
    code = ("import sys\n"
            "sys.modules['mlx'] = sys.modules['moed.experts'] = None  # importing either now fails\n"
            "from moed.cli import main\n"
            f"sys.exit(main(['profile', '--model', {str(tiny_model)!r}, '--out', {str(out)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and "[done] wrote" in done.stderr
    assert json.loads(out.read_text())["kind"] == "moed-expert-profile"


def test_profile_refuses_an_empty_prompt_file(env, capsys, tmp_path, tiny_model):  # noqa: F811
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert cli.main(["profile", "--model", str(tiny_model), "--prompts", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
