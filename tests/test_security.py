"""Security by default: private runtime files, a runtime dir others cannot
write, no prompt text in logs (unless --debug), TCP refuses keys it has not
authorized, the HTTP gateway never answers hostile bodies with a crash.
(Host/Origin/bearer checks: tests/test_http.py; CURVE basics and loopback-only
TCP: tests/test_daemon_lifecycle.py.)"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import uuid
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.launch import http_auth
from moed_client import protocol as P


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(scope="module")
def gated(test_model):
    """A daemon with every local door open: ZeroMQ, editor socket, HTTP gateway on loopback."""
    from conftest import DaemonProcess

    d = DaemonProcess(test_model, ("--http", "127.0.0.1:0"))
    try:
        d.status = d.wait_ready()
        yield d
    finally:
        d.kill()


# --------------------------------------------------------------------------
# Files


def test_runtime_files_are_private(gated):
    d = gated
    assert mode(d.runtime_dir) == 0o700
    files = {p.name: p for p in d.runtime_dir.iterdir() if p.name != "logs"}
    assert {"moed.sock", "moed.pid", "editor.sock"} <= set(files)
    assert any(n.startswith("engine-") for n in files), files  # the private engine channel
    for name, p in files.items():
        assert mode(p) == 0o600, f"{name} is {oct(mode(p))}"
        assert p.lstat().st_uid == os.getuid()
    logs = list(d.log_dir.glob("*.log"))
    assert logs and all(mode(p) == 0o600 for p in logs), [(p.name, oct(mode(p))) for p in logs]


@pytest.mark.parametrize("bad", ["world-writable", "group-writable", "symlink"])
def test_refuses_a_runtime_dir_others_could_write(daemon, bad):
    from conftest import short_tmpdir

    base = short_tmpdir()
    runtime = base / "rt"
    if bad == "symlink":
        (base / "real").mkdir(mode=0o700)
        runtime.symlink_to(base / "real")
    else:
        runtime.mkdir()
        os.chmod(runtime, 0o777 if bad == "world-writable" else 0o770)
    d = daemon(None, env={"MOED_RUNTIME_DIR": str(runtime), "MOED_LOG_DIR": str(base / "logs")}, ready=False)
    try:
        assert d.proc.wait(timeout=60) == 1
        out = d.output()
        assert "writable by other users" in out or "not a plain directory" in out, out
        assert not (runtime / "moed.sock").exists()
        if bad != "symlink":
            assert mode(runtime) in (0o777, 0o770)  # refused, not silently "fixed"
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_a_readable_runtime_dir_is_tightened(daemon):
    from conftest import short_tmpdir

    runtime = short_tmpdir()
    os.chmod(runtime, 0o755)
    d = daemon(None, env={"MOED_RUNTIME_DIR": str(runtime)}, ready=False)
    d.runtime_dir, d.socket = runtime, runtime / "moed.sock"
    d.wait_ready()
    assert mode(runtime) == 0o700


# --------------------------------------------------------------------------
# Logs


def _post(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **http_auth(), **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, {"raw": data.decode(errors="replace")}
    finally:
        conn.close()


def _send_secrets(d, marker: str) -> None:
    with d.client(timeout=30) as c:
        c.complete(f"hello {marker}zmq", max_tokens=2)
        c.complete(messages=[{"role": "user", "content": f"{marker}chat"}], max_tokens=2)
        with pytest.raises(Exception):  # a refused request must not log its prompt either
            c.complete(f"{marker}refused", max_tokens=10**9)
    status, _ = _post(d.status["http"], "/v1/completions", {"model": "embedded", "prompt": f"{marker}http", "max_tokens": 2})
    assert status == 200


def test_no_prompt_text_in_logs(gated):
    marker = uuid.uuid4().hex
    _send_secrets(gated, marker)
    text = gated.log_text()
    assert text.strip(), "the daemon wrote no log at all"
    assert marker not in text


def test_debug_logging_is_what_shows_prompts(daemon):
    # The counterpart of the test above: a check that could not see a prompt would prove nothing.
    d = daemon(None, "--debug", "--http", "127.0.0.1:0")
    d.status = d.wait_ready()
    marker = uuid.uuid4().hex
    _send_secrets(d, marker)
    assert marker in d.log_text()


# --------------------------------------------------------------------------
# TCP: only authorized CURVE keys


def test_tcp_refuses_a_curve_key_it_has_not_authorized(daemon, tmp_path):
    import zmq.auth

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    curve_dir = tmp_path / "curve"
    d = daemon(None, "--tcp", f"127.0.0.1:{port}", env={"MOED_CURVE_DIR": str(curve_dir)})
    server_public, _ = zmq.auth.load_certificate(curve_dir / "server.key")
    public, secret = zmq.curve_keypair()  # a stranger who knows the server's public key

    def exchange(pub, sec, *frames: bytes) -> list[dict | None]:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, pub, sec
        sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            replies = []
            for frame in frames:
                sock.send(frame)
                replies.append(P.unpack(sock.recv()) if sock.poll(1500) else None)
            return replies
        finally:
            sock.close()

    assert exchange(public, secret, P.pack(P.hello())) == [None]
    authorized_public, authorized_secret = zmq.auth.load_certificate(curve_dir / "client.key_secret")
    # The same code path works with a real key, and hostile frames on this door get errors as on the Unix socket.
    hello, junk, deep, ping = exchange(authorized_public, authorized_secret, P.pack(P.hello()), b"\xc1",
                                       b"\x82\xa4type\xa4ping\xa1v" + b"\x91" * 5000 + b"\x00", P.pack({"type": P.PING}))
    assert hello["type"] == P.HELLO and ping["type"] == P.PONG
    assert junk["code"] == deep["code"] == P.ErrorCode.BAD_MESSAGE
    with d.client() as c:
        assert c.status()["state"] == "ready"


# --------------------------------------------------------------------------
# HTTP: hostile bodies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda v: st.lists(v, max_size=4) | st.dictionaries(st.text(max_size=8), v, max_size=4),
    max_leaves=20,
)
openai_fields = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={
        "prompt": json_values | st.text(max_size=20) | st.lists(st.integers(-3, 2**40), max_size=4),
        "messages": json_values | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]), "content": json_values}), max_size=3),
        "max_tokens": json_values | st.integers(-(2**40), 2**40),
        "max_completion_tokens": json_values,
        "temperature": json_values, "top_p": json_values, "stop": json_values, "stream": st.booleans() | json_values,
        "n": json_values, "seed": json_values, "logprobs": json_values, "stream_options": json_values,
    },
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=openai_fields)
def test_http_hostile_bodies_get_client_errors(gated, path, body):
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and body[name] > 64:
            body[name] = 64  # valid requests are served: keep them short
    status, reply = _post(gated.status["http"], path, body)
    assert status < 500, (status, reply)
    if status != 200:
        assert isinstance(reply.get("error"), dict) and reply["error"].get("message"), reply


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe\x00garbage", b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "' + b"\xc3\x28" * 10 + b'"}', b"{}" * 1000],
    ids=["binary", "deep-json", "invalid-utf8", "trailing"],
)
def test_http_undecodable_bodies(gated, payload):
    host, port = gated.status["http"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json", **http_auth()})
        resp = conn.getresponse()
        assert 400 <= resp.status < 500, resp.status
        assert json.loads(resp.read())["error"]["message"]
    finally:
        conn.close()
    with gated.client() as c:
        assert c.status()["state"] == "ready"


def test_moectl_console_log_is_private(tmp_path, monkeypatch):
    """`moectl start` sends the daemon's stderr (the same lines as its log) to a file: 0600 too."""
    from moed import config
    from moed.cli import daemon as cli_daemon, runtime as cli_runtime

    spawned = []
    monkeypatch.setattr(cli_daemon.subprocess, "Popen", lambda *a, **k: spawned.append((a, k)))
    cfg = config.load({"log_dir": str(tmp_path / "logs")}, env={}, path=tmp_path / "none.toml")
    cli_daemon.spawn_detached(cfg)
    assert spawned and mode(cli_runtime.console_log(cfg)) == 0o600


def test_editor_socket_is_born_private(tmp_path, monkeypatch):
    """The editor socket is 0600 from the moment it exists, not only after the chmod that follows (a
    rebind under a running daemon showed it 0755 in that window)."""
    import asyncio

    from moed.doors import editor

    seen = {}
    start = asyncio.start_unix_server

    async def start_and_look(*args, path, **kwargs):
        server = await start(*args, path=path, **kwargs)
        seen["mode"] = stat.S_IMODE(os.lstat(path).st_mode)  # before editor.py's chmod runs
        return server

    monkeypatch.setattr(editor.asyncio, "start_unix_server", start_and_look)
    monkeypatch.setattr(os, "umask", os.umask)
    old = os.umask(0o022)  # a usual login umask: sockets would be born 0755
    try:
        async def run():
            server = editor.EditorServer(backend=None, path=tmp_path / "run" / "editor.sock")
            await server.start()
            server._server.close()

        asyncio.run(run())
    finally:
        os.umask(old)
    assert seen["mode"] == 0o600, oct(seen["mode"])
