"""The solo path: one request decoded by mlx-lm's ``generate_step`` outside ``BatchGenerator``
(moed/engine/batch.py says when), which pipelines token n+1's graph with token n."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Solo:
    """The one request decoded outside ``BatchGenerator``, by ``generate_step``.

    ``generate_step`` feeds each token to the model before yielding it, so the
    KV cache always holds ``tokens`` (the prompt and every token yielded).
    """

    active: object  # batch.Active
    insert: dict  # BatchGenerator.insert arguments for this request, as submitted
    cache: list
    tokens: list
    steps: object = None  # the generate_step generator

    def start(self, model, manager, prefill_step: int, kv: dict | None = None) -> None:
        """``kv``: generate_step's kv_bits, kv_group_size and quantized_kv_start (--kv-bits), or none."""
        import mlx.core as mx

        from moed.experts.decode import generate, with_history

        (rest,) = self.insert["prompts"]
        processors = (self.insert.get("logits_processors") or [None])[0]
        if processors:  # generate_step sees only `rest`; the penalties also look at the cached prefix, as stock's see the whole prompt
            processors = with_history(processors, self.tokens[:len(self.tokens) - len(rest)])
        self.steps = generate(mx.array(rest), model, manager, max_tokens=self.insert["max_tokens"][0],
                              sampler=self.insert["samplers"][0], prompt_cache=self.cache,
                              prefill_step_size=prefill_step, logits_processors=processors, **(kv or {}))

    def next_token(self) -> int:
        token, _ = next(self.steps)
        self.tokens.append(token)
        return token

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()

    def join(self) -> dict:
        """BatchGenerator.insert arguments that continue this request in a batch.

        The last token yielded is in the cache already; trim it and feed it
        again, so the batch's first response is the token after it.
        """
        from mlx_lm.models.cache import trim_prompt_cache

        self.close()
        generated = self.active.completion_tokens
        if not generated:  # nothing computed yet: submit as it came
            return self.insert
        trim_prompt_cache(self.cache, 1)
        return dict(self.insert, prompts=[self.tokens[-1:]], caches=[self.cache], all_tokens=[self.tokens[:-1]],
                    max_tokens=[self.insert["max_tokens"][0] - generated])
