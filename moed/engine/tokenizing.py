"""Prompts tokenized on a thread of their own, off the engine loop.

A long prompt takes the tokenizer seconds (3.6 s for 3 MiB measured); done in
the loop, that stalls every other stream and the cancel of the request
itself. Here a submitted request is tokenized by one worker thread, with a
copy of the tokenizer (a Hugging Face fast tokenizer must not be borrowed by
two threads at once, and the loop's detokenizers use the original); the loop
takes the finished ones on its next turn (``ready``) and submits them to the
engine with their tokens. A cancel that comes first ends the request there.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import Future, ThreadPoolExecutor

from moed.channel import Submit

log = logging.getLogger("moed.engine")


class Tokenizing:
    def __init__(self, engine):
        self.engine = engine
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:  # cannot be copied: tokenize in the loop, as before
            log.warning("the tokenizer cannot be copied; prompts are tokenized in the engine loop")
            self.tokenizer = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moed-tokenize") if self.tokenizer is not None else None
        self.jobs: dict[int, tuple[Submit, Future]] = {}

    def add(self, msg: Submit) -> None:
        if self.pool is None:
            fut = Future()
            try:
                fut.set_result(self.engine.tokenize(msg.request))
            except Exception as e:
                fut.set_exception(e)
        else:
            fut = self.pool.submit(self.engine.tokenize, msg.request, self.tokenizer)
        self.jobs[msg.seq] = (msg, fut)

    def cancel(self, seq: int):
        """The final event of a request cancelled while being tokenized, else None."""
        job = self.jobs.pop(seq, None)
        if job is None:
            return None
        job[1].cancel()
        return self.engine.cancelled_unstarted(seq)

    def ready(self) -> list[tuple[Submit, Future]]:
        """The requests whose tokenizing has finished, in the order they came."""
        done = [(seq, job) for seq, job in self.jobs.items() if job[1].done()]
        for seq, _ in done:
            del self.jobs[seq]
        return [job for _, job in done]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
