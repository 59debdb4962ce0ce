"""The HTTP gateway's guards (issue 18.1, 18.2, 18.7; 20.4): the token, slow and oversized bodies,
bad bytes, and errors in each API's own JSON shape, against a real daemon on loopback."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from urllib.parse import urlparse

import openai
import pytest

from bench.launch import http_auth
from moed import cli
from moed.doors import http_token
from test_http import MESSAGES, PROMPT, oai, raw


@pytest.fixture(scope="module")
def served(shared_daemon_http):
    return shared_daemon_http


@pytest.fixture(scope="module")
def shared_daemon_http(test_model):
    from conftest import gateway_daemon

    with gateway_daemon(test_model, "--max-clients", "4") as served:
        yield served


def read_reply(s: socket.socket) -> bytes:
    """One whole HTTP reply (headers and a Content-Length body), without waiting for the connection to close."""
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < content_length(reply):
        chunk = s.recv(65536)
        assert chunk, reply
        reply += chunk
    return reply


def content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def send_raw(url: str, data: bytes, timeout: float = 30) -> bytes:
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(data)
        return read_reply(s)


def head(url: str, method: str, path: str, extra: str = "", auth: bool = True) -> bytes:
    lines = f"{method} {path} HTTP/1.1\r\nHost: {urlparse(url).netloc}\r\nContent-Type: application/json\r\n"
    if auth:
        lines += f"Authorization: {http_auth()['Authorization']}\r\n"
    return (lines + extra).encode()


def parse(reply: bytes) -> tuple[int, dict]:
    header, _, payload = reply.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(payload)


# --------------------------------------------------------------------------
# 18.1: a token made at first start, required on every route


def test_token_is_made_at_first_start_in_a_private_file_and_moectl_prints_it(served, capsys):
    path = http_token.token_file()
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 40
    assert cli.main(["http-token"]) == 0
    assert capsys.readouterr().out.strip() == token


@pytest.mark.parametrize("path, method", [("/health", "GET"), ("/v1/models", "GET"), ("/v1/models/x", "GET"), ("/v1/nothing", "GET"),
                                          ("/v1/completions", "POST"), ("/v1/messages", "POST")])
def test_every_route_needs_the_token(served, path, method):
    _, url = served
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        status, body = raw(url, method, path, b"{}", headers)
        assert status == 401, (path, headers, body)
        if path == "/v1/messages":
            assert body == {"type": "error", "error": {"type": "authentication_error", "message": body["error"]["message"]}}
        else:
            assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        oai(url, key="not-the-token").models.list()


def test_x_api_key_is_the_token_too(served):
    _, url = served
    status, _ = raw(url, "GET", "/v1/models", headers={"Authorization": "", "x-api-key": http_token.load()})
    assert status == 200


def test_no_auth_is_explicit_and_status_warns(daemon, capsys, monkeypatch):
    d = daemon(None, "--http", "127.0.0.1:0", "--http-no-auth")
    status = d.wait_ready()
    assert status["http_auth"] == "none"
    assert raw(status["http"], "GET", "/v1/models", headers={"Authorization": ""})[0] == 200
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(d.runtime_dir))
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: no token" in out and status["http"] in out
    logs = "".join(p.read_text() for p in d.log_dir.rglob("*.log"))
    assert "has no token (--http-no-auth)" in logs


def test_a_token_file_others_can_read_is_refused(daemon, tmp_path):
    bad = tmp_path / "http-token"
    bad.write_text("guessable\n")
    os.chmod(bad, 0o644)
    d = daemon(None, "--http", "127.0.0.1:0", ready=False, env={http_token.FILE_ENV: str(bad)})
    assert d.proc.wait(timeout=30) == 1
    assert "readable or writable by other users" in d.output()


def test_first_starts_agree_on_one_token(tmp_path, monkeypatch):
    monkeypatch.setenv(http_token.FILE_ENV, str(tmp_path / "dir" / "http-token"))
    code = "from moed.doors import http_token; print(http_token.load_or_create())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    tokens = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(tokens) == 1 and tokens == {http_token.load()}
    assert sorted(os.listdir(tmp_path / "dir")) == ["http-token"]  # no temporary files left


# --------------------------------------------------------------------------
# 18.7: bad bytes get 400 in OpenAI's shape


def test_raw_0xff_in_authorization_is_a_400(served):
    _, url = served
    reply = send_raw(url, head(url, "GET", "/v1/models", auth=False) + b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
    status, body = parse(reply)
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "ASCII" in body["error"]["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
    ("/v1/messages", b'{"max_tokens": 2, "messages": [{"role": "user", "content": "x\\ud800"}]}'),
])
def test_a_lone_surrogate_is_a_400(served, path, body):
    _, url = served
    status, reply = raw(url, "POST", path, body)
    assert status == 400, reply
    assert "surrogate" in reply["error"]["message"]
    assert oai(url).completions.create(model="embedded", prompt=PROMPT, max_tokens=2).choices[0].finish_reason in ("length", "stop")


# --------------------------------------------------------------------------
# 18.2: oversized and slow bodies


def test_declared_length_over_the_max_is_413_at_once(served):
    _, url = served
    t0 = time.monotonic()
    reply = send_raw(url, head(url, "POST", "/v1/completions", f"Content-Length: {10 * 2**30}\r\n\r\n"), timeout=10)
    status, body = parse(reply)
    assert status == 413 and body["error"]["code"] == "limit_exceeded"
    assert time.monotonic() - t0 < 3


def test_slow_bodies_take_no_slot(served):
    """More trickling connections than --max-clients (4): a good request is still served at once."""
    _, url = served
    u = urlparse(url)
    slow = []
    try:
        for _ in range(12):
            s = socket.create_connection((u.hostname, u.port), timeout=30)
            s.sendall(head(url, "POST", "/v1/completions", "Content-Length: 1000\r\n\r\n") + b'{"pro')
            slow.append(s)
        time.sleep(0.3)
        t0 = time.monotonic()
        got = oai(url).completions.create(model="embedded", prompt=PROMPT, max_tokens=2, temperature=0)
        assert got.choices[0].finish_reason in ("length", "stop") and time.monotonic() - t0 < 10
        assert raw(url, "GET", "/health")[0] == 200
    finally:
        for s in slow:
            s.close()


def test_a_body_that_does_not_arrive_in_time_is_408(served):
    """The standalone gateway with a 1 s body timeout: a trickling body gets 408 and its connection is closed."""
    d, _ = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moed.doors.http", "--listen", f"127.0.0.1:{port}", "--socket", str(d.socket),
                             "--http-body-timeout", "1"], env=d.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while "listening on" not in (line := proc.stdout.readline()):
            assert line, "the gateway exited"
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head(url, "POST", "/v1/completions", "Content-Length: 100\r\n\r\n") + b"{")
            for _ in range(3):  # a byte now and then, never the whole body
                time.sleep(0.4)
                try:
                    s.sendall(b" ")
                except OSError:
                    break
            reply = read_reply(s)
            assert time.monotonic() - t0 < 5
            s.settimeout(5)
            assert s.recv(1) == b""  # and the connection is closed: no lingering for the rest
        status, body = parse(reply)
        assert status == 408 and "did not arrive within 1 s" in body["error"]["message"]
    finally:
        proc.kill()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------
# 20.4: errors in the API's own shape, unknown fields, GET /v1/models/{id}


def test_unknown_routes_and_methods_get_json_in_the_apis_shape(served):
    _, url = served
    status, body = raw(url, "GET", "/v1/embeddings")
    assert status == 404 and body["error"]["type"] == "not_found_error" and body["error"]["code"] == "not_found"
    status, body = raw(url, "POST", "/v1/embeddings", b'{"input": "x"}')
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = raw(url, "GET", "/v1/chat/completions")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, body = raw(url, "POST", "/v1/messages/count_tokens", b"{}")
    assert status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    status, body = raw(url, "GET", "/v1/messages")
    assert status == 405 and body["type"] == "error"


def test_get_model_by_id(served):
    d, url = served
    client = oai(url)
    served_id = client.models.list().data[0].id
    assert client.models.retrieve(served_id).id == served_id
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"


def test_unknown_fields_are_ignored_and_named(served):
    _, url = served
    got = oai(url).chat.completions.with_raw_response.create(model="embedded", messages=MESSAGES, max_tokens=2, temperature=0,
                                                             extra_body={"frobnicate": 1, "metadata": {"a": "b"}})
    assert got.headers["X-Moed-Ignored-Fields"] == "frobnicate,metadata"
    assert got.parse().choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),  # json_object and json_schema: tests/test_http_tools.py
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),  # the legacy form of tools
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
])
def test_fields_moed_cannot_honour_get_400_never_silence(served, extra, param):
    _, url = served
    body = {"messages": MESSAGES, "max_tokens": 2, **extra}
    status, reply = raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and reply["error"]["param"] == param, reply


def test_neutral_values_are_fine(served):
    _, url = served
    body = {"messages": MESSAGES, "max_tokens": 2, "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0}
    assert raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode())[0] == 200


def test_gateway_errors_never_500_in_plain_text(served):
    """Odd but well-formed requests: JSON errors of the right shape, and the gateway goes on."""
    _, url = served
    for path, body in (("/v1/completions", b'{"prompt": 5}'), ("/v1/messages", b'{"messages": 5}'), ("/v1/chat/completions", b'{"messages": [5]}')):
        status, reply = raw(url, "POST", path, body)
        assert status == 400 and isinstance(reply, dict), reply


@pytest.mark.parametrize("field", [{"stop": ["a"] * 300_000}, {"prompt": list(range(300_000))}])
def test_an_over_long_array_gets_400_at_once(served, field):
    """Issue 18.3 through the gateway: the daemon's rejection carries the request id, so the gateway's
    client fails the request at once and the answer is a 400 (it used to be a 504 after 120 s)."""
    _, url = served
    body = json.dumps({"model": "embedded", "prompt": "x", "max_tokens": 4, **field}).encode()
    start = time.monotonic()
    status, reply = raw(url, "POST", "/v1/completions", body)
    assert status == 400, reply
    assert isinstance(reply, dict) and "error" in reply
    assert time.monotonic() - start < 30
