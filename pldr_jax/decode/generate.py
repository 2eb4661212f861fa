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

The modules: `request` (argument validation), `buckets` (static lengths), `weights` (dtype policy
and decode weight layout), `step` (the model over the cache, the four modes), `loop` (device loop).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..config import PLDRConfig
from .cache import Cache
from .loop import prefill_cache, run_loop
from .request import make_request
from .step import mode_name

__all__ = ["generate", "GenerateOutput"]


@dataclasses.dataclass
class GenerateOutput:
    """Result of `generate`.

    tokens: one list per prompt of its new token ids (ending with eos_id if it was produced).
    ids: [B, N] int32 new tokens, 0 after a row stopped (N = output buffer length >= max_new_tokens).
    num_generated: [B] new tokens per row.
    prompt_lengths: [B].
    mode: "kv_g" | "kv" | "g" | "none".
    steps: loop steps run (= max over rows of num_generated).
    logits: [B, steps, V] float32 per-step logits of each model call (return_logits=True), else None.
    deductive: per-step {"A_LM", "G_LM"} [steps, L, B, H, dk, dk] (return_deductive=True), else None.
    cache: the final Cache (prompt-time A / A_LM / G_LM, k/v, tokens fed so far, lengths).
    prompt_deductive: the prompt's {"A", "A_LM", "G_LM"} [L, B, H, dk, dk] (each row's own; with a
      given G only "G_LM").
    timings: {"prefill_s", "decode_s"} wall times (prefill includes its dispatch and, on the first
      call of a shape, its compilation).
    compute_dtype: the dtype the decode ran in (see `decode_dtype`).
    """
    tokens: list
    ids: np.ndarray
    num_generated: np.ndarray
    prompt_lengths: np.ndarray
    mode: str
    steps: int
    logits: np.ndarray | None = None
    deductive: dict | None = None
    cache: Cache | None = None
    prompt_deductive: dict | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str = "float32"


def generate(cfg: PLDRConfig, params: dict, prompts, *, max_new_tokens: int, kv_cache: bool = True,
             g_cache: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed=0,
             eos_id: int | None = 3, g_lm=None, shared_g: bool = False, stop_at_max_seq_len: bool = False,
             max_len: int | None = None, return_logits: bool = False, return_deductive: bool = False,
             bf16_min_batch: int | None = None) -> GenerateOutput:
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
    bf16_min_batch: see `decode_dtype`.

    params: stacked or per-layer; pass `prepare_params(cfg, params, batch)[1]` to avoid re-slicing or
    casting the weights on every call.
    """
    req = make_request(cfg, params, prompts, max_new_tokens=max_new_tokens, kv_cache=kv_cache, g_cache=g_cache,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, g_lm=g_lm,
                       shared_g=shared_g, stop_at_max_seq_len=stop_at_max_seq_len, max_len=max_len,
                       return_logits=return_logits, return_deductive=return_deductive,
                       bf16_min_batch=bf16_min_batch)
    t0 = time.perf_counter()
    cache, logits0, ded0 = prefill_cache(req.spec, req.params, req.tokens, req.lengths, req.g_all, req.max_len)
    logits0.block_until_ready()
    t1 = time.perf_counter()
    st = run_loop(req.spec, req.params, cache, logits0, ded0 if return_deductive else None, req.key, req.inputs,
                  n_out=req.n_out)
    out = np.asarray(st.out)
    t2 = time.perf_counter()
    count = np.asarray(st.count)
    steps = int(st.t)
    B = out.shape[0]
    logits = None
    if return_logits:
        logits = np.transpose(np.asarray(st.logits_buf[:steps]), (1, 0, 2))
    ded = None
    if return_deductive:
        ded = {n: np.asarray(v[:steps]) for n, v in st.ded_buf.items()}
    return GenerateOutput(
        tokens=[out[b, :count[b]].tolist() for b in range(B)], ids=out, num_generated=count,
        prompt_lengths=req.lengths, mode=mode_name(kv_cache, g_cache), steps=steps, logits=logits,
        deductive=ded, cache=st.cache, prompt_deductive=dict(ded0),
        timings={"prefill_s": t1 - t0, "decode_s": t2 - t1}, compute_dtype=req.spec.step.cfg.dtype)
