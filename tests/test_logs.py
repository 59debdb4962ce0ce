"""The log dir and log files (moed/logs.py, issue 18 item 6): the runtime dir's checks, no link
followed (a planted link's target is left untouched), 0600 files, rotation that `moectl logs -f`
follows."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from moed import logs


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def victim(tmp_path):
    """A file of ours another user would like us to chmod and append to."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    os.chmod(path, 0o644)
    return path


def untouched(path: Path) -> bool:
    return path.read_text() == "precious\n" and mode(path) == 0o644


@pytest.mark.parametrize("case", ["world-writable dir", "link in our own dir", "linked dir"])
def test_the_daemon_refuses_an_unsafe_log_dir_and_leaves_a_planted_links_target_alone(daemon, victim, case):
    from conftest import short_tmpdir

    base = short_tmpdir()
    log_dir = base / "logs"
    if case == "linked dir":
        (base / "real").mkdir(mode=0o700)
        log_dir.symlink_to(base / "real")
        (base / "real" / "moed.log").symlink_to(victim)
    else:
        log_dir.mkdir(mode=0o700)
        if case == "world-writable dir":
            os.chmod(log_dir, 0o777)  # another user could plant the link: here it is planted before start
        (log_dir / "moed.log").symlink_to(victim)
    d = daemon(None, env={"MOED_RUNTIME_DIR": str(base / "rt"), "MOED_LOG_DIR": str(log_dir)}, ready=False)
    try:
        assert d.proc.wait(timeout=60) == 1
        out = d.output()
        expected = {"world-writable dir": "writable by other users", "link in our own dir": "symbolic link",
                    "linked dir": "not a plain directory"}[case]
        assert expected in out, out
        assert untouched(victim)
        assert not (base / "rt" / "moed.sock").exists()  # refused before anything else started
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_open_private_refuses_links_and_other_owners_files_and_makes_files_0600(tmp_path, victim):
    (tmp_path / "link.log").symlink_to(victim)
    with pytest.raises(logs.LogDirError, match="symbolic link"):
        logs.open_private(tmp_path / "link.log")
    os.link(victim, tmp_path / "hard.log")  # a second name for a file we own
    with pytest.raises(logs.LogDirError, match="one link"):
        logs.open_private(tmp_path / "hard.log")
    assert untouched(victim)
    loose = tmp_path / "loose.log"
    loose.write_text("")
    os.chmod(loose, 0o644)
    os.close(logs.open_private(loose))
    assert mode(loose) == 0o600


def test_logs_rotate_and_logs_follow_reads_across_the_rotation(tmp_path):
    from moed.cli.daemon import follow

    path = tmp_path / "moed.log"
    handler = logs.PrivateRotatingHandler(path, max_bytes=2000, backups=2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("moed.test_rotation")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)

    class Out:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    out, stop = Out(), threading.Event()
    follower = threading.Thread(target=follow, args=(path, out, stop.is_set))
    follower.start()
    try:
        time.sleep(0.5)  # follow starts at the end of what is there
        lines = [f"line {i:04d} " + "x" * 80 for i in range(100)]  # ~9 KB: four rotations
        for line in lines:  # each file lasts two of follow's polls (at 10 MiB a file, >50 MB/s would be needed to skip one)
            logger.info(line)
            time.sleep(0.02)
        time.sleep(1.0)
    finally:
        stop.set()
        follower.join(5)
        logger.removeHandler(handler)
        handler.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moed.log", "moed.log.1", "moed.log.2"]
    assert all(p.stat().st_size <= 2000 + 100 and mode(p) == 0o600 for p in tmp_path.iterdir())
    assert out.text.splitlines() == lines  # nothing lost or doubled across the renames


def test_rotate_if_large_keeps_the_newest_backups(tmp_path):
    path = tmp_path / "moed.stderr.log"
    for i in range(4):
        path.write_text(f"generation {i}\n" * 100)
        logs.rotate_if_large(path, max_bytes=100, backups=2)
    assert not path.exists()
    assert (tmp_path / "moed.stderr.log.1").read_text().startswith("generation 3")
    assert (tmp_path / "moed.stderr.log.2").read_text().startswith("generation 2")
    assert not (tmp_path / "moed.stderr.log.3").exists()
    path.write_text("small\n")
    logs.rotate_if_large(path, max_bytes=100, backups=2)
    assert path.read_text() == "small\n"


def test_moectl_start_refuses_a_planted_console_log_link(tmp_path, monkeypatch, victim):
    from moed import config
    from moed.cli import daemon as cli_daemon
    from moed.cli.common import CommandError
    from moed.cli.runtime import console_log

    spawned = []
    monkeypatch.setattr(cli_daemon.subprocess, "Popen", lambda *a, **k: spawned.append((a, k)))
    cfg = config.load({"log_dir": str(tmp_path / "logs")}, env={}, path=tmp_path / "none.toml")
    (tmp_path / "logs").mkdir(mode=0o700)
    console_log(cfg).symlink_to(victim)
    with pytest.raises(CommandError, match="symbolic link"):
        cli_daemon.spawn_detached(cfg)
    assert not spawned and untouched(victim)
