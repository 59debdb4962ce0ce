"""Per-request sampling and stop strings."""

from __future__ import annotations

from moed_client import protocol as P
from moed_client.protocol import SamplingParams

PENALTY_CONTEXT = 20  # tokens each penalty looks back over (mlx-lm's default, so output equals stock's)


class SeededSampler:
    """mlx-lm's ``make_sampler`` filter chain drawing from this request's own PRNG key.

    ``key`` is the current key, split once per sampled token. It is public because a
    rollback (moed.experts.decode.generate) puts back the key a rolled-back token
    was drawn with, so the redone token draws the same number.
    """

    def __init__(self, sampling: SamplingParams):
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        top_p, min_p, top_k = sampling.top_p, sampling.min_p, sampling.top_k
        self.filters = []
        if 0 < top_p < 1.0:
            self.filters.append(lambda x: apply_top_p(x, top_p))
        if min_p != 0.0:
            self.filters.append(lambda x: apply_min_p(x, min_p, 1))
        if top_k > 0:
            self.filters.append(lambda x: apply_top_k(x, top_k))
        self.inverse_temp = 1.0 / sampling.temperature
        self.key = mx.random.key(sampling.seed)

    def __call__(self, logprobs):
        import mlx.core as mx

        for f in self.filters:
            logprobs = f(logprobs)
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(logprobs * self.inverse_temp, key=draw)


def make_request_sampler(sampling: SamplingParams):
    """A sampler for one request, or None for greedy.

    Greedy requests return None so BatchGenerator uses its one shared greedy
    sampler and samples the whole batch in one call. A request with a seed
    gets its own PRNG key (``SeededSampler``), so its random draws do not
    depend on other requests in the batch (the logits themselves can still
    differ in the last bits between batch shapes; see docs/protocol.md).
    """
    from mlx_lm.sample_utils import make_sampler

    if sampling.temperature == 0:
        return None
    if sampling.seed is None:
        return make_sampler(sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p, top_k=sampling.top_k)
    return SeededSampler(sampling)


def make_request_processors(sampling: SamplingParams, vocab_size: int) -> list | None:
    """mlx-lm's logits processors for the request's penalties and logit bias, or None when it has none."""
    from mlx_lm.sample_utils import make_logits_processors

    bias = {int(t): float(b) for t, b in sampling.logit_bias}
    if bias and max(bias) >= vocab_size:
        raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, f"logit_bias token id {max(bias)} is outside the vocabulary")
    processors = make_logits_processors(
        logit_bias=bias or None,
        repetition_penalty=None if sampling.repetition_penalty == 1.0 else sampling.repetition_penalty,
        repetition_context_size=PENALTY_CONTEXT,
        presence_penalty=sampling.presence_penalty or None, presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=sampling.frequency_penalty or None, frequency_context_size=PENALTY_CONTEXT,
    )
    return processors or None


class StopText:

    """Streams text, holding back any tail that could start a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.hit: str | None = None  # the stop string that ended the text

    def feed(self, segment: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was hit)."""
        self.text += segment
        if not self.stops:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, False
        longest = max(len(s) for s in self.stops)
        window_start = max(0, self.sent - longest + 1)
        hits = [(i, s) for i, s in ((self.text.find(s, window_start), s) for s in self.stops) if i >= 0]
        if hits:
            end, self.hit = min(hits)
            out = self.text[self.sent : end] if end > self.sent else ""
            self.sent = len(self.text)
            return out, True
        safe = len(self.text) - self._held_tail()
        out = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def _held_tail(self) -> int:
        for n in range(min(len(self.text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
