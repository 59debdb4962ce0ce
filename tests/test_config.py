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
