"""moectl chat: a multi-turn conversation with line editing, history and local /commands.

On a terminal, input goes through the standard library's readline (GNU readline or
macOS's libedit): arrows edit and recall, history persists in the user state dir.
A line that opens with triple quotes starts a multiline message, closed by a line
ending in them; a line ending in a backslash continues on the next. Lines that start
with ``/`` are commands for moectl, never sent to the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import platformdirs

from moed.cli.generate import CutShort, connect_ready, sampling, stream
from moed.cli.status import model_name
from moed.config import Config
from moed_client import MoedError

HISTORY_LINES = 1000
MULTILINE = '"""'
HELP = """\
/help                 this help
/reset                forget the conversation (keeps the system message)
/system TEXT          set the system message (and start over); /system alone shows it
/set NAME VALUE       temperature, max_tokens, seed, top_p or top_k for the next answers; /set alone lists them
/save FILE            write the conversation and settings to FILE (JSON)
/load FILE            read a conversation saved with /save
/exit, /bye           leave (Ctrl-D too)
\"\"\" ... \"\"\"           a message over several lines; a line ending in \\ continues too
Ctrl-C stops an answer; at the prompt it only clears the line."""
SETTABLE = {"temperature": float, "max_tokens": int, "seed": int, "top_p": float, "top_k": int}


def history_file() -> Path:
    return Path(platformdirs.user_state_dir("moed", appauthor=False)) / "chat_history"


def enable_line_editing() -> object | None:
    """readline with a persistent history, when stdin is a terminal; the module (None without one)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # Python built without it (some Windows builds): plain input()
        return None
    path = history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LINES)
    return readline


def save_history(readline) -> None:
    if readline is None:
        return
    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
        path.chmod(0o600)  # what a person typed to the model
    except OSError:
        pass


def read_line(prompt: str) -> str:
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def read_message() -> str:
    """One message, multiline forms joined."""
    first = read_line(">>> ")
    if first.lstrip().startswith(MULTILINE):
        body = first.lstrip()[len(MULTILINE):]
        lines = []
        while not body.rstrip().endswith(MULTILINE):
            lines.append(body)
            body = read_line("... ")
        lines.append(body.rstrip()[: -len(MULTILINE)])
        return "\n".join(lines).strip("\n")
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line("... "))
    return "\n".join(lines)


class Conversation:
    def __init__(self, system: str | None, params: dict):
        self.system = system
        self.params = params
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def command(self, line: str) -> bool | str:
        """Run one /command: what to print (a string), or False to leave."""
        name, _, rest = line[1:].strip().partition(" ")
        rest = rest.strip()
        if name in ("exit", "bye", "quit"):
            return False
        if name in ("help", "?"):
            return HELP
        if name == "reset":
            self.turns = []
            return "(conversation reset)"
        if name == "system":
            if not rest:
                return f"system message: {self.system!r}" if self.system else "(no system message)"
            self.system, self.turns = rest, []
            return "(system message set; conversation reset)"
        if name == "set":
            return self.set(rest)
        if name == "save":
            return self.save(Path(rest).expanduser()) if rest else "usage: /save FILE"
        if name == "load":
            return self.load(Path(rest).expanduser()) if rest else "usage: /load FILE"
        return f"unknown command /{name}; /help lists them"

    def set(self, rest: str) -> str:
        if not rest:
            return "\n".join(f"{k} = {v}" for k, v in sorted(self.params.items()))
        key, _, value = rest.partition(" ")
        if key not in SETTABLE or not value.strip():
            return f"usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}"
        try:
            self.params[key] = SETTABLE[key](value.strip())
        except ValueError:
            return f"{key} wants a {SETTABLE[key].__name__}, got {value.strip()!r}"
        return f"{key} = {self.params[key]}"

    def save(self, path: Path) -> str:
        data = {"system": self.system, "messages": self.turns, "params": self.params}
        try:
            path.write_text(json.dumps(data, indent=1) + "\n")
        except OSError as e:
            return f"cannot write {path}: {e.strerror}"
        return f"(saved {len(self.turns)} message(s) to {path})"

    def load(self, path: Path) -> str:
        try:
            data = json.loads(path.read_text())
            turns = data["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in turns):
                raise ValueError("messages must be {role, content} maps")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"cannot load {path}: {getattr(e, 'strerror', None) or e}"
        self.system, self.turns = data.get("system"), turns
        self.params.update({k: v for k, v in (data.get("params") or {}).items() if k in SETTABLE})
        return f"(loaded {len(turns)} message(s) from {path})"


def cmd_chat(args, cfg: Config) -> int:
    client = connect_ready(cfg)
    talk = Conversation(args.system, sampling(args, cfg))
    readline = enable_line_editing()
    print(f"moed chat with {model_name(client.status())}. /help for commands, /exit or Ctrl-D to leave.", file=sys.stderr)
    try:
        while True:
            try:
                line = read_message()
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:  # at the prompt: people press it to leave, so say how
                print("\n(use /exit or Ctrl-D to leave)", file=sys.stderr)
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                said = talk.command(line)
                if said is False:
                    return 0
                print(said, file=sys.stderr)
                continue
            talk.turns.append({"role": "user", "content": line})
            try:
                answer = stream(client, sys.stdout, False, messages=talk.messages(), **talk.params)
            except KeyboardInterrupt:
                print("\n(answer stopped)", file=sys.stderr)
                talk.turns.pop()
                continue
            except MoedError as e:
                print(f"\nmoectl: {e}", file=sys.stderr)
                talk.turns.pop()
                continue
            except CutShort as e:
                print(f"\nmoectl: {e}", file=sys.stderr)
                talk.turns.pop()
                continue
            print()
            talk.turns.append({"role": "assistant", "content": answer})
    finally:
        save_history(readline)
        client.close()
