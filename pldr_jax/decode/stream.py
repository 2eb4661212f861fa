"""Streaming generation: a Python generator over jitted prefill / decode-step functions.

`stream_generate` takes the same arguments as `generate` and yields one `StreamStep` per decoding
step as soon as it is computed (one host round-trip per step, which is the price of streaming;
`generate` runs the whole loop on the device).  The tokens it yields equal `generate`'s for the same
arguments and seed.  It is a thin function over `Sampler.stream`.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from ..backend import BackendChoices
from .options import DecodeOptions
from .output import StreamStep
from .sampler import Sampler

__all__ = ["stream_generate", "StreamStep"]


def stream_generate(cfg, params, prompts, *, max_new_tokens: int, options: DecodeOptions | None = None,
                    bf16_min_batch: int | None = None, mesh=None, backend: BackendChoices | None = None,
                    backend_options: Mapping[str, Any] | None = None, **overrides) -> Iterator[StreamStep]:
    """Yield a `StreamStep` per new token position until every row stops or max_new_tokens.

    Arguments as `pldr_jax.generate` (`DecodeOptions` fields as keywords).  Validation happens on the
    first `next()`.
    """
    return Sampler(cfg, params, mesh=mesh, bf16_min_batch=bf16_min_batch, backend=backend,
                   backend_options=backend_options).stream(prompts, max_new_tokens=max_new_tokens, options=options,
                                                           **overrides)
