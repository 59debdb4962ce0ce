"""Vanished clients and fair ``busy`` (issue 18 item 4): a client that sends a generate and
disconnects has its request cancelled at once, and no client can hold every queue or batch slot."""

from __future__ import annotations

import argparse
import random
import threading
import time

import pytest
import zmq

from moed_client import Busy
from moed_client import protocol as P

from moed.front.sessions import Sessions

LONG = 30000  # more tokens than any test waits for


def churn(socket_path, stop: threading.Event, counts: dict, seed: int = 0) -> None:
    """50 clients coming and going; 30% of them send a long generate and disconnect without a cancel."""
    rng = random.Random(seed)
    ctx = zmq.Context.instance()
    while not stop.is_set():
        for i in range(50):
            if stop.is_set():
                return
            sock = ctx.socket(zmq.DEALER)
            sock.connect(f"ipc://{socket_path}")
            if rng.random() < 0.3:
                sock.send(P.pack({"type": P.GENERATE, "id": f"gone-{i}", "prompt": "hello world",
                                  "max_tokens": LONG, "ignore_eos": True}))
                counts["vanished"] += 1
            else:
                sock.send(P.pack({"type": P.PING}))
                sock.poll(1000)
            sock.close(linger=1000)  # the frame goes out, then the connection closes: no cancel, no reply read
            time.sleep(0.005)


def test_vanished_clients_do_not_keep_a_well_behaved_one_out(daemon):
    d = daemon(None, "--max-batch", "1", "--max-queue", "2")
    stop, counts = threading.Event(), {"vanished": 0}
    churner = threading.Thread(target=churn, args=(d.socket, stop, counts))
    served, busy = 0, 0
    with d.client(timeout=60) as good:
        churner.start()
        try:
            time.sleep(1.0)  # the churn is under way
            deadline = time.monotonic() + 20
            while served < 20 and time.monotonic() < deadline:
                try:
                    assert good.complete("the quick brown fox", max_tokens=4).token_ids
                    served += 1
                except Busy:
                    busy += 1
        finally:
            stop.set()
            churner.join(30)
        assert counts["vanished"] >= 15, counts
        assert served == 20 and busy <= 1, (served, busy, counts)  # before issue 18: 7 to 124 busy here
        # every vanished client's request was cancelled: nothing is left running
        deadline = time.monotonic() + 15
        while (status := good.status())["requests"] != {"active": 0, "queued": 0} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status["requests"] == {"active": 0, "queued": 0}, status
        assert status["engine_restarts"] == 0


# --------------------------------------------------------------------------
# Fairness, on Sessions alone


class Engine:
    ready = True
    model: dict = {}  # the supervisor's model info (no max_token_bytes: no byte bound)

    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


def sessions(max_batch=2, max_queue=4) -> tuple[Sessions, Engine, dict]:
    args = argparse.Namespace(max_batch=max_batch, max_queue=max_queue, max_clients=64, max_tokens=1 << 16, max_context=32768, debug=False)
    replies: dict = {}
    s = Sessions(args, lambda client, msg: replies.setdefault(client, []).append(msg) or True)
    s.engine = Engine()
    return s, s.engine, replies


def generate(rid: str) -> dict:
    return {"type": P.GENERATE, "id": rid, "prompt": "hi", "max_tokens": 4}


async def test_a_client_filling_the_queue_gives_way_to_another():
    s, engine, replies = sessions(max_batch=2, max_queue=4)
    for i in range(6):  # 2 in the engine, 4 queued: all the hog's
        s.admit(b"hog", generate(f"h{i}"))
    with pytest.raises(P.ProtocolError) as refused:
        s.admit(b"hog", generate("h6"))  # the hog itself gets busy
    assert refused.value.code == P.ErrorCode.BUSY
    s.admit(b"fair", generate("f0"))  # the hog's newest queued request gives way
    assert [m["id"] for m in replies[b"hog"]] == ["h5"] and replies[b"hog"][0]["code"] == P.ErrorCode.BUSY
    assert "fair" not in replies
    s.admit(b"fair", generate("f1"))  # hog 3 queued, fair 1: 2 < 3, room again
    with pytest.raises(P.ProtocolError):
        s.admit(b"fair", generate("f2"))  # fair 2 and hog 2: even, no more giving way
    assert s.queued_by() == {b"hog": 2, b"fair": 2}


async def test_batch_slots_go_to_the_client_with_fewest_in_the_engine():
    s, engine, _ = sessions(max_batch=2, max_queue=8)
    for i in range(4):
        s.admit(b"hog", generate(f"h{i}"))
    s.admit(b"fair", generate("f0"))
    assert [m.request.id for m in engine.sent] == ["h0", "h1"]
    done = s.requests[engine.sent[0].seq]
    s.finish(done, None)  # a slot frees: the fair client's request goes before the hog's third
    assert [m.request.id for m in engine.sent] == ["h0", "h1", "f0"]
    s.finish(s.requests[engine.sent[1].seq], None)
    assert engine.sent[-1].request.id == "h2"  # FIFO among equals
