"""Settings for moed and moectl: a TOML file < ``MOED_*`` environment variables < flags.

The file is ``config.toml`` in the platform's config dir (``~/Library/Application
Support/moed`` on macOS, ``~/.config/moed`` on Linux); ``MOED_CONFIG`` names
another file. Every setting has one name, used as the TOML key, as the
environment variable (``MOED_`` + upper case) and as the flag (``--`` + dashes).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import platformdirs

from moed.channel import ENGINE_DEFAULTS as ENGINE
from moed.channel import EngineOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

APP = "moed"


class ConfigError(Exception):
    """A setting that cannot be used, with a message meant for a person."""


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # str, int, float, bool, "size" (bytes, parsed by parse_size) or "duration" (parse_duration)
    default: Any
    help: str
    serve_flag: str | None = None  # a daemon setting moed serve takes as this flag and defaults itself (DAEMON)


SIZE = "size"
DURATION = "duration"  # seconds, from 30, 30s, 5m, 1h; negative: never
# Keep the model loaded however long the daemon idles (ollama's default is 5m): moed exists to keep one
# model warm for many clients, and a reload costs the load time plus the experts' cache warmth and
# the prompt caches. Set keep_alive (e.g. 10m) where the RAM matters more than the next answer's latency.
KEEP_ALIVE_NEVER = -1.0
MAX_CLIENTS = 64  # per door (ZeroMQ, editor socket, HTTP), before 'busy'; docs/limits.md

SETTINGS = (
    Setting("model", str, None, "local model directory or Hugging Face repo id (default: the embedded model)"),
    Setting("memory_budget", SIZE, ENGINE.memory_budget, "memory the expert caches may use, e.g. 8G (default: the whole model in memory)"),
    Setting("capacity", int, ENGINE.capacity, "expert slots per layer (overrides the one derived from memory_budget)"),
    Setting("approximate", bool, ENGINE.approximate, "allow approximate output (skip experts missing from the cache)"),
    Setting("prefetch", bool, not ENGINE.no_prefetch, "stream predicted experts from disk ahead of the router"),
    Setting("socket", str, None, "daemon socket path (default: moed.sock in the runtime dir)"),
    Setting("tcp", str, None, "also listen on HOST:PORT for protocol v1 (off unless set)"),
    Setting("http", str, None, "serve the OpenAI-compatible gateway on HOST:PORT (off unless set)"),
    Setting("max_clients", int, MAX_CLIENTS, "clients each door serves at once before answering 'busy' (see docs/limits.md)"),
    Setting("keep_alive", DURATION, KEEP_ALIVE_NEVER, "unload the model after this long idle (0: after each request, -1: never), e.g. 5m"),
    Setting("allow_switching", bool, False, "let a request naming another model switch the daemon to it (else: model_not_found)"),
    Setting("log_dir", str, None, "where the daemon's log goes (default: the platform log dir)"),
    Setting("start_timeout", float, 1800.0, "seconds moectl start waits for the model to be ready"),
    Setting("stop_timeout", float, 40.0, "seconds moectl stop waits for a graceful exit (the daemon drains for 30) before signalling"),
    Setting("max_tokens", int, 512, "moectl run/chat: most tokens per answer"),
    Setting("temperature", float, 0.0, "moectl run/chat: sampling temperature (0 = greedy)"),
)

def _daemon_settings() -> tuple[Setting, ...]:
    """The rest of ``moed serve``'s options, for moectl start and config.toml. Their defaults stay where they
    are written once (EngineOptions, moed serve's parser): None here means "the daemon's default"."""
    shared = {"capacity", "memory_budget", "approximate", "no_prefetch"}  # above, under their moectl names
    engine = tuple(
        Setting(f.name, bool if f.metadata["flag"] == "switch" else SIZE if f.metadata["kind"] == "size" else f.metadata["kind"],
                None, f"{f.metadata['help']} (default {f.default})", "--" + f.name.replace("_", "-"))
        for f in fields(EngineOptions) if f.name not in shared
    )
    return engine + (
        Setting("max_queue", int, None, "requests waiting beyond the batch before 'busy'", "--max-queue"),
        Setting("max_tokens_limit", int, None, "largest max_tokens a request may ask for (moed serve --max-tokens)", "--max-tokens"),
        Setting("shutdown_timeout", float, None, "seconds in-flight requests get on shutdown", "--shutdown-timeout"),
        Setting("engine_timeout", float, None, "seconds without an engine heartbeat before it is restarted (0: never)", "--engine-timeout"),
        Setting("hang_timeout", float, None, "seconds a ready engine may beat without progress before it is restarted", "--hang-timeout"),
        Setting("tcp_allow_remote", bool, None, "allow tcp on a non-loopback address", "--tcp-allow-remote"),
        Setting("http_allow_remote", bool, None, "let http bind a non-loopback address (needs a token)", "--http-allow-remote"),
        Setting("http_no_auth", bool, None, "serve http without its bearer token: every local account can use it (moectl status warns)",
                "--http-no-auth"),
        Setting("no_editor", bool, None, "do not open the editor socket", "--no-editor"),
        # Not http_token: a secret does not belong in a file other tools read; MOED_HTTP_TOKEN carries it.
    )


DAEMON = _daemon_settings()
SETTINGS = SETTINGS + DAEMON
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    model: str | None = None
    memory_budget: int | None = ENGINE.memory_budget
    capacity: int | None = ENGINE.capacity
    approximate: bool = ENGINE.approximate
    prefetch: bool = not ENGINE.no_prefetch
    socket: str | None = None
    tcp: str | None = None
    http: str | None = None
    max_clients: int = MAX_CLIENTS
    keep_alive: float = KEEP_ALIVE_NEVER
    allow_switching: bool = False
    log_dir: str | None = None
    start_timeout: float = 1800.0
    stop_timeout: float = 40.0
    max_tokens: int = 512
    temperature: float = 0.0
    daemon: Mapping[str, Any] | None = None  # the DAEMON settings: name -> value (None: the daemon's default)
    source: Mapping[str, str] | None = None  # setting -> "default" | "file" | "env" | "flag"

    def serve_args(self, sources: frozenset[str] | None = None) -> list[str]:
        """The ``moed serve`` flags that carry this configuration to the daemon.

        ``sources`` keeps only settings that came from there (e.g. ``{"flag"}``: what
        the daemon would not find by reading the same config file and environment).
        """

        def given(name: str) -> bool:
            return getattr(self, name) is not None and (sources is None or (self.source or {}).get(name) in sources)

        args: list[str] = []
        for name, flag in (("model", "--model"), ("socket", "--socket"), ("tcp", "--tcp"), ("http", "--http")):
            if given(name):
                args += [flag, str(getattr(self, name))]
        if given("memory_budget"):
            args += ["--memory-budget", str(self.memory_budget)]
        if given("capacity"):
            args += ["--capacity", str(self.capacity)]
        if given("max_clients") and (self.source or {}).get("max_clients", "default") != "default":
            args += ["--max-clients", str(self.max_clients)]
        if given("keep_alive") and self.keep_alive != KEEP_ALIVE_NEVER:
            args += ["--keep-alive", f"{self.keep_alive:g}"]
        if self.allow_switching and given("allow_switching"):
            args.append("--allow-switching")
        if self.approximate and given("approximate"):
            args.append("--approximate")
        if not self.prefetch and given("prefetch"):
            args.append("--no-prefetch")
        for setting in DAEMON:
            value = (self.daemon or {}).get(setting.name)
            if value is None or value is False or (sources is not None and (self.source or {}).get(setting.name) not in sources):
                continue
            args += [setting.serve_flag] if value is True else [setting.serve_flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return args

    def log_path(self) -> Path:
        return Path(self.log_dir).expanduser() / "moed.log" if self.log_dir else default_log_dir() / "moed.log"


assert [f.name for f in fields(Config)][:-2] == [s.name for s in SETTINGS if s.serve_flag is None], "Config fields and SETTINGS disagree"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    override = env.get("MOED_CONFIG")
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir(APP, appauthor=False)) / "config.toml"


def default_log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP, appauthor=False))


def env_name(name: str) -> str:
    return "MOED_" + name.upper()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str | int) -> int:
    """Bytes from ``8G``, ``8GB``, ``8GiB``, ``512m`` or a plain byte count. Units are powers of 1024."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(f"not a size: {value!r} (use a byte count or a number with K, M, G or T, e.g. 8G)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"a size must be positive, got {value!r}")
    return size


def format_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600}


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``30``, ``30s``, ``5m``, ``1h`` or ``500ms`` (ollama's keep_alive spellings); any negative: -1 (never)."""
    if isinstance(value, bool):
        raise ConfigError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(f"not a duration: {value!r} (use seconds or a number with ms, s, m or h, e.g. 5m; -1: never)")
        seconds = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]
    return KEEP_ALIVE_NEVER if seconds < 0 else seconds


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(setting: Setting, value: Any, where: str) -> Any:
    """``value`` (a TOML value, or a string from the environment) as the setting's kind."""
    try:
        if setting.kind == SIZE:
            return parse_size(value)
        if setting.kind == DURATION:
            return parse_duration(value)
        if setting.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ConfigError(f"expected true or false, got {value!r}")
        if setting.kind is int:
            if isinstance(value, bool) or isinstance(value, float):
                raise ConfigError(f"expected an integer, got {value!r}")
            return int(value)
        if setting.kind is float:
            if isinstance(value, bool):
                raise ConfigError(f"expected a number, got {value!r}")
            return float(value)
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}")
        return value
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {setting.kind.__name__}, got {value!r}") from None


def read_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML file; a missing file is an empty one."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in BY_NAME:
            known = ", ".join(BY_NAME)
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {known})")
        values[name] = _convert(BY_NAME[name], value, f"{path}: {key}")
    return values


def load(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, path: Path | None = None) -> Config:
    """Defaults < config file < ``MOED_*`` environment < ``flags`` (``None`` flag values are unset)."""
    env = os.environ if env is None else env
    path = config_path(env) if path is None else path
    values = {s.name: s.default for s in SETTINGS}
    source = {s.name: "default" for s in SETTINGS}
    for name, value in read_file(path).items():
        values[name], source[name] = value, "file"
    for s in SETTINGS:
        raw = env.get(env_name(s.name))
        if raw is not None and raw != "":
            values[s.name], source[s.name] = _convert(s, raw, f"environment variable {env_name(s.name)}"), "env"
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name not in BY_NAME:
            raise ConfigError(f"unknown setting {name!r}")
        values[name], source[name] = _convert(BY_NAME[name], value, f"--{name.replace('_', '-')}"), "flag"
    _check(values)
    daemon = {s.name: values.pop(s.name) for s in DAEMON}
    return Config(**values, daemon=daemon, source=source)


def _check(values: dict[str, Any]) -> None:
    for name in ("capacity", "max_tokens", "max_clients"):
        if values[name] is not None and values[name] < 1:
            raise ConfigError(f"{name} must be at least 1, got {values[name]}")
    for name in ("start_timeout", "stop_timeout"):
        if values[name] <= 0:
            raise ConfigError(f"{name} must be positive, got {values[name]}")
    if values["temperature"] < 0:
        raise ConfigError(f"temperature must be >= 0, got {values['temperature']}")
    for name in ("tcp", "http"):
        if values[name] is not None and not re.match(r"^[^\s:]*:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$", values[name]):
            raise ConfigError(f"{name} must be HOST:PORT, got {values[name]!r}")
