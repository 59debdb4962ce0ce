"""Configuration: TOML file < MOED_* environment < flags."""

from __future__ import annotations

import pytest

from moed import config
from moed.config import ConfigError


@pytest.fixture
def toml(tmp_path):
    path = tmp_path / "config.toml"

    def write(text: str):
        path.write_text(text)
        return path

    return write


def test_defaults_without_file_env_or_flags(tmp_path):
    c = config.load(env={}, path=tmp_path / "absent.toml")
    assert c.model is None and c.memory_budget is None and c.prefetch is True
    assert set(c.source.values()) == {"default"}
    assert c.serve_args() == []


def test_file_then_env_then_flags(toml):
    path = toml('model = "from-file"\nmemory_budget = "4G"\ncapacity = 8\nmax-tokens = 64\n')
    c = config.load(env={}, path=path)
    assert (c.model, c.memory_budget, c.capacity, c.max_tokens) == ("from-file", 4 << 30, 8, 64)
    c = config.load(env={"MOED_MODEL": "from-env", "MOED_CAPACITY": "16"}, path=path)
    assert (c.model, c.capacity, c.memory_budget) == ("from-env", 16, 4 << 30)
    c = config.load({"model": "from-flag", "capacity": None}, env={"MOED_MODEL": "from-env", "MOED_CAPACITY": "16"}, path=path)
    assert (c.model, c.capacity) == ("from-flag", 16)
    assert c.source["model"] == "flag" and c.source["capacity"] == "env" and c.source["memory_budget"] == "file"


def test_moed_config_env_names_the_file(toml):
    path = toml('approximate = true\nprefetch = false\n')
    c = config.load(env={"MOED_CONFIG": str(path)})
    assert c.approximate is True and c.prefetch is False
    assert config.config_path({"MOED_CONFIG": str(path)}) == path


def test_booleans_from_the_environment(tmp_path):
    absent = tmp_path / "none.toml"
    assert config.load(env={"MOED_APPROXIMATE": "yes", "MOED_PREFETCH": "0"}, path=absent).prefetch is False
    assert config.load(env={"MOED_APPROXIMATE": "On"}, path=absent).approximate is True
    with pytest.raises(ConfigError, match="MOED_PREFETCH: expected true or false"):
        config.load(env={"MOED_PREFETCH": "maybe"}, path=absent)


def test_empty_environment_variable_is_unset(tmp_path):
    assert config.load(env={"MOED_MODEL": ""}, path=tmp_path / "none.toml").model is None


@pytest.mark.parametrize(
    "text, size",
    [("8G", 8 << 30), ("8GB", 8 << 30), ("8gib", 8 << 30), ("512m", 512 << 20), ("1.5G", 3 << 29), ("4096", 4096), (12, 12)],
)
def test_sizes(text, size):
    assert config.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "8X", "-1G", "0", True, "1e9"])
def test_bad_sizes(text):
    with pytest.raises(ConfigError):
        config.parse_size(text)


def test_unknown_key_in_file_is_named(toml):
    path = toml('modle = "typo"\n')
    with pytest.raises(ConfigError, match="unknown setting 'modle'"):
        config.load(env={}, path=path)


def test_invalid_toml_names_the_file(toml):
    path = toml("model = \n")
    with pytest.raises(ConfigError, match=f"{path}: not valid TOML"):
        config.load(env={}, path=path)


def test_wrong_type_in_file(toml):
    with pytest.raises(ConfigError, match="capacity: expected an integer"):
        config.load(env={}, path=toml('capacity = 1.5\n'))
    with pytest.raises(ConfigError, match="model: expected a string"):
        config.load(env={}, path=toml('model = 3\n'))


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"capacity": 0}, "capacity must be at least 1"),
        ({"stop_timeout": 0}, "stop_timeout must be positive"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"http": "localhost"}, "http must be HOST:PORT"),
    ],
)
def test_invalid_values(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config.load(flags, env={}, path=tmp_path / "none.toml")


def test_network_listeners_only_when_asked(tmp_path):
    c = config.load({"http": "127.0.0.1:8080", "tcp": "[::1]:5555"}, env={}, path=tmp_path / "none.toml")
    assert c.serve_args() == ["--tcp", "[::1]:5555", "--http", "127.0.0.1:8080"]


def test_serve_args_carry_every_daemon_setting(tmp_path):
    c = config.load(
        {"model": "/m", "memory_budget": "1G", "capacity": 4, "approximate": True, "prefetch": False, "socket": "/tmp/s"},
        env={},
        path=tmp_path / "none.toml",
    )
    assert c.serve_args() == [
        "--model", "/m", "--socket", "/tmp/s", "--memory-budget", str(1 << 30), "--capacity", "4", "--approximate", "--no-prefetch",
    ]


def test_log_path_honours_moed_log_dir(tmp_path):
    c = config.load(env={"MOED_LOG_DIR": str(tmp_path / "logs")}, path=tmp_path / "none.toml")
    assert c.log_path() == tmp_path / "logs" / "moed.log"


def test_serve_args_from_chosen_sources(toml):
    path = toml("capacity = 3\n")
    c = config.load({"model": "/m"}, env={"MOED_APPROXIMATE": "1"}, path=path)
    assert c.serve_args() == ["--model", "/m", "--capacity", "3", "--approximate"]
    assert c.serve_args(frozenset({"flag"})) == ["--model", "/m"]
    assert c.serve_args(frozenset({"env", "file"})) == ["--capacity", "3", "--approximate"]


# Every `moed serve` option is reachable from moectl start and config.toml (issue 19).
CORE_SERVE_DESTS = {"model": "model", "socket": "socket", "tcp": "tcp", "http": "http", "capacity": "capacity",
                    "memory_budget": "memory_budget", "approximate": "approximate", "no_prefetch": "prefetch",
                    "max_clients": "max_clients", "keep_alive": "keep_alive", "allow_switching": "allow_switching"}


def serve_actions():
    from moed.front import main

    parser = main.build_parser()
    serve = next(a for a in parser._subparsers._group_actions).choices["serve"]
    return [a for a in serve._actions if a.option_strings and a.dest not in ("help", "http_token")]


def test_every_serve_option_is_a_setting_and_a_moectl_start_flag():
    from moed import cli

    daemon = {s.serve_flag: s.name for s in config.DAEMON}
    moectl = cli.build_parser()
    start = next(a for a in moectl._subparsers._group_actions).choices["start"]
    start_dests = {a.dest for p in (moectl, start) for a in p._actions}  # --socket is moectl's own
    for action in serve_actions():
        flag = action.option_strings[0]
        name = CORE_SERVE_DESTS.get(action.dest) or daemon.get(flag)
        assert name in config.BY_NAME, f"moed serve {flag} has no config.toml setting"
        assert name in start_dests, f"moed serve {flag} cannot be given to moectl start"


def test_config_file_reaches_moed_serve_and_its_flags_win(tmp_path, monkeypatch):
    from moed.front import main

    path = tmp_path / "config.toml"
    path.write_text("max_batch = 3\nmax_tokens_limit = 100\ndebug = true\nprompt_cache_bytes = '64M'\nshutdown_timeout = 5\n")
    monkeypatch.setenv("MOED_CONFIG", str(path))
    for name in list(__import__("os").environ):
        if name.startswith("MOED_") and name != "MOED_CONFIG":
            monkeypatch.delenv(name)

    def serve(*argv):
        parser = main.build_parser()
        args = parser.parse_args(["serve", *argv])
        args.given = main.given_options(parser, ["serve", *argv])
        main.apply_config(args)
        return args

    args = serve()
    assert (args.max_batch, args.max_tokens, args.debug, args.prompt_cache_bytes, args.shutdown_timeout) == (3, 100, True, 64 << 20, 5.0)
    args = serve("--max-batch", "8", "--max-tok=7")  # a flag wins, at its default value or abbreviated too
    assert (args.max_batch, args.max_tokens, args.max_queue) == (8, 7, 64)


def test_moectl_start_carries_daemon_settings_to_moed_serve(tmp_path):
    c = config.load({"max_batch": "2", "no_solo": True, "max_tokens_limit": "9", "engine_timeout": "0", "keep_alive": "5m",
                     "max_clients": 3}, env={}, path=tmp_path / "none.toml")
    args = c.serve_args()
    assert args == ["--max-clients", "3", "--keep-alive", "300", "--max-batch", "2", "--no-solo", "--max-tokens", "9", "--engine-timeout", "0"]
    assert c.serve_args(frozenset({"file"})) == []


def test_durations():
    assert [config.parse_duration(v) for v in ("5m", "30", "1.5s", "500ms", "1h", 0, "-1", -5)] == [300, 30, 1.5, 0.5, 3600, 0, -1, -1]
    with pytest.raises(ConfigError, match="not a duration"):
        config.parse_duration("soon")
