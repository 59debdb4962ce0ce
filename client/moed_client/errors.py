"""Exceptions a moed client raises; each maps to protocol error codes."""

from __future__ import annotations

from .protocol import ErrorCode


class MoedError(Exception):
    """Base class. ``code`` is the protocol's error code (or a client-side one)."""

    code = "client"

    def __init__(self, message: str, code: str | None = None, request_id: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id


class DaemonNotRunning(MoedError):
    """No daemon answers on the socket."""

    code = "not_running"


class ProtocolMismatch(MoedError):
    """The daemon speaks another major protocol version."""

    code = ErrorCode.VERSION_MISMATCH


class Busy(MoedError):
    """The daemon's queue is full; retry later."""

    code = ErrorCode.BUSY


class EngineError(MoedError):
    """The engine failed while serving the request."""

    code = ErrorCode.ENGINE_ERROR


class EngineRestarted(EngineError):
    """The engine died and was restarted; the request is gone, the connection is fine."""

    code = ErrorCode.ENGINE_RESTARTED


class ShuttingDown(MoedError):
    code = ErrorCode.SHUTTING_DOWN


class RequestError(MoedError):
    """The daemon rejected the request (bad field, limit, unknown type...)."""


class Timeout(MoedError, TimeoutError):
    """No reply within the client's timeout."""

    code = "timeout"


_BY_CODE = {
    ErrorCode.VERSION_MISMATCH: ProtocolMismatch,
    ErrorCode.BUSY: Busy,
    ErrorCode.ENGINE_ERROR: EngineError,
    ErrorCode.ENGINE_RESTARTED: EngineRestarted,
    ErrorCode.SHUTTING_DOWN: ShuttingDown,
}


def from_message(msg: dict) -> MoedError:
    """The exception for a daemon ``error`` message."""
    code = msg.get("code") if isinstance(msg.get("code"), str) else ErrorCode.INTERNAL
    cls = _BY_CODE.get(code, RequestError)
    return cls(str(msg.get("message", "")), code=code, request_id=msg.get("id"))
