"""`plan`: the static shape of a decode call, and the jittable functions that run it.

A `DecodePlan` is resolved once per call from the model config, the batch, the prompt lengths, the
number of new tokens, the `DecodeOptions` and the `BackendChoices` (`pldr_jax.backend`): the length
buckets (P prompt positions, S cache positions, N output slots, `buckets.plan_lengths`), the decode
compute dtype (`weights.decode_dtype`), and the static step / loop specs (`step.StepSpec`,
`loop.LoopSpec`: cache mode, KV-cache dtype, shared or per-row KV slots, the native kernel, merged
heads, live chunks, the sampler's static part), which are the decode programs' compile-cache keys.

Its methods are the pieces every decode path traces -- `prefill`, `start`, `advance`, `loop` --
plain functions of arrays, to be jitted by the caller (`decode.loop`'s jitted entry points, which
`Sampler` calls; `pldr_jax.aot` lowers them for a TPU topology).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from ..backend import BackendChoices, backend_for, uses_native_decode_attention
from ..config import PLDRConfig
from ..strategies import attention_strategy
from . import loop as _loop
from .buckets import plan_lengths
from .options import DecodeOptions, decode_options
from .sampling import make_sampler
from .step import StepSpec
from .weights import decode_dtype

__all__ = ["DecodePlan", "plan"]


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """spec: the static loop spec (its ``step`` the step spec; hashable, the jit key).  backend: the
    choices it was made with.  batch: rows B.  prompt_len: padded prompt length P.  max_len: cache /
    sequence buffer length S.  n_out: output buffer length N.  limit: [B] int32 new tokens allowed
    per row."""
    spec: _loop.LoopSpec
    backend: BackendChoices
    batch: int
    prompt_len: int
    max_len: int
    n_out: int
    limit: np.ndarray = dataclasses.field(compare=False, hash=False, repr=False)

    @property
    def cfg(self) -> PLDRConfig:
        """The run config (the decode compute dtype applied)."""
        return self.spec.step.cfg

    def prefill(self, params, tokens, lengths, g_all, stack_deductive: bool = True):
        """`step.prefill` of tokens [B, P] (lengths [B]; g_all None or [L, B|1, H, dk, dk]) into a cache
        of S positions (no k/v without the KV-cache): (cache, logits0 [B, V], the prompt's stacked
        deductive outputs or None)."""
        return _loop.prefill_and_trim(self.spec, params, tokens, lengths, g_all, self.max_len, stack_deductive)

    def start(self, cache, logits0, ded0, key, inputs) -> _loop.LoopState:
        """The loop state after step 0 (token 0 sampled from logits0)."""
        return _loop.start(self.spec, cache, logits0, ded0, key, inputs, self.n_out)

    def advance(self, params, st: _loop.LoopState, inputs) -> _loop.LoopState:
        """One model step on the last sampled tokens, then one sampling step."""
        return _loop.advance(self.spec, params, st, inputs)

    def loop(self, params, cache, logits0, ded0, key, inputs) -> _loop.LoopState:
        """`start`, then `advance` in a ``lax.while_loop`` until max_new or every row is done."""
        return _loop.whole_loop(self.spec, params, cache, logits0, ded0, key, inputs, self.n_out)


def plan(cfg: PLDRConfig, batch: int, prompt_lengths: int | Sequence[int], max_new_tokens: int,
         options: DecodeOptions | None = None, backend: BackendChoices | None = None, *,
         sharded: bool = False) -> DecodePlan:
    """The `DecodePlan` for `batch` prompts of `prompt_lengths` tokens (one int: every row; or B
    ints) decoding up to `max_new_tokens` with `options` (None: the defaults) on `backend` (None:
    `pldr_jax.backend.choices()`).  sharded: decoding over a mesh of several devices (no native
    kernels).  ValueError when the lengths do not fit the model (`buckets.plan_lengths`)."""
    options = decode_options(options)
    backend = backend_for(backend)
    if isinstance(prompt_lengths, numbers.Integral):
        lens = np.full((batch,), int(prompt_lengths), np.int32)
    else:
        lens = np.asarray(prompt_lengths, np.int32).reshape(-1)
        if lens.shape[0] != batch:
            raise ValueError(f"{lens.shape[0]} prompt lengths for a batch of {batch}")
    max_new = int(max_new_tokens)
    P, S, N = plan_lengths(cfg, int(lens.max()), max_new, max_len=options.max_len,
                           stop_at_max_seq_len=options.stop_at_max_seq_len)
    limit = np.minimum(max_new, S - lens).astype(np.int32)
    run = decode_dtype(cfg, batch, backend.bf16_min_batch)
    run_cfg = cfg if run == cfg.dtype else cfg.replace(dtype=run)
    given = options.g_lm is not None or not cfg.learned_g
    kv = bool(options.kv_cache)
    # with a given G the G-cache flag changes nothing (G is fixed anyway): one compilation for both
    # one shared KV slot per step (`decode.cache` "KV slots", where the backend wants it) if the buffer
    # holds the longest prompt + the most tokens any row decodes; else each row's own position
    shared_slot = kv and backend.decode_shared_kv_slot and int(lens.max()) + int(limit.max()) <= S
    # per-row slots on CPU: the cache write + attention as the native kernel where it builds (its
    # buffers in the compute dtype), else the jax.lax path (a 16-bit model's buffers wider there)
    native_kv = kv and not shared_slot and uses_native_decode_attention(backend, run_cfg.dtype, sharded=sharded)
    wide = None if native_kv else backend.kv_cache_dtype
    kv_dtype = wide if wide and jnp.dtype(run_cfg.dtype).itemsize < jnp.dtype(wide).itemsize else None
    # the prompt pass attends as the training step does (`strategies`: a fused kernel on accelerators,
    # the query blocks where it does not apply); the decode steps keep their own KV attention
    step = StepSpec(cfg=run_cfg, kv_cache=kv, g_cache=bool(options.g_cache) or given, given_g=given,
                    kv_dtype=kv_dtype, shared_slot=shared_slot, merged_heads=backend.decode_merged_heads,
                    kv_chunk=backend.decode_kv_chunk if kv else 0, native_kv=native_kv,
                    prefill_attention=attention_strategy(backend))
    sampler = make_sampler(options.temperature, options.top_k, options.top_p)
    spec = _loop.LoopSpec(step=step, shared_g=bool(options.shared_g), sampler_kind=sampler.kind,
                          collect_logits=bool(options.return_logits),
                          collect_deductive=bool(options.return_deductive))
    return DecodePlan(spec=spec, backend=backend, batch=batch, prompt_len=P, max_len=S, n_out=N, limit=limit)
