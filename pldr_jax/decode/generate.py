"""`generate`: jitted batched generation with the KV-cache and the G-cache (the paper's inference path).

Flow (two compiled functions, each specialised only on static shapes and flags):

1. `loop.prefill_cache` runs the right-padded prompts ``[B, P]`` once (`step.prefill`).  Each row's
   metric tensor A sums over that row's own tokens only (padding masked out of A and out of the
   attention keys), so a row decoded in a batch gives the tokens it gives alone.  It fills the cache
   (`cache.Cache`): rotated k/v in a fixed buffer of S positions, the prompt-time A and the G-cache
   (A_LM, G_LM), and returns the logits of each row's last prompt token.
2. `loop.run_loop` samples the first new token from those logits, then runs one ``lax.while_loop``
   (early exit once every row is done) of model step + sampling step.  Row b's t-th new token sits
   at position ``lengths[b] + t`` (RoPE positions equal the prompt-alone case).

How to decode is one `options.DecodeOptions` value; `plan.plan` turns it, with the backend choices,
into the static specs.  `generate` is a thin function over `sampler.Sampler` (build a Sampler once to keep the weight
preparation out of every call).  The modules: `request` (argument validation), `buckets` (static
lengths), `weights` (dtype policy and decode weight layout), `step` (the model over the cache, the
four modes), `loop` (device loop), `sampler` (the object that ties them together), `sharding`
(decoding on a mesh).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..backend import BackendChoices
from ..config import PLDRConfig
from .options import DecodeOptions
from .output import GenerateOutput
from .sampler import Sampler

__all__ = ["generate", "GenerateOutput"]


def generate(cfg: PLDRConfig, params: dict, prompts, *, max_new_tokens: int, options: DecodeOptions | None = None,
             bf16_min_batch: int | None = None, mesh=None, backend: BackendChoices | None = None,
             backend_options: Mapping[str, Any] | None = None, **overrides) -> GenerateOutput:
    """Generate up to `max_new_tokens` new tokens for each prompt.

    prompts: list of token-id lists (ragged; right-padded internally to a length bucket).
    options: a `DecodeOptions` (cache modes, sampling, seed, EOS, G override, shared G, lengths,
    what to return); its fields may also be given as keywords (``top_k=1``, ``kv_cache=False``, ...),
    which replace the options' ones.  bf16_min_batch: see `decode_dtype`.  mesh: decode on a device
    mesh (`Sampler`).  backend, backend_options: the `pldr_jax.backend` choices (`Sampler`).

    params: stacked or per-layer; pass `prepare_params(cfg, params, batch)[1]` (or build a
    `Sampler` once) to avoid re-slicing or casting the weights on every call.
    """
    sampler = Sampler(cfg, params, mesh=mesh, bf16_min_batch=bf16_min_batch, backend=backend,
                      backend_options=backend_options)
    return sampler(prompts, max_new_tokens=max_new_tokens, options=options, **overrides)
