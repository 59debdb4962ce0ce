"""Tool calls in the model's output, found by the markers of mlx-lm's tool parser for its template.

mlx-lm's ``TokenizerWrapper`` picks the tool parser from the chat template
(``has_tool_calling``, ``tool_call_start``, ``tool_call_end``, ``tool_parser``:
mlx_lm/tool_parsers/). The text between the markers is handed to that parser;
the rest streams on as text. Parsing lives in the engine because the parsers
are mlx-lm's, which the front never imports, and so every protocol client (not
only the HTTP gateway) gets calls rather than markup.
"""

from __future__ import annotations

import json
import logging
import uuid

from moed_client import protocol as P

log = logging.getLogger("moed.engine")


def check_tools(request: P.GenerateRequest, tokenizer) -> list[dict] | None:
    """The tools to give the chat template (None for tool_choice "none"), or invalid_request
    when the model's template has no tool calling."""
    if not request.tools or request.tool_choice == "none":
        return None
    if not getattr(tokenizer, "has_tool_calling", False):
        raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST,
                              "this model's chat template has no tool calling support; send the request without 'tools'")
    return request.tools


def _held(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could begin ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCalls:
    """Splits streamed text into plain text and parsed calls ({id, name, arguments: JSON text})."""

    def __init__(self, start: str, end: str, parser, tools: list[dict]):
        self.start, self.end, self.parser, self.tools = start, end, parser, tools
        self.buffer = ""
        self.inside = False
        self.count = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        out, calls = [], []
        while True:
            if not self.inside:
                i = self.buffer.find(self.start)
                if i < 0:
                    keep = len(self.buffer) - _held(self.buffer, self.start)
                    out.append(self.buffer[:keep])
                    self.buffer = self.buffer[keep:]
                    break
                out.append(self.buffer[:i])
                self.buffer, self.inside = self.buffer[i + len(self.start):], True
            else:
                j = self.buffer.find(self.end)
                if j < 0:
                    break
                body, self.buffer, self.inside = self.buffer[:j], self.buffer[j + len(self.end):], False
                parsed = self._parse(body)
                if parsed is None:
                    out.append(self.start + body + self.end)
                else:
                    calls += parsed
        return "".join(out), calls

    def flush(self) -> tuple[str, list[dict]]:
        """At the end: a call left open is parsed as mlx_lm.server does; text if it does not parse."""
        rest, self.buffer = self.buffer, ""
        if not self.inside:
            return rest, []
        self.inside = False
        parsed = self._parse(rest)
        return ("", parsed) if parsed else (self.start + rest, [])

    def _parse(self, body: str) -> list[dict] | None:
        try:
            parsed = self.parser(body, self.tools)
        except Exception as e:  # the parsers raise ValueError, JSONDecodeError, KeyError... on text that is no call
            log.info("tool call text did not parse (%s: %s); sent as text", type(e).__name__, str(e)[:200])
            return None
        calls = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
                return None
            args = call.get("arguments", {})
            self.count += 1
            calls.append({"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "name": call["name"],
                          "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)})
        return calls


def make_tool_calls(request: P.GenerateRequest, tokenizer) -> ToolCalls | None:
    tools = check_tools(request, tokenizer)
    if tools is None:
        return None
    return ToolCalls(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser, tools)
