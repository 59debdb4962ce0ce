"""The OpenAI-compatible gateway (``moed serve --http``), driven by the official ``openai`` package and raw sockets."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import openai
import pytest

from bench.launch import http_auth
from conftest import DaemonProcess, find_long_generation, gateway_daemon
from moed.doors import http as gateway
from moed.doors import http_token

PROMPT = "1 2 3 4 5 6 7 8 9 10 11 12"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def served(test_model):
    """(daemon, base url) of one daemon with the gateway on an ephemeral loopback port."""
    with gateway_daemon(test_model) as (d, url):
        assert url.startswith("http://127.0.0.1:")
        yield d, url


def oai(url: str, key: str | None = None, **kwargs) -> openai.OpenAI:
    """An SDK client with the gateway's token (from the tests' private token file) unless told another key."""
    return openai.OpenAI(base_url=url + "/v1", api_key=key or http_token.load(), max_retries=0, timeout=60, **kwargs)


def raw(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict | str]:
    """One HTTP/1.1 request on a fresh socket; (status, parsed JSON body or text)."""
    u = urlparse(url)
    head = {"Host": u.netloc, "Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close", **http_auth(),
            **(headers or {})}
    data = f"{method} {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + body
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading it all (an oversized body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    header, _, payload = reply.partition(b"\r\n\r\n")
    status = int(header.split()[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


def active_requests(d: DaemonProcess) -> int:
    with d.client(timeout=10) as c:
        r = c.status()["requests"]
    return r["active"] + r["queued"]


# --------------------------------------------------------------------------
# Answers equal the daemon's own


def test_completions_match_the_protocol_client(served):
    d, url = served
    client = oai(url)
    got = client.completions.create(model="embedded", prompt=PROMPT, max_tokens=12, temperature=0)
    with d.client() as c:
        want = c.complete(PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == want.usage["completion_tokens"]
    assert got.usage.prompt_tokens == want.usage["prompt_tokens"]
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.object == "text_completion" and got.id.startswith("cmpl-")


def test_chat_matches_the_protocol_client(served):
    d, url = served
    got = oai(url).chat.completions.create(model="embedded", messages=MESSAGES, max_tokens=12, temperature=0, seed=3)
    with d.client() as c:
        want = c.complete(messages=MESSAGES, max_tokens=12, temperature=0, seed=3)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == want.usage["completion_tokens"]


def test_streaming_equals_non_streaming(served):
    _, url = served
    client = oai(url)
    whole = client.chat.completions.create(model="embedded", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="embedded", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1

    whole = client.completions.create(model="embedded", prompt=PROMPT, max_tokens=10, temperature=0)
    pieces = list(client.completions.create(model="embedded", prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_models_and_health(served):
    d, url = served
    models = oai(url).models.list().data
    with d.client() as c:
        name = c.status()["model"]
    assert [m.id for m in models] == [name.get("display_name") or name["name"]]
    assert raw(url, "GET", "/health") == (200, {"status": "ok"})


# --------------------------------------------------------------------------
# Bad input: an error to that client, nothing else affected


@pytest.mark.parametrize(
    "path, body, status, code",
    [
        ("/v1/chat/completions", b"{not json", 400, "bad_message"),
        ("/v1/chat/completions", b"[1, 2]", 400, "bad_message"),
        ("/v1/chat/completions", b"\xff\xfe", 400, "bad_message"),
        ("/v1/chat/completions", b"[" * 100000, 400, "bad_message"),
        ("/v1/chat/completions", json.dumps({"model": "embedded"}).encode(), 400, "invalid_request"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400, "invalid_request"),
        ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "n": 2}).encode(), 400, "invalid_request"),
        ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "tools": [{"type": "function"}]}).encode(), 400, "invalid_request"),
        ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), 400, "invalid_request"),
        # Range checks are the daemon's own, returned as they come.
        ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "temperature": 500}).encode(), 400, "invalid_request"),
        ("/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 10**9}).encode(), 400, "limit_exceeded"),
        ("/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode(), 400, "invalid_request"),
        ("/v1/completions", json.dumps({"prompt": PROMPT, "suffix": "x"}).encode(), 400, "invalid_request"),
        ("/v1/completions", json.dumps({"prompt": "x" * (gateway.MAX_BODY_BYTES + 1)}).encode(), 413, "limit_exceeded"),
    ],
)
def test_bad_bodies_get_an_openai_error_and_the_gateway_goes_on(served, path, body, status, code):
    _, url = served
    got_status, got = raw(url, "POST", path, body)
    assert got_status == status, got
    assert got["error"]["code"] == code and got["error"]["message"]
    again = oai(url).completions.create(model="embedded", prompt=PROMPT, max_tokens=2, temperature=0)
    assert again.choices[0].finish_reason in ("length", "stop")


def test_openai_client_sees_bad_requests_as_bad_request_errors(served):
    _, url = served
    with pytest.raises(openai.BadRequestError) as e:
        oai(url).chat.completions.create(model="embedded", messages=[], max_tokens=2)
    assert "messages" in str(e.value)


def test_unknown_paths_and_methods(served):
    _, url = served
    assert raw(url, "GET", "/v1/nothing")[0] == 404
    assert raw(url, "GET", "/v1/chat/completions")[0] == 405


# --------------------------------------------------------------------------
# Security


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example"},  # DNS rebinding: a foreign name resolving to 127.0.0.1
        {"Host": "127.0.0.1:1"},
        {"Origin": "http://evil.example"},  # a web page posting to localhost
        {"Origin": "null"},
    ],
)
def test_foreign_host_or_origin_is_refused(served, headers):
    _, url = served
    status, body = raw(url, "POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 1}).encode(), headers)
    assert status == 403 and body["error"]["code"] in ("forbidden_host", "forbidden_origin")
    assert raw(url, "GET", "/health", headers=headers)[0] == 403


def test_own_origin_is_allowed(served):
    _, url = served
    port = urlparse(url).port
    for origin in (url, f"http://localhost:{port}"):
        status, _ = raw(url, "POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 1}).encode(), {"Origin": origin})
        assert status == 200


def test_bearer_token(daemon):
    d = daemon(None, "--http", "127.0.0.1:0", env={gateway.TOKEN_ENV: "s3cret"})
    url = d.wait_ready()["http"]
    with pytest.raises(openai.AuthenticationError):
        oai(url, key="wrong").models.list()
    status, body = raw(url, "GET", "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert [m.id for m in oai(url, key="s3cret").models.list().data]
    assert oai(url, key="s3cret").completions.create(model="embedded", prompt=PROMPT, max_tokens=2).choices[0].text is not None
    assert raw(url, "GET", "/health")[0] == 401  # every route needs it
    assert raw(url, "GET", "/health", headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_gateway_refuses_network_addresses_unless_told(daemon):
    with pytest.raises(gateway.GatewayError, match="not a loopback address"):
        import asyncio

        args = gateway_args("0.0.0.0:0")
        asyncio.run(gateway.open_gateway(args, "/nonexistent"))
    with pytest.raises(gateway.GatewayError, match="needs a token"):
        asyncio.run(gateway.open_gateway(gateway_args("0.0.0.0:0", allow_remote=True, no_auth=True), "/nonexistent"))
    with pytest.raises(gateway.GatewayError, match="HOST:PORT"):
        asyncio.run(gateway.open_gateway(gateway_args("localhost"), "/nonexistent"))
    d = daemon(None, "--http", "0.0.0.0:0", ready=False)
    assert d.proc.wait(timeout=30) == 1
    assert "not a loopback address" in d.output()


def gateway_args(listen: str, allow_remote: bool = False, token: str | None = None, no_auth: bool = False):
    from types import SimpleNamespace

    return SimpleNamespace(http=listen, http_token=token, http_allow_remote=allow_remote, http_no_auth=no_auth)


# --------------------------------------------------------------------------
# A client that goes away cancels its generation


@pytest.fixture(scope="module")
def long_generation(served):
    d, _ = served
    with d.client(timeout=120) as c:
        return find_long_generation(c, seconds=2.0)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(served, long_generation, stream):
    d, url = served
    prompt, max_tokens, natural_s = long_generation
    u = urlparse(url)
    body = json.dumps({"model": "embedded", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}).encode()
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {http_token.load()}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    if stream:
        seen = b""
        while b"data: " not in seen:  # a token has been streamed: the request is generating
            seen += s.recv(65536)
    deadline = time.monotonic() + 30
    while active_requests(d) == 0:
        assert time.monotonic() < deadline, "the request never became active"
        time.sleep(0.01)
    t0 = time.monotonic()
    s.close()
    while active_requests(d) != 0:
        time.sleep(0.02)
        assert time.monotonic() - t0 < natural_s, "the request ran on after its client went away"
    stopped_after = time.monotonic() - t0
    assert stopped_after < natural_s / 2, (stopped_after, natural_s)


def test_standalone_gateway_process(served):
    """``python -m moed.doors.http``: the same gateway as a process of its own, a plain client of the daemon."""
    import subprocess
    import sys

    d, _ = served
    with socket.socket() as s:  # a free port for it to listen on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moed.doors.http", "--listen", f"127.0.0.1:{port}", "--socket", str(d.socket)],
                            env=d.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not lines or "listening on" not in lines[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        assert lines[-1].strip() == f"moed-http listening on http://127.0.0.1:{port}"
        url = f"http://127.0.0.1:{port}"
        got = oai(url).completions.create(model="embedded", prompt=PROMPT, max_tokens=6, temperature=0)
        with d.client() as c:
            assert got.choices[0].text == c.complete(PROMPT, max_tokens=6).text
    finally:
        proc.kill()
        proc.wait(timeout=10)
