"""Model swaps (`load`, model_changed, model_not_found, moectl start/load) and keep-alive, on real daemons."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import zmq

from conftest import wait_for
from moed import cli
from moed_client import protocol as P
from test_cli import env  # noqa: F401 - private runtime/log/home
from test_cli_daemon import started  # noqa: F401 - kills what moectl starts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def second_model(tiny_model, tmp_path_factory):
    """Another model directory (the same weights under another name): a different model to the daemon."""
    path = tmp_path_factory.mktemp("models") / "tiny-b"
    shutil.copytree(tiny_model, path)
    return path


def raw_generate(socket, **fields) -> dict:
    """The daemon's first reply to a hand-made generate map (the client library refuses unknown fields)."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{socket}")
    try:
        s.send(P.pack({"type": P.GENERATE, "id": "r1", "prompt": "hello", "max_tokens": 2, **fields}))
        assert s.poll(20000)
        return P.unpack(s.recv())
    finally:
        s.close()


def test_a_request_naming_another_model_gets_model_not_found(daemon, tiny_model):
    d = daemon(tiny_model)
    reply = raw_generate(d.socket, model="org/elsewhere")
    assert reply["type"] == P.ERROR and reply["code"] == P.ErrorCode.MODEL_NOT_FOUND and reply["id"] == "r1"
    assert "moectl load" in reply["message"]
    assert raw_generate(d.socket, model="tiny")["type"] == P.CHUNK  # its own name is fine
    assert raw_generate(d.socket, model=str(tiny_model))["type"] == P.CHUNK


def test_load_swaps_the_model_and_tells_clients(daemon, tiny_model, second_model):
    d = daemon(tiny_model)
    with d.client(timeout=30) as watcher, d.client(timeout=30) as c:
        watcher.connect()
        first_engine = watcher.status()["engine_pid"]
        assert c.load(str(second_model))["accepted"] is True
        status = wait_for(lambda: (s := c.status())["state"] == "ready" and (s.get("switch") or {}).get("state") == "done" and s, 60)
        assert status["model"]["path"] == str(second_model)
        assert status["engine_pid"] != first_engine
        watcher.status()  # reading the socket delivers the unasked notice first
        notice = watcher.model_changes[-1]
        assert notice["model"]["path"] == str(second_model) and notice["previous"] == "tiny"
        assert watcher.server["model"]["path"] == str(second_model)
        assert c.complete("hello", max_tokens=3).finish_reason in ("stop", "length")
        c.load("/no/such/model/dir")
        failed = wait_for(lambda: (s := c.status())["switch"]["state"] == "failed" and s, 30)
        assert "no such model directory" in failed["switch"]["error"]
        assert c.status()["model"]["path"] == str(second_model)  # a failed load leaves the served model be


def test_load_cancels_in_flight_work_when_told(daemon, tiny_model, second_model):
    d = daemon(tiny_model)
    with d.client(timeout=60) as c, d.client(timeout=30) as ctl:
        s = c.generate("hello world", max_tokens=20000, temperature=1.0, ignore_eos=True)
        next(iter(s))  # decoding
        ctl.load(str(second_model), drain=False)
        for _ in s:
            pass
        assert s.finish_reason == "cancelled"
        wait_for(lambda: ctl.status()["model"]["path"] == str(second_model), 60)


def test_keep_alive_unloads_when_idle_and_reloads_on_request(daemon, tiny_model):
    d = daemon(tiny_model, "--keep-alive", "0.5")
    with d.client(timeout=60) as c:
        assert c.complete("def main():", max_tokens=4).finish_reason in ("stop", "length")
        status = wait_for(lambda: (s := c.status())["state"] == "unloaded" and s, 30)
        assert status["engine_pid"] is None and status["keep_alive_s"] == 0.5
        assert c.complete("def main():", max_tokens=4).usage["completion_tokens"] >= 1  # loads it again
        assert c.status()["state"] in ("ready", "unloading", "unloaded")
    log = d.log_text()
    assert "model unloaded after" in log
    lines = [line for line in log.splitlines() if "moed.requests" in line]
    assert len(lines) == 2 and all("in=" in line and "out=" in line and "ttft=" in line and "tok/s=" in line and
                                   "finish=" in line and "client=" in line for line in lines)
    assert "def main" not in "\n".join(lines)  # no prompt text without --debug


def test_never_unloads_by_default(daemon, tiny_model):
    d = daemon(tiny_model)
    with d.client(timeout=30) as c:
        c.complete("hi", max_tokens=2)
        time.sleep(1.0)
        status = c.status()
        assert status["state"] == "ready" and status["keep_alive_s"] == -1.0


def test_moectl_start_with_another_model_fails_and_load_switches(env, started, tiny_model, second_model, capsys):  # noqa: F811
    assert cli.main(["start", "--model", str(tiny_model)]) == 0
    capsys.readouterr()
    assert cli.main(["start", "--model", str(second_model)]) == 1
    err = capsys.readouterr().err
    assert "not " + str(second_model) in err and "moectl load" in err
    assert cli.main(["start", "--model", str(tiny_model)]) == 0
    assert "already running" in capsys.readouterr().out
    assert cli.main(["load", str(second_model)]) == 0
    assert capsys.readouterr().out.strip() == "moed now serves tiny-b"
    assert cli.main(["start", "--model", str(second_model)]) == 0
    assert cli.main(["ps", "--json"]) == 0
    (ps,) = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert ps["path"] == str(second_model) and ps["since"] > time.time() - 120
    assert cli.main(["stop"]) == 0


def test_a_model_that_fails_to_load_gives_the_served_one_back(daemon, tiny_model, tmp_path):
    """`moectl load` of a directory that resolves but cannot load in the engine: the daemon goes back
    to the model it served, says why in status, and keeps serving (it used to exit)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "no_such_family"
    (broken / "config.json").write_text(json.dumps(config))
    d = daemon(tiny_model)
    with d.client(timeout=60) as c:
        assert c.load(str(broken))["accepted"] is True
        failed = wait_for(lambda: (s := c.status())["state"] == "ready" and (s.get("switch") or {}).get("state") == "failed" and s, 90)
        assert failed["model"]["path"] == str(tiny_model)
        assert failed["switch"]["error"]
        assert c.complete("hello", max_tokens=3).finish_reason in ("stop", "length")
    assert d.proc.poll() is None
