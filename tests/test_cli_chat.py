"""moectl chat on a terminal (a pty): line editing, history, /commands, Ctrl-C; moectl run's last newline and
an answer cut short by `moectl stop --now`."""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from moed import cli
from moed.cli.chat import Conversation, read_message
from test_cli import env  # noqa: F401
from test_cli_daemon import start, started  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


class Terminal:
    """A child process on a pseudo-terminal; ``expect`` reads until a text shows up."""

    def __init__(self, argv, env):
        self.master, slave = os.openpty()
        # Its own session with the pty as controlling terminal, so that Ctrl-C there is a SIGINT to it.
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.seen = ""

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def expect(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never came; the terminal shows:\n{self.seen}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the child is gone
                    assert text in self.seen, f"{text!r} never came; the terminal shows:\n{self.seen}"
        at = self.seen.index(text) + len(text)
        before, self.seen = self.seen[:at], self.seen[at:]
        return before

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            os.close(self.master)


@pytest.mark.slow
def test_chat_on_a_terminal(daemon, tiny_model, tmp_path):
    d = daemon(tiny_model)
    env = dict(os.environ, MOED_RUNTIME_DIR=str(d.runtime_dir), XDG_STATE_HOME=str(tmp_path / "state"), TERM="xterm")
    term = Terminal([sys.executable, "-m", "moed.cli", "--socket", str(d.socket), "chat", "--max-tokens", "4"], env)
    try:
        term.expect(">>> ")
        term.send("/help\r")
        assert "/save FILE" in term.expect(">>> ")
        term.send("\x03")  # Ctrl-C at an idle prompt
        assert "use /exit or Ctrl-D to leave" in term.expect(">>> ")
        term.send("/set temperature 0.5\r")
        assert "temperature = 0.5" in term.expect(">>> ")
        term.send("\x1b[Ax\r")  # Up recalls the line, the cursor at its end: edit it
        assert "temperature wants a float, got '0.5x'" in term.expect(">>> ")
        term.send("hello\r")  # a turn: the model answers, then the prompt is back
        term.expect(">>> ")
        saved = tmp_path / "talk.json"
        term.send(f"/save {saved}\r")
        assert "saved 2 message(s)" in term.expect(">>> ")
        term.send("/nonsense\r")
        assert "unknown command /nonsense" in term.expect(">>> ")
        term.send("\x04")  # Ctrl-D leaves
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] and data["params"]["temperature"] == 0.5
    history = (tmp_path / "state" / "moed" / "chat_history").read_text()
    assert "/set temperature 0.5" in history and "hello" in history


def test_multiline_messages(monkeypatch):
    lines = iter(['"""first', "second", 'third"""', "one \\", "two"])
    monkeypatch.setattr("moed.cli.chat.read_line", lambda prompt: next(lines))
    assert read_message() == "first\nsecond\nthird"
    assert read_message() == "one \ntwo"


def test_local_commands(tmp_path):
    talk = Conversation(None, {"temperature": 0.0, "max_tokens": 8})
    talk.turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert talk.command(f"/save {tmp_path / 'c.json'}").startswith("(saved 2")
    assert talk.command("/system be brief") == "(system message set; conversation reset)"
    assert talk.messages() == [{"role": "system", "content": "be brief"}]
    assert talk.command("/set max_tokens 3") == "max_tokens = 3" and talk.params["max_tokens"] == 3
    assert "usage" in talk.command("/set colour blue")
    assert talk.command(f"/load {tmp_path / 'c.json'}").startswith("(loaded 2")
    assert talk.messages()[0] == {"role": "user", "content": "hi"} and talk.params["max_tokens"] == 8
    assert talk.command("/reset") == "(conversation reset)" and talk.turns == []
    assert talk.command(f"/load {tmp_path / 'missing.json'}").startswith("cannot load")
    assert talk.command("/exit") is False and talk.command("/bye") is False


@pytest.mark.slow
def test_run_cut_short_by_stop_now_says_why(env, started, tiny_model, capsys):  # noqa: F811
    start(tiny_model, capsys)
    run = subprocess.Popen([sys.executable, "-m", "moed.cli", "run", "def f(x):", "--max-tokens", "20000", "--temperature", "1",
                            "--ignore-eos"],  # an early end-of-sequence would finish the run before the stop
                           cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = run.stdout.read(1)  # it streams
    assert first
    assert cli.main(["stop", "--now"]) == 0
    out, err = run.communicate(timeout=60)
    assert run.returncode == 1, err
    assert "cut short" in err or "shutting down" in err, err
    assert (first + out).endswith("\n")
