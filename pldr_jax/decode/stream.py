"""Streaming generation: a Python generator over jitted prefill / decode-step functions.

`stream_generate` takes the same arguments as `generate` and yields one `StreamStep` per decoding
step as soon as it is computed (one host round-trip per step, which is the price of streaming;
`generate` runs the whole loop on the device).  The tokens it yields equal `generate`'s for the same
arguments and seed.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np

from .loop import advance_loop, prefill_cache, start_loop
from .request import make_request

__all__ = ["stream_generate", "StreamStep"]


@dataclasses.dataclass(frozen=True)
class StreamStep:
    """One decoding step.

    step: index of the new token (0 = sampled from the prompt's logits).
    tokens: [B] int the new token of each row (0 where a row had already stopped).
    active: [B] bool, True where tokens[b] is a real new token of row b.
    done: [B] bool, True where row b has stopped after this step (EOS or its length limit).
    """
    step: int
    tokens: np.ndarray
    active: np.ndarray
    done: np.ndarray

    def __iter__(self):  # allows `for step, tokens, active, done in ...`
        return iter((self.step, self.tokens, self.active, self.done))


def stream_generate(cfg, params, prompts, *, max_new_tokens: int, kv_cache: bool = True,
                    g_cache: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    seed=0, eos_id: int | None = 3, g_lm=None, shared_g: bool = False,
                    stop_at_max_seq_len: bool = False, max_len: int | None = None,
                    bf16_min_batch: int | None = None) -> Iterator[StreamStep]:
    """Yield a `StreamStep` per new token position until every row stops or max_new_tokens.

    Arguments as `pldr_jax.generate`.  Validation happens on the first `next()`.
    """
    req = make_request(cfg, params, prompts, max_new_tokens=max_new_tokens, kv_cache=kv_cache, g_cache=g_cache,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, g_lm=g_lm,
                       shared_g=shared_g, stop_at_max_seq_len=stop_at_max_seq_len, max_len=max_len,
                       return_logits=False, return_deductive=False, bf16_min_batch=bf16_min_batch)
    cache, logits0, _ = prefill_cache(req.spec, req.params, req.tokens, req.lengths, req.g_all, req.max_len)
    st = start_loop(req.spec, cache, logits0, None, req.key, req.inputs, n_out=req.n_out)
    prev_done = np.asarray(req.inputs.limit) <= 0
    t = 0
    while True:
        tokens, done = jax.device_get((st.token, st.done))
        yield StreamStep(step=t, tokens=np.asarray(tokens), active=~prev_done, done=np.asarray(done))
        prev_done = np.asarray(done)
        t += 1
        if t >= req.max_new_tokens or prev_done.all():
            return
        st = advance_loop(req.spec, req.params, st, req.inputs)
