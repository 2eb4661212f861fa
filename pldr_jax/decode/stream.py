"""Streaming generation: a Python generator over jitted prefill / decode-step functions.

`stream_generate` takes the same arguments as `generate` and yields one `StreamStep` per decoding
step as soon as it is computed (one host round-trip per step, which is the price of streaming;
`generate` runs the whole loop on the device).  The tokens it yields equal `generate`'s for the same
arguments and seed.  It is a thin function over `Sampler.stream`.
"""

from __future__ import annotations

from typing import Iterator

from .output import StreamStep
from .sampler import Sampler

__all__ = ["stream_generate", "StreamStep"]


def stream_generate(cfg, params, prompts, *, max_new_tokens: int, kv_cache: bool = True,
                    g_cache: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    seed=0, eos_id: int | None = 3, g_lm=None, shared_g: bool = False,
                    stop_at_max_seq_len: bool = False, max_len: int | None = None,
                    bf16_min_batch: int | None = None, mesh=None) -> Iterator[StreamStep]:
    """Yield a `StreamStep` per new token position until every row stops or max_new_tokens.

    Arguments as `pldr_jax.generate`.  Validation happens on the first `next()`.
    """
    return Sampler(cfg, params, mesh=mesh, bf16_min_batch=bf16_min_batch).stream(
        prompts, max_new_tokens=max_new_tokens, kv_cache=kv_cache, g_cache=g_cache, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, g_lm=g_lm, shared_g=shared_g,
        stop_at_max_seq_len=stop_at_max_seq_len, max_len=max_len)
