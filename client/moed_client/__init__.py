"""moed_client: talk to the moed daemon (protocol v1 over ZeroMQ + msgpack). Never imports MLX."""

from .client import AsyncClient, AsyncStream, Chunk, Client, Completion, Stream
from .errors import Busy, DaemonNotRunning, EngineError, EngineRestarted, MoedError, ProtocolMismatch, RequestError, ShuttingDown, Timeout
from .protocol import PROTOCOL_VERSION

__all__ = [
    "AsyncClient", "AsyncStream", "Busy", "Chunk", "Client", "Completion", "DaemonNotRunning", "EngineError",
    "EngineRestarted", "MoedError", "PROTOCOL_VERSION", "ProtocolMismatch", "RequestError", "ShuttingDown", "Stream", "Timeout",
]
