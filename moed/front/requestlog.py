"""One log line per finished request: who asked, how much, how fast, how it ended. Never the prompt
(`moed serve --debug` logs that, at admission, in moed.front.sessions)."""

from __future__ import annotations

import logging

log = logging.getLogger("moed.requests")


def log_request(request, final: dict | None, client: str) -> None:
    """``request``: a moed.front.sessions.Request; ``final``: its last protocol message (done or error), if any."""
    final = final or {}
    usage = final.get("usage") or {}
    timings = final.get("timings") or request.timings()
    finish = final.get("finish_reason") or (f"error:{final.get('code')}" if final.get("type") == "error" else "dropped")
    ttft, rate = timings.get("ttft_s"), timings.get("decode_tok_s")
    log.info(
        "request %s client=%s in=%s out=%s cached=%s ttft=%s tok/s=%s total=%.3fs finish=%s",
        request.id, client, usage.get("prompt_tokens", "-"), usage.get("completion_tokens", request.completion_tokens),
        usage.get("cached_tokens", "-"), f"{ttft:.3f}s" if ttft is not None else "-",
        f"{rate:.1f}" if rate is not None else "-", timings.get("total_s") or 0.0, finish,
    )
