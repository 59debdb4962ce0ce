"""Service definitions (LaunchAgent plist, systemd user unit) and the commands that install them.

launchctl does not exist here and systemctl must not touch this machine's services, so the
command runner is injected and the tests assert the exact argv each operation runs.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moed import platform
from moed.platform import ServiceSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def spec(tmp_path):
    return ServiceSpec(
        program=[sys.executable, "-m", "moed.front", "serve", "--model", "/models/a b&c"],
        log_path=tmp_path / "logs" / "moed.log",
        working_directory=tmp_path,
        environment={"MOED_RUNTIME_DIR": str(tmp_path / "run"), "HF_HOME": "/cache/100%$hf"},
    )


class Recorder:
    """A command runner that records argv and answers with the given return codes."""

    def __init__(self, returncodes: dict[str, int] | None = None):
        self.calls: list[list[str]] = []
        self.returncodes = returncodes or {}

    def __call__(self, argv):
        argv = [str(a) for a in argv]
        self.calls.append(argv)
        rc = next((rc for prefix, rc in self.returncodes.items() if " ".join(argv).startswith(prefix)), 0)
        return subprocess.CompletedProcess(argv, rc, "", "boom" if rc else "")


def test_plist_parses_and_has_the_required_keys(spec):
    plist = plistlib.loads(platform.render_plist(spec).encode())
    assert plist["Label"] == "com.moed.daemon"
    assert plist["ProgramArguments"] == spec.program
    assert all(os.path.isabs(p) for p in (plist["ProgramArguments"][0], plist["StandardOutPath"], plist["WorkingDirectory"]))
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart after a crash, not after `moectl stop`
    assert plist["ProcessType"] == "Interactive"
    assert plist["ExitTimeOut"] >= 30
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(spec.log_path)
    assert plist["EnvironmentVariables"] == spec.environment


def test_launchd_directory_holds_the_template():
    template = ROOT / "launchd" / "com.moed.daemon.plist.in"
    assert template.resolve() == (ROOT / "moed" / "templates" / "com.moed.daemon.plist.in").resolve()


def test_systemd_unit_has_the_required_directives(spec):
    unit = platform.render_systemd_unit(spec)
    lines = set(unit.splitlines())
    for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "WatchdogSec=30", "TimeoutStartSec=1800"):
        assert line in lines, line
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start.startswith(f'ExecStart="{sys.executable}" "-m" "moed.front" "serve"')
    assert '"/models/a b&c"' in exec_start
    assert 'Environment="HF_HOME=/cache/100%%$hf"' in lines  # % is a specifier; $ is literal in Environment=
    assert f"StandardOutput=append:{spec.log_path}" in lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_passes_systemd_analyze_verify(spec, tmp_path):
    unit = tmp_path / "moed.service"
    unit.write_text(platform.render_systemd_unit(spec))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # verify exits 0 on directives it ignores; those warnings name the unit file
    assert "moed.service" not in result.stderr, result.stderr


def test_systemd_analyze_catches_a_broken_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / "moed.service"
    unit.write_text(platform.render_systemd_unit(ServiceSpec(["/nonexistent/python"], tmp_path / "l", tmp_path)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 or "moed.service" in result.stderr


def test_launchd_install_and_uninstall(spec, tmp_path):
    run = Recorder({"launchctl print": 113})  # not loaded yet
    path = platform.install_service(spec, manager="launchd", run=run, home=tmp_path)
    uid = os.getuid()
    assert path == tmp_path / "Library" / "LaunchAgents" / "com.moed.daemon.plist"
    assert plistlib.loads(path.read_bytes())["ProgramArguments"] == spec.program
    assert run.calls[-1] == ["launchctl", "bootstrap", f"gui/{uid}", str(path)]
    assert spec.log_path.parent.is_dir()  # launchd does not create the log directory itself
    assert platform.is_service_installed("launchd", home=tmp_path)

    run = Recorder()
    assert platform.uninstall_service(manager="launchd", run=run, home=tmp_path) is True
    assert run.calls == [["launchctl", "bootout", f"gui/{uid}/com.moed.daemon"]]
    assert not path.exists()
    assert not platform.is_service_installed("launchd", home=tmp_path)
    assert platform.uninstall_service(manager="launchd", run=run, home=tmp_path) is False


def test_launchd_reinstall_boots_out_the_loaded_job_first(spec, tmp_path):
    run = Recorder()  # `launchctl print` succeeds: a job is loaded
    path = platform.install_service(spec, manager="launchd", run=run, home=tmp_path)
    target = f"gui/{os.getuid()}/com.moed.daemon"
    assert run.calls == [
        ["launchctl", "print", target],
        ["launchctl", "bootout", target],
        ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(path)],
    ]


def test_launchd_bootstrap_failure_is_a_service_error(spec, tmp_path):
    run = Recorder({"launchctl print": 113, "launchctl bootstrap": 5})
    with pytest.raises(platform.ServiceError, match="launchctl bootstrap .* failed \\(5\\): boom"):
        platform.install_service(spec, manager="launchd", run=run, home=tmp_path)


def test_systemd_install_and_uninstall(spec, tmp_path):
    run = Recorder()
    path = platform.install_service(spec, manager="systemd", run=run, home=tmp_path)
    assert path == tmp_path / ".config" / "systemd" / "user" / "moed.service"
    assert "Type=notify" in path.read_text()
    assert run.calls == [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "moed.service"]]

    run = Recorder()
    assert platform.uninstall_service(manager="systemd", run=run, home=tmp_path) is True
    assert run.calls == [
        ["systemctl", "--user", "disable", "--now", "moed.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]
    assert not path.exists()


def test_start_and_stop_through_the_managers(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    target = f"gui/{os.getuid()}/com.moed.daemon"

    run = Recorder()
    platform.start_service(manager="launchd", run=run)
    assert run.calls[-1] == ["launchctl", "kickstart", target]
    run = Recorder({"launchctl print": 113})  # booted out by an earlier stop: bootstrap again
    platform.start_service(manager="launchd", run=run)
    assert run.calls[-1] == ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(tmp_path / "Library/LaunchAgents/com.moed.daemon.plist")]
    run = Recorder()
    platform.stop_service(manager="launchd", run=run)
    assert run.calls == [["launchctl", "bootout", target]]

    run = Recorder()
    platform.start_service(manager="systemd", run=run)
    platform.stop_service(manager="systemd", run=run)
    assert run.calls == [["systemctl", "--user", "start", "--no-block", "moed.service"], ["systemctl", "--user", "stop", "moed.service"]]


def test_newline_in_a_unit_value_is_refused(tmp_path):
    with pytest.raises(platform.ServiceError, match="newline"):
        platform.render_systemd_unit(ServiceSpec([sys.executable, "a\nb"], tmp_path / "l", tmp_path))
