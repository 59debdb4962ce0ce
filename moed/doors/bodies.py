"""What every HTTP API's body checks share: the 400 they raise and a typed field."""

from __future__ import annotations

from moed_client import protocol as P


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = P.ErrorCode.INVALID_REQUEST):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def field(body: dict, name: str, kinds, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"'{name}' has the wrong type", name)
    if not isinstance(value, kinds):
        raise BadRequest(f"'{name}' has the wrong type", name)
    return value


def model_arg(body: dict) -> dict:
    """The body's ``model`` as the protocol's (the daemon answers model_not_found for another one)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    return {"model": model} if model else {}
