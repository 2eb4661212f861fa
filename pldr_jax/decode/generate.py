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

`generate` is a thin function over `sampler.Sampler` (build a Sampler once to keep the weight
preparation out of every call).  The modules: `request` (argument validation), `buckets` (static
lengths), `weights` (dtype policy and decode weight layout), `step` (the model over the cache, the
four modes), `loop` (device loop), `sampler` (the object that ties them together), `sharding`
(decoding on a mesh).
"""

from __future__ import annotations

from ..config import PLDRConfig
from .output import GenerateOutput
from .sampler import Sampler

__all__ = ["generate", "GenerateOutput"]


def generate(cfg: PLDRConfig, params: dict, prompts, *, max_new_tokens: int, kv_cache: bool = True,
             g_cache: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed=0,
             eos_id: int | None = 3, g_lm=None, shared_g: bool = False, stop_at_max_seq_len: bool = False,
             max_len: int | None = None, return_logits: bool = False, return_deductive: bool = False,
             bf16_min_batch: int | None = None, mesh=None) -> GenerateOutput:
    """Generate up to `max_new_tokens` new tokens for each prompt.

    prompts: list of token-id lists (ragged; right-padded internally to a length bucket).
    kv_cache / g_cache: the reference's four modes (`MODES`).  temperature, top_k, top_p: sampling,
    applied in the reference's order (temperature, top-p, top-k); top_k=1 is greedy.  seed: int or a
    PRNG key (reproducible sampling).  eos_id: a row stops after producing it (None: no EOS stop).
    g_lm: a G_LM override [num_layers, (1|B,) H, dk, dk] used in every step (predefined-G configs
    default to their own G).  shared_g: after prefill every row uses the first row's G (the authors'
    ``cache_first_G``; prefill itself uses each row's own G).  stop_at_max_seq_len: stop a row when it
    reaches max_seq_len instead of raising ValueError when prompt + max_new_tokens does not fit.
    max_len: cache/sequence buffer length (default: a bucket of prompt + new tokens).
    return_logits / return_deductive: also return per-step logits / deductive outputs.
    bf16_min_batch: see `decode_dtype`.  mesh: decode on a device mesh (`Sampler`).

    params: stacked or per-layer; pass `prepare_params(cfg, params, batch)[1]` (or build a
    `Sampler` once) to avoid re-slicing or casting the weights on every call.
    """
    sampler = Sampler(cfg, params, mesh=mesh, bf16_min_batch=bf16_min_batch)
    return sampler(prompts, max_new_tokens=max_new_tokens, kv_cache=kv_cache, g_cache=g_cache,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, g_lm=g_lm,
                   shared_g=shared_g, stop_at_max_seq_len=stop_at_max_seq_len, max_len=max_len,
                   return_logits=return_logits, return_deductive=return_deductive)
