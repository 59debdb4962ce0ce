"""moectl without a model: exit codes, stale files, escalation, logs, service wiring, pull."""

from __future__ import annotations

import io
import json
import os
import plistlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moed import cli, platform
from moed.cli import daemon as cli_daemon, runtime as cli_runtime, status as cli_status
from conftest import short_tmpdir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A private runtime dir, log dir, home and no config file."""
    runtime = short_tmpdir()
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("MOED_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("MOED_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("MOED_MODEL", "MOED_SOCKET", "MOED_MEMORY_BUDGET"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "home").mkdir()
    try:
        yield runtime
    finally:
        for p in runtime.iterdir():
            p.unlink()
        runtime.rmdir()


@pytest.fixture
def sleeper():
    """Start a process (killed at the end): ``sleeper(*argv)``, returned once its command line is visible."""
    procs = []

    def start(*argv):
        p = subprocess.Popen(list(argv))
        procs.append(p)
        deadline = time.monotonic() + 10
        while p.poll() is None and argv[-1] not in (platform.process_command(p.pid) or ""):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_status_when_not_running(env, capsys):
    assert cli.main(["status"]) == 3
    assert "not running" in capsys.readouterr().out
    assert cli.main(["status", "--json"]) == 3
    obj = json.loads(capsys.readouterr().out)
    assert obj["running"] is False and obj["state"] == "stopped" and obj["pid"] is None
    assert obj["socket"] == str(env / "moed.sock")


def test_stop_when_not_running_removes_stale_socket_and_pidfile(env, capsys, sleeper):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(env / "moed.sock"))
    sock.close()  # a socket file nobody listens on, as a killed daemon leaves it
    dead = sleeper(sys.executable, "-c", "pass")
    dead.wait()
    (env / "moed.pid").write_text(f"{dead.pid}\n")
    assert cli.main(["status"]) == 3  # and it does not wait for an answer from the stale socket
    assert cli.main(["stop"]) == 0
    assert "not running (removed stale" in capsys.readouterr().out
    assert not (env / "moed.sock").exists() and not (env / "moed.pid").exists()


def test_a_zombie_daemon_is_not_running(env, capsys):
    """A daemon that was killed but not yet reaped by its parent (not moectl) is a zombie:
    kill(pid, 0) still succeeds, yet it serves nothing and moectl must treat it as gone."""
    code = ("import os, sys, time\n"
            "child = os.fork()\n"
            "if child == 0:\n    os.execv(sys.executable, [sys.executable, '-c', 'pass', 'moed-zombie'])\n"
            "print(child, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        zombie = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while not platform.process_is_zombie(zombie):  # it exits at once; its parent never waits for it
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(zombie, 0)  # what pid_alive used to rely on: it succeeds for a zombie
        assert not cli_runtime.pid_alive(zombie)
        (env / "moed.pid").write_text(f"{zombie}\n")
        assert cli.main(["status"]) == 3
        assert "not running" in capsys.readouterr().out
        assert cli.main(["stop"]) == 0
        assert "not running" in capsys.readouterr().out
        assert not (env / "moed.pid").exists()
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_pidfile_naming_another_program_is_never_signalled(env, capsys, sleeper):
    other = sleeper("sleep", "60")
    (env / "moed.pid").write_text(f"{other.pid}\n")
    assert cli.main(["stop"]) == 0
    assert "not running" in capsys.readouterr().out
    assert other.poll() is None  # still alive
    assert not (env / "moed.pid").exists()


def test_unresponsive_daemon_is_reported_then_signalled(env, capsys, sleeper, monkeypatch):
    # A process that looks like moed (its command line says so) but never answers on the socket.
    hung = sleeper(sys.executable, "-c", "import time; time.sleep(60)", "moed-hung")
    (env / "moed.pid").write_text(f"{hung.pid}\n")
    assert cli.main(["status", "--json"]) == 1
    obj = json.loads(capsys.readouterr().out)
    assert obj == {**obj, "running": False, "state": "unresponsive", "pid": hung.pid}
    monkeypatch.setattr(cli_daemon, "TERM_GRACE_S", 5.0)
    assert cli.main(["stop"]) == 0
    err = capsys.readouterr().err
    assert "does not answer; signalling it" in err and "SIGTERM" in err and "SIGKILL" not in err
    hung.wait(timeout=5)  # moectl reaped its exit status already: only check that it is gone
    assert not cli_runtime.pid_alive(hung.pid)
    assert not (env / "moed.pid").exists()


def test_sigkill_when_sigterm_is_ignored(env, capsys, sleeper, monkeypatch):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); time.sleep(60)"
    stubborn = subprocess.Popen([sys.executable, "-c", code, "moed-stubborn"], stdout=subprocess.PIPE)
    try:
        assert stubborn.stdout.readline() == b"ok\n"
        (env / "moed.pid").write_text(f"{stubborn.pid}\n")
        monkeypatch.setattr(cli_daemon, "TERM_GRACE_S", 0.5)
        assert cli.main(["stop"]) == 0
        assert "sending SIGKILL" in capsys.readouterr().err
        stubborn.wait(timeout=5)
        assert not cli_runtime.pid_alive(stubborn.pid)
    finally:
        stubborn.kill()
        stubborn.wait()
        stubborn.stdout.close()


def test_run_needs_a_running_daemon(env, capsys):
    assert cli.main(["run", "hello"]) == 1
    assert "moed is not running; start it with `moectl start`" in capsys.readouterr().err


def test_run_refuses_an_empty_prompt_from_stdin(env, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert cli.main(["run"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_bad_config_file_is_a_usage_error(env, capsys, tmp_path):
    (tmp_path / "config.toml").write_text("memory_budget = 'lots'\n")
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert "configuration" in err and "not a size: 'lots'" in err and "Traceback" not in err


def test_flags_override_environment(env, monkeypatch, tmp_path):
    monkeypatch.setenv("MOED_MODEL", "env-model")
    (tmp_path / "config.toml").write_text('model = "file-model"\ncapacity = 3\n')
    args = cli.build_parser().parse_args(["start", "--model", str(tmp_path)])
    cfg = cli.configuration.load(cli.flags_of(args))
    assert cfg.model == str(tmp_path) and cfg.capacity == 3
    argv = cli_daemon.daemon_argv(cfg)
    assert argv[:4] == [sys.executable, "-m", "moed.front", "serve"]
    assert argv[4:] == ["--model", str(tmp_path), "--capacity", "3"]


def test_daemon_argv_makes_local_paths_absolute(env, monkeypatch, tmp_path):
    (tmp_path / "rel-model").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = cli.configuration.load({"model": "rel-model", "socket": "s/moed.sock"})
    argv = cli_daemon.daemon_argv(cfg)
    assert argv[argv.index("--model") + 1] == str(tmp_path / "rel-model")
    assert argv[argv.index("--socket") + 1] == str(tmp_path / "s" / "moed.sock")
    hub = cli_daemon.daemon_argv(cli.configuration.load({"model": "org/name"}))
    assert hub[hub.index("--model") + 1] == "org/name"


def test_socket_flag_moves_the_pidfile_like_the_daemon_does(env, monkeypatch, tmp_path):
    monkeypatch.delenv("MOED_RUNTIME_DIR")
    runtime = cli_runtime.Runtime.of(cli.configuration.load({"socket": str(tmp_path / "x" / "d.sock")}))
    assert runtime == cli_runtime.Runtime(tmp_path / "x" / "d.sock", tmp_path / "x" / "moed.pid")


SAMPLE_STATUS = {
    "running": True,
    "state": "ready",
    "pid": 41,
    "engine_pid": 42,
    "uptime_s": 3725,
    "model": {"name": "org/tiny", "path": "/m"},
    "memory": {"rss_bytes": 3 << 30, "budget_bytes": 8 << 30},
    "requests": {"active": 2, "queued": 1},
    "clients": 3,
    "recent_tok_s": 12.34,
    "experts": {
        "hit_rate": 0.93, "redos": 4, "decode_steps": 200, "bytes_read": 1536 << 20, "capacity": 16, "slots": 64, "resident": 60, "approximate": False,
        "prefetch": {"recall": 0.5, "precision": None},
    },
    "socket": "/run/moed.sock",
    "log": "/l/moed.log",
    "service": {"manager": "launchd", "installed": True},
}


def test_human_status_shows_the_figures():
    text = cli_status.format_status(SAMPLE_STATUS)
    assert text.splitlines()[0] == "moed is running (ready)"
    for part in (
        "41 (engine 42), up 1h 02m",
        "org/tiny (/m)",
        "3.0 GiB resident, budget 8.0 GiB",
        "2 active, 1 queued; 3 client(s)",
        "12.3 tok/s",
        "hit rate 93.0%",
        "prefetch recall 50.0%, precision -",
        "1.5 GiB read from disk",
        "4/200 decode forwards redone",
        "60/64 slots filled (16 per layer)",
        "launchd (installed)",
    ):
        assert part in text, part


def test_human_status_shows_a_quantized_kv_cache():
    assert "kv cache" not in cli_status.format_status(SAMPLE_STATUS)
    text = cli_status.format_status({**SAMPLE_STATUS, "kv_cache": {"bits": 4, "group_size": 64, "active_bytes": 3 << 20}})
    assert "4-bit (group 64), 3.0 MiB in use" in text


def test_human_status_shows_the_prefill_clock_measured_at_start():
    prefill = {"target_ms": 250.0, "next_chunk": 256, "prefilling": 1,
               "calibration": {"forwards": [{"tokens": 16, "ms": 7.9, "disk_ms": 0.0}, {"tokens": 128, "ms": 62.5, "disk_ms": 0.0}],
                               "first_chunk": 256}}
    text = cli_status.format_status({**SAMPLE_STATUS, "prefill": prefill})
    assert "chunks of 256 tokens for 250 ms (measured at start: 16 tokens in 8 ms, 128 tokens in 62 ms); 1 prompt(s) being fed" in text
    assert "prefill" not in cli_status.format_status(SAMPLE_STATUS)


def test_human_status_while_loading():
    text = cli_status.format_status({**SAMPLE_STATUS, "state": "loading", "progress": {"stage": "download", "message": "2 of 4 GB", "fraction": 0.5}})
    assert text.splitlines()[0] == "moed is running (loading): [download] 2 of 4 GB 50%"


def test_logs_prints_the_last_lines(env, capsys, tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "moed.log").write_text("".join(f"line {i}\n" for i in range(100)))
    assert cli.main(["logs", "-n", "3"]) == 0
    assert capsys.readouterr().out == "line 97\nline 98\nline 99\n"


def test_logs_without_a_log(env, capsys):
    assert cli.main(["logs"]) == 1
    assert "no log yet" in capsys.readouterr().err


def test_follow_survives_truncation_and_rotation(tmp_path):
    path = tmp_path / "moed.log"
    path.write_text("old\n")
    out = io.StringIO()
    done = threading.Event()
    follower = threading.Thread(target=cli_daemon.follow, args=(path, out, done.is_set))
    follower.start()
    try:
        def wait_for(text):
            deadline = time.monotonic() + 10
            while text not in out.getvalue():
                assert time.monotonic() < deadline, out.getvalue()
                time.sleep(0.05)

        time.sleep(0.3)
        with open(path, "a") as f:
            f.write("appended\n")
        wait_for("appended\n")
        path.rename(tmp_path / "moed.log.1")  # rotation
        path.write_text("rotated\n")
        wait_for("rotated\n")
        path.write_text("")  # truncation
        time.sleep(0.3)
        with open(path, "a") as f:
            f.write("after truncation\n")
        wait_for("after truncation\n")
    finally:
        done.set()
        follower.join(5)
    assert "old" not in out.getvalue()  # follow starts at the end, like tail -f


class Calls(list):
    def recorder(self, name, result=None):
        def call(*args, **kwargs):
            self.append((name, args, kwargs))
            return result

        return call


def test_start_through_an_installed_service(env, capsys, monkeypatch):
    calls = Calls()
    monkeypatch.setattr(platform, "is_service_installed", lambda *a, **k: True)
    monkeypatch.setattr(platform, "service_manager", lambda: "launchd")
    monkeypatch.setattr(platform, "start_service", calls.recorder("start_service"))
    monkeypatch.setattr(cli_daemon, "service_alive_check", lambda runtime: lambda: False)  # it dies at once
    assert cli.main(["start", "--model", "/elsewhere"]) == 2
    assert "cannot change model for one run" in capsys.readouterr().err
    assert calls == []
    assert cli.main(["start"]) == 1
    assert [c[0] for c in calls] == ["start_service"]
    err = capsys.readouterr().err
    assert "starting moed through launchd" in err and "moed exited while starting" in err


def test_service_install_writes_a_launch_agent(env, capsys, monkeypatch, tmp_path):
    calls = []

    def run(argv):
        calls.append([str(a) for a in argv])
        return subprocess.CompletedProcess(argv, 113 if argv[1] == "print" else 0, "", "")

    real_install = platform.install_service
    monkeypatch.setattr(platform, "service_manager", lambda: "launchd")
    monkeypatch.setattr(platform, "install_service", lambda spec, manager: real_install(spec, manager=manager, run=run, home=tmp_path))
    monkeypatch.setenv("HF_TOKEN", "secret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "config.toml").write_text("capacity = 3\n")  # read by the daemon at each start, not baked in
    assert cli.main(["service", "install", "--no-start", "--model", str(model), "--memory-budget", "2G"]) == 0
    plist_path = tmp_path / "Library" / "LaunchAgents" / "com.moed.daemon.plist"
    plist = plistlib.loads(plist_path.read_bytes())
    assert plist["ProgramArguments"] == [sys.executable, "-m", "moed.front", "serve", "--model", str(model), "--memory-budget", str(2 << 30)]
    assert plist["EnvironmentVariables"]["MOED_LOG_DIR"] == str(tmp_path / "logs")
    assert plist["EnvironmentVariables"]["HF_HUB_OFFLINE"] == "1"
    assert plist["EnvironmentVariables"]["MOED_CONFIG"] == str(tmp_path / "config.toml")
    assert "HF_TOKEN" not in plist["EnvironmentVariables"]
    assert plist["StandardErrorPath"] == str(tmp_path / "logs" / "moed.stderr.log")
    assert calls[-1] == ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(plist_path)]


def test_service_without_a_manager_is_a_clear_error(env, capsys, monkeypatch):
    monkeypatch.setattr(platform, "service_manager", lambda: None)
    assert cli.main(["service", "install"]) == 1
    assert "no service manager" in capsys.readouterr().err


def test_import_path_env_lets_a_checkout_run_the_daemon_from_anywhere():
    assert Path(cli.__file__).resolve().parents[2] == ROOT  # these tests run on the checkout
    assert cli_daemon.import_path_env({"PYTHONPATH": "/x"}) == {"PYTHONPATH": os.pathsep.join([str(ROOT), "/x"])}
    assert cli_daemon.import_path_env({}) == {"PYTHONPATH": str(ROOT)}
    already = os.pathsep.join(["/x", str(ROOT)])
    assert cli_daemon.import_path_env({"PYTHONPATH": already}) == {"PYTHONPATH": already}


def test_moectl_entry_point_exit_code(env):
    result = subprocess.run([sys.executable, "-m", "moed.cli", "status"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "moed is not running" in result.stdout


@pytest.fixture
def hub_env(tmp_path):
    from test_models import DENSE_CONFIG, MOE_CONFIG, make_hub_cache

    make_hub_cache(tmp_path / "hf" / "hub", "org/tiny-moe", {"config.json": json.dumps(MOE_CONFIG).encode()})
    make_hub_cache(tmp_path / "hf" / "hub", "org/dense", {"config.json": json.dumps(DENSE_CONFIG).encode()})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), MOED_CONFIG=str(tmp_path / "none.toml"))
    return env


def test_pull_offline(hub_env, tmp_path):
    def pull(repo):
        return subprocess.run([sys.executable, "-m", "moed.cli", "pull", repo], env=hub_env, capture_output=True, text=True, timeout=60)

    ok = pull("org/tiny-moe")
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()).parent.name == "snapshots"
    dense = pull("org/dense")
    assert dense.returncode == 1 and "not a Mixture-of-Experts model" in dense.stderr
    missing = pull("org/absent")
    assert missing.returncode == 1 and "offline mode is on" in missing.stderr
    for r in (dense, missing):
        assert "Traceback" not in r.stderr


def test_importing_moectl_loads_no_mlx_and_no_expert_code():
    """moectl runs where MLX cannot load and starts fast: only moed/engine and moed/experts import MLX."""
    code = (
        "import pkgutil, sys, moed.cli\n"
        "for m in pkgutil.iter_modules(moed.cli.__path__):\n"
        "    if m.name != '__main__':\n"
        "        __import__('moed.cli.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'mlx' or n.startswith('moed.experts')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

