"""Headless Neovim against a real daemon: stock rpc calls (no plugin) and the plugin in client/nvim.

Skipped when ``nvim`` is not installed (CI installs Debian's neovim, 0.7).
Each test runs one ``nvim --headless`` that writes what it saw to a JSON file;
the answers are checked against the same request made with the Python client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from moed_client import RequestError

NVIM = shutil.which("nvim")
pytestmark = pytest.mark.skipif(NVIM is None, reason="nvim is not installed")
PLUGIN = Path(__file__).resolve().parent.parent / "client" / "nvim"


def run_nvim(daemon, script: str, tmp_path: Path, lua: bool = True, timeout: float = 60.0) -> dict:
    """Run ``script`` in a headless Neovim with the plugin on its runtimepath; the JSON it wrote to $OUT."""
    src = tmp_path / ("script.lua" if lua else "script.vim")
    out = tmp_path / "out.json"
    src.write_text(script)
    env = {**os.environ, "MOED_RUNTIME_DIR": str(daemon.runtime_dir), "OUT": str(out), "HOME": str(tmp_path)}
    cmd = [NVIM, "--headless", "-u", "NONE", "-i", "NONE", "--cmd", f"set rtp+={PLUGIN}", "-c", "runtime! plugin/moed.vim",
           "-c", f"{'luafile' if lua else 'source'} {src}", "-c", "qa!"]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout, text=True)
    assert out.exists(), f"nvim wrote nothing (rc {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return json.loads(out.read_text())


LUA_WRITE = """
local function write(obj)
  local f = assert(io.open(os.getenv('OUT'), 'w'))
  f:write(vim.fn.json_encode(obj))
  f:close()
end
"""


def test_stock_neovim_rpcrequest_generate_and_stream(shared_daemon, tmp_path):
    """No plugin: sockconnect + rpcrequest, as the README shows."""
    status = shared_daemon.wait_ready()
    path = status["editor_socket"]
    assert path and Path(path).parent == shared_daemon.runtime_dir
    script = f"""
let ch = sockconnect('pipe', '{path}', {{'rpc': v:true}})
let r = rpcrequest(ch, 'generate', {{'prompt': 'hello world', 'max_tokens': 12}})
let g:events = []
function! Collect(event, id, data) abort
  call add(g:events, [a:event, a:id, a:data])
endfunction
let s = rpcrequest(ch, 'generate', {{'prompt': 'hello world', 'max_tokens': 12, 'stream': v:true, 'callback': 'Collect'}})
let waited = 0
while (empty(g:events) || g:events[-1][0] !=# 'moed_done') && waited < 30000
  sleep 20m
  let waited += 20
endwhile
try
  call rpcrequest(ch, 'generate', {{'prompt': 5}})
  let err = ''
catch
  let err = v:exception
endtry
try
  call rpcrequest(ch, 'nosuch', {{}})
  let err2 = ''
catch
  let err2 = v:exception
endtry
let after = rpcrequest(ch, 'generate', {{'prompt': 'hello world', 'max_tokens': 12}})
call writefile([json_encode({{'result': r, 'stream_id': s, 'events': g:events, 'err': err, 'err2': err2, 'after': after}})], $OUT)
"""
    got = run_nvim(shared_daemon, script, tmp_path, lua=False)
    with shared_daemon.client() as c:
        want = c.complete("hello world", max_tokens=12)
    assert got["result"]["text"] == want.text and got["result"]["finish_reason"] == want.finish_reason
    assert got["result"]["usage"]["completion_tokens"] == want.usage["completion_tokens"]
    events = got["events"]
    assert events[-1][0] == "moed_done" and events[-1][2]["finish_reason"] == want.finish_reason
    assert all(e[1] == got["stream_id"]["id"] for e in events)
    assert "".join(e[2] for e in events if e[0] == "moed_chunk") == want.text
    assert "invalid_request: 'prompt' must be a string" in got["err"]
    assert "unknown_type: no method 'nosuch'" in got["err2"]
    assert got["after"]["text"] == want.text  # the channel still works after errors


def test_plugin_moe_command_streams_the_answer_into_a_buffer(shared_daemon, tmp_path):
    shared_daemon.wait_ready()
    script = LUA_WRITE + """
local moed = require('moed').setup({ auto = false, answer_max_tokens = 16 })
vim.api.nvim_buf_set_lines(0, 0, -1, false, { 'local x = 1', 'print(x)' })
vim.cmd('1,2Moe explain this')
local buf = vim.api.nvim_get_current_buf()
local ok = vim.wait(30000, function() return pcall(vim.api.nvim_buf_get_var, buf, 'moed_done') end, 20)
local done = ok and vim.api.nvim_buf_get_var(buf, 'moed_done') or vim.NIL
write({ lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false), done = done, buftype = vim.bo[buf].buftype,
        name = vim.api.nvim_buf_get_name(buf) })
"""
    got = run_nvim(shared_daemon, script, tmp_path)
    content = "explain this\n\nlocal x = 1\nprint(x)"
    with shared_daemon.client() as c:
        try:
            want = c.complete(messages=[{"role": "user", "content": content}], max_tokens=16)
        except RequestError as e:  # a model without a chat template: the plugin continues the text instead
            assert "no chat template" in e.message
            want = c.complete(content, max_tokens=16)
    assert got["done"]["finish_reason"] == want.finish_reason
    assert "\n".join(got["lines"]) == want.text
    assert got["buftype"] == "nofile" and got["name"].startswith("moe://answer/")


def test_moe_falls_back_to_a_plain_prompt_without_a_chat_template(daemon, tiny_model, tmp_path):
    model = tmp_path / "plain"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    d = daemon(model)
    script = LUA_WRITE + """
require('moed').setup({ auto = false, answer_max_tokens = 8 })
vim.cmd('Moe def main():')
local buf = vim.api.nvim_get_current_buf()
vim.wait(30000, function() return pcall(vim.api.nvim_buf_get_var, buf, 'moed_done') end, 20)
write({ lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false), done = vim.api.nvim_buf_get_var(buf, 'moed_done') })
"""
    got = run_nvim(d, script, tmp_path)
    with d.client() as c:
        want = c.complete("def main():", max_tokens=8)
    assert got["done"]["finish_reason"] == want.finish_reason and "error" not in got["done"]
    assert "\n".join(got["lines"]) == want.text


def test_plugin_ghost_text_shows_the_infill_and_accept_inserts_it(shared_daemon, tmp_path):
    status = shared_daemon.wait_ready()
    script = LUA_WRITE + """
local moed = require('moed').setup({ auto = false, max_tokens = 8, context_lines = 50 })
vim.api.nvim_buf_set_lines(0, 0, -1, false, { 'def add(a, b):', '    return ', '', 'print(add(1, 2))' })
vim.o.virtualedit = 'onemore' -- headless Neovim stays in normal mode; let the cursor sit after the line's end as in insert mode
vim.api.nvim_win_set_cursor(0, { 2, 11 })
local id, err = moed.complete()
vim.wait(30000, function() local g = moed.ghost(); return g == nil or g.done end, 20)
local g = moed.ghost() or {}
local marks = vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_create_namespace('moed'), 0, -1, { details = true })
local accepted = moed.accept()
write({ id = id or vim.NIL, err = err or vim.NIL, text = g.text or vim.NIL, info = g.info or vim.NIL, marks = marks,
        accepted = accepted, lines = vim.api.nvim_buf_get_lines(0, 0, -1, false), cursor = vim.api.nvim_win_get_cursor(0),
        marks_after = #vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_create_namespace('moed'), 0, -1, {}) })
"""
    got = run_nvim(shared_daemon, script, tmp_path)
    assert got["err"] is None, got
    # The same infill, sent by hand: the plugin's prefix/suffix must be exactly these.
    want = editor_call(status["editor_socket"], "infill", {"prefix": "def add(a, b):\n    return ", "suffix": "\n\nprint(add(1, 2))", "max_tokens": 8})
    assert got["text"] == want["text"] and got["info"]["fim"] == want["fim"]
    assert want["text"], "the model gave an empty middle; the rendering below would go unchecked"
    first_line, *rest = want["text"].split("\n")
    (mark,) = got["marks"]
    assert mark[1:3] == [1, 11] and mark[3]["virt_text"][0][0] == shown(first_line)
    assert [l[0][0] for l in mark[3].get("virt_lines", [])] == [shown(r) for r in rest]
    assert got["accepted"] is True and got["marks_after"] == 0
    assert "\n".join(got["lines"]) == "def add(a, b):\n    return " + want["text"] + "\n\nprint(add(1, 2))"


def test_plugin_reports_a_missing_daemon(tmp_path):
    from types import SimpleNamespace

    empty = tmp_path / "runtime"
    empty.mkdir()
    script = LUA_WRITE + """
local moed = require('moed').setup({ auto = false })
local id, err = moed.complete()
write({ id = id or vim.NIL, err = err or vim.NIL, ghost = moed.ghost() or vim.NIL })
"""
    got = run_nvim(SimpleNamespace(runtime_dir=empty), script, tmp_path)
    assert got["id"] is None and got["ghost"] is None
    assert "cannot connect to moed at " + str(empty / "editor.sock") in got["err"]


def shown(text: str) -> str:
    """Text as Neovim keeps it in virtual text: control characters become ^X."""
    return "".join("^" + chr(ord(ch) + 64) if ord(ch) < 32 and ch != "\t" else ch for ch in text)


def editor_call(path: str, method: str, params: dict) -> dict:
    import socket

    import msgpack

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(path)
        s.sendall(msgpack.packb([0, 1, method, [params]]))
        up = msgpack.Unpacker(raw=False)
        while True:
            data = s.recv(65536)
            assert data, "editor socket closed"
            up.feed(data)
            for msg in up:
                if msg[0] == 1:
                    assert msg[2] is None, msg[2]
                    return msg[3]


class NvimUI:
    """Drives a headless Neovim over its own rpc socket, as a UI would: keys go through the main loop."""

    def __init__(self, path: Path, timeout: float = 30.0):
        import socket

        import msgpack

        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.unpacker = msgpack.Unpacker(raw=False)
        self.msgid = 0

    def call(self, method: str, *args):
        import msgpack

        self.msgid += 1
        self.sock.sendall(msgpack.packb([0, self.msgid, method, list(args)]))
        while True:
            for msg in self.unpacker:
                if msg[0] == 1 and msg[1] == self.msgid:
                    assert msg[2] is None, msg[2]
                    return msg[3]
            data = self.sock.recv(65536)
            assert data, "nvim closed its socket"
            self.unpacker.feed(data)

    def lua(self, code: str, *args):
        return self.call("nvim_exec_lua", code, list(args))

    def wait(self, code: str, timeout: float = 30.0):
        import time

        deadline = time.monotonic() + timeout
        while not (value := self.lua(code)):
            assert time.monotonic() < deadline, f"timed out waiting for: {code}"
            time.sleep(0.02)
        return value


def test_plugin_auto_ghost_text_while_typing(shared_daemon, tmp_path):
    import time

    status = shared_daemon.wait_ready()
    listen = tmp_path / "nvim.sock"
    env = {**os.environ, "MOED_RUNTIME_DIR": str(shared_daemon.runtime_dir), "HOME": str(tmp_path)}
    setup = "lua require('moed').setup({ debounce_ms = 50, max_tokens = 6, temperature = 0 })"
    proc = subprocess.Popen([NVIM, "--headless", "--listen", str(listen), "-u", "NONE", "-i", "NONE", "--cmd", f"set rtp+={PLUGIN}",
                             "-c", "runtime! plugin/moed.vim", "-c", setup], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not listen.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "nvim did not start"
            time.sleep(0.02)
        ui = NvimUI(listen)
        ui.call("nvim_buf_set_lines", 0, 0, -1, False, ["", "print(add(1, 2))"])
        ui.call("nvim_input", "ggidef add(a, b):")
        # Keys may reach Neovim slower than the debounce on a busy machine: wait for the suggestion at the end.
        ghost = ui.wait("local g = require('moed').ghost(); return g and g.done and g.col == 14 and g or nil")
        assert ui.call("nvim_get_mode")["mode"] == "i"
        want = editor_call(status["editor_socket"], "infill", {"prefix": "def add(a, b):", "suffix": "\nprint(add(1, 2))", "max_tokens": 6, "temperature": 0})
        assert want["text"], "the model gave an empty middle; accepting it would check nothing"
        assert ghost["text"] == want["text"] and ghost["row"] == 0 and ghost["col"] == len("def add(a, b):")
        # Typing on makes that suggestion stale: it goes, and a new one is asked for the new text.
        first_id = ghost["id"]
        ui.call("nvim_input", " ")
        ghost = ui.wait(f"local g = require('moed').ghost(); return g and g.id ~= '{first_id}' and g.done and g.col == 15 and g or nil")
        assert ghost["col"] == len("def add(a, b): ")
        # Back to the first text: the same (greedy) suggestion, which <C-l> accepts.
        second_id = ghost["id"]
        ui.call("nvim_input", "<BS>")
        ghost = ui.wait(f"local g = require('moed').ghost(); return g and g.id ~= '{second_id}' and g.done and g.col == 14 and g or nil")
        assert ghost["text"] == want["text"] and ghost["col"] == len("def add(a, b):")
        ui.call("nvim_input", "<C-l>")
        # The middle may start with a newline (then line 1 stays as typed): wait for the buffer to change at all.
        lines = ui.wait("local l = vim.api.nvim_buf_get_lines(0, 0, -1, false); "
                        "return (#l ~= 2 or l[1] ~= 'def add(a, b):' or l[2] ~= 'print(add(1, 2))') and l or nil")
        assert "\n".join(lines) == "def add(a, b):" + want["text"] + "\nprint(add(1, 2))"
        ui.call("nvim_input", "<Esc>")
        assert ui.wait("return require('moed').ghost() == nil and vim.api.nvim_get_mode().mode == 'n'")
    finally:
        proc.kill()
        proc.wait(timeout=10)
