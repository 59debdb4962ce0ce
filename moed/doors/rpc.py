"""msgpack-rpc framing as Neovim speaks it: a decoder within protocol v1's limits, and ``pack``.

Requests are ``[0, msgid, method, params]``, responses ``[1, msgid, error,
result]``, notifications ``[2, method, params]``.
"""

from __future__ import annotations

import msgpack

from moed_client import protocol as P

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_MSGID = 2**32 - 1
READ_SIZE = 64 * 1024


def error_text(code: str, message: str) -> str:
    """An rpc error as ``"<code>: <message>"``, the form Neovim shows as is."""
    return f"{code}: {message}"


class RpcDecoder:
    """Splits a byte stream into msgpack objects, within the protocol's limits.

    ``feed`` returns the objects completed so far and, once the stream cannot
    be decoded any further (bad bytes, an object over MAX_MESSAGE_BYTES or
    over the container limits), a ProtocolError(BAD_MESSAGE): the connection
    must then be closed, as there is no way to find the next message's start.
    """

    def __init__(self, max_bytes: int = P.MAX_MESSAGE_BYTES):
        self._budget = P.ContainerBudget()
        self._unpacker = msgpack.Unpacker(
            raw=False,
            # Neovim sends buffer text as msgpack str even when it is not UTF-8.
            unicode_errors="replace",
            strict_map_key=False,
            max_buffer_size=max_bytes,
            # msgpack would allocate min(max_buffer_size, 1 MiB) per connection up front; the
            # buffer grows when a message needs it (up to max_bytes) and one read fits this.
            read_size=READ_SIZE,
            list_hook=self._budget,
            object_hook=self._budget,
            **P.UNPACK_LIMITS,
        )

    def feed(self, data: bytes) -> tuple[list, P.ProtocolError | None]:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            return [], P.ProtocolError(P.ErrorCode.BAD_MESSAGE, f"message exceeds {P.MAX_MESSAGE_BYTES} bytes")
        out = []
        while True:
            try:
                obj = next(self._unpacker)
                P.check_depth(obj)
            except StopIteration:
                return out, None
            except P.ProtocolError as e:
                return out, e
            except Exception as e:  # ValueError, FormatError, StackError... on hostile bytes
                return out, P.ProtocolError(P.ErrorCode.BAD_MESSAGE, f"not valid msgpack: {type(e).__name__}: {str(e)[:200]}")
            self._budget.count = 0  # the budget is per message; the decoder resumes partial ones
            out.append(obj)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)
