"""Which ROUTER peers have vanished, so their requests can be cancelled at once.

A client that sends a ``generate`` and disconnects would otherwise hold its queue or
batch slot until its first chunk fails to send, after a whole prefill. libzmq tells
the ROUTER nothing about a peer leaving (ROUTER_NOTIFY is draft API, not in the
release builds), but its socket monitor reports each closed connection by file
descriptor, and each received message carries the descriptor it came on (SRCFD). So:
remember the descriptor of each peer's messages, and map monitor events back.

Ordering: libzmq queues a connection's DISCONNECTED event before it closes the
descriptor, so before any new connection could reuse the number and send on it.
``check(peer, fd)`` drains the monitor before judging a message, so a message of a
new connection is never taken for the old one's. A message read after its
connection's end (sent, then the client quit at once) comes on a descriptor already
reported closed: ``check`` says it is gone, and the caller drops what it admitted.
"""

from __future__ import annotations

import logging

import zmq

log = logging.getLogger("moed.daemon")

DRAIN_S = 0.25  # how often a quiet front looks at the monitor (a busy one looks before every message)


class PeerWatch:
    """One ROUTER's peers by descriptor; ``gone(peer)`` is called for each vanished one."""

    def __init__(self, router: zmq.Socket, name: str, gone):
        self.gone = gone
        endpoint = f"inproc://moed-peers-{name}-{id(self)}"
        router.monitor(endpoint, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        # A plain socket on the same libzmq context, read only with NOBLOCK: it never waits in the event loop.
        self.monitor = zmq.Context.shadow(router.context.underlying).socket(zmq.PAIR)
        self.monitor.linger = 0
        self.monitor.connect(endpoint)
        self.router = router
        self.peer_at: dict[int, object] = {}  # descriptor -> the peer whose messages came on it
        self.closed_fds: set[int] = set()  # reported closed, and no new connection on them since

    def check(self, peer, frame: zmq.Frame) -> bool:
        """Note where ``frame`` came from; False when its connection has already closed."""
        self.drain()
        try:
            fd = int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            return True  # no descriptor to judge by (inproc): assume alive
        if fd in self.closed_fds:
            return False
        self.peer_at[fd] = peer
        return True

    def drain(self) -> None:
        while True:
            try:
                event, endpoint = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed under us at shutdown
                return
            kind, fd = int.from_bytes(event[:2], "little"), int.from_bytes(event[2:6], "little")
            if kind == zmq.EVENT_ACCEPTED:
                self.closed_fds.discard(fd)
            elif kind == zmq.EVENT_DISCONNECTED:
                self.closed_fds.add(fd)
                peer = self.peer_at.pop(fd, None)
                if peer is not None:
                    self.gone(peer)

    def close(self) -> None:
        if self.monitor.closed:
            return
        try:
            self.router.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
