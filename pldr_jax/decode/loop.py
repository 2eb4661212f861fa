"""The decode loop on the device: sampling, EOS and length book-keeping, and its jitted entry points.

The traceable pieces (`start`, `advance`, `whole_loop`, `prefill_and_trim`; `plan.DecodePlan` binds
them to a call's static specs) and their jitted entry points.  `prefill_cache` runs the prompts once
(`step.prefill`).  `run_loop` samples the first new token from
the prompt's logits, then runs one ``lax.while_loop`` (early exit once every row is done) whose body is
one model step (`step.decode_step`) plus one sampling step.  The output buffer ``[B, N]`` is static;
the number of new tokens is a traced scalar (`LoopInputs`), so changing ``max_new_tokens``, the prompt
contents or the sampling values within a length bucket does not recompile.  `start_loop` and
`advance_loop` run the same loop one step per call (streaming).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ..partitioning import active_rules_key, rules_scope
from .cache import Cache
from .sampling import sample_logits
from .step import StepSpec, decode_step, prefill

__all__ = ["LoopSpec", "LoopInputs", "LoopState", "start", "advance", "whole_loop", "prefill_and_trim",
           "prefill_cache", "run_loop", "start_loop", "advance_loop", "compiled_counts"]


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Static description of a decode loop (hashable: a static jit argument)."""
    step: StepSpec
    shared_g: bool             # after prefill every row uses row 0's G (the authors' cache_first_G)
    sampler_kind: tuple        # static part of the sampler (`sampling.make_sampler`)
    collect_logits: bool = False
    collect_deductive: bool = False

    @property
    def deductive_names(self) -> tuple[str, ...]:
        """The per-step deductive outputs collected with `collect_deductive`."""
        return ("G_LM",) if self.step.given_g else ("A_LM", "G_LM")


@flax.struct.dataclass
class LoopInputs:
    """Traced per-call values (changing them never recompiles)."""
    max_new: jax.Array        # int32 scalar
    limit: jax.Array          # [B] int32: new tokens allowed per row
    eos_id: jax.Array         # int32 scalar, -1 = no EOS stop
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


@flax.struct.dataclass
class LoopState:
    """The loop carry."""
    t: jax.Array              # next step index
    token: jax.Array          # [B] last sampled token
    out: jax.Array            # [B, N] new tokens (0 after a row stops)
    done: jax.Array           # [B] bool
    count: jax.Array          # [B] new tokens per row
    cache: Cache
    key: jax.Array
    logits_buf: Any = None    # [N, B, V] (collect_logits)
    ded_buf: Any = None       # {"A_LM"|"G_LM": [N, L, B, H, dk, dk]} (collect_deductive)


def _record(spec: LoopSpec, st: LoopState, inputs: LoopInputs, logits, deds) -> LoopState:
    """Sample step st.t from logits [B, V] (float32, or a 16-bit model's dtype) and book-keep EOS /
    limits; deds: per-layer deductive dicts."""
    t = st.t
    tok = sample_logits(logits, jax.random.fold_in(st.key, t), inputs.temperature, inputs.top_k, inputs.top_p,
                        kind=spec.sampler_kind)
    active = ~st.done
    tok = jnp.where(active, tok, 0)
    count = st.count + active.astype(jnp.int32)
    done = st.done | (active & (tok == inputs.eos_id)) | (count >= inputs.limit)
    upd = dict(t=t + 1, token=tok, out=st.out.at[:, t].set(tok), done=done, count=count)
    if spec.collect_logits:
        upd["logits_buf"] = st.logits_buf.at[t].set(logits.astype(jnp.float32))
    if spec.collect_deductive:
        B = tok.shape[0]
        upd["ded_buf"] = {n: buf.at[t].set(jnp.stack([jnp.broadcast_to(d[n], (B,) + d[n].shape[1:]) for d in deds]))
                          for n, buf in st.ded_buf.items()}
    return st.replace(**upd)


def start(spec: LoopSpec, cache: Cache, logits0, ded0, key, inputs: LoopInputs, n_out: int) -> LoopState:
    """The loop state after step 0 (sampled from the prompt's logits0 [B, V]; ded0: the prompt's
    stacked deductive outputs, needed with collect_deductive)."""
    B = cache.tokens.shape[0]
    if spec.shared_g and not spec.step.given_g:    # the authors' cache_first_G: row 0's G for every row
        first = lambda t: None if t is None else tuple(a[:1] for a in t)
        cache = cache.replace(A=first(cache.A), A_LM=first(cache.A_LM), G_LM=first(cache.G_LM))
    st = LoopState(t=jnp.int32(0), token=jnp.zeros((B,), jnp.int32), out=jnp.zeros((B, n_out), jnp.int32),
                   done=inputs.limit <= 0, count=jnp.zeros((B,), jnp.int32), cache=cache, key=key)
    if spec.collect_logits:
        st = st.replace(logits_buf=jnp.zeros((n_out,) + logits0.shape, jnp.float32))
    deds0 = None
    if spec.collect_deductive:
        cfg = spec.step.cfg
        L, H, dk = cfg.num_layers, cfg.num_heads, cfg.head_dim
        names = spec.deductive_names
        st = st.replace(ded_buf={n: jnp.zeros((n_out, L, B, H, dk, dk), jnp.float32) for n in names})
        deds0 = [{n: ded0[n][i] for n in names} for i in range(L)]
    return _record(spec, st, inputs, logits0, deds0)


def advance(spec: LoopSpec, params, st: LoopState, inputs: LoopInputs) -> LoopState:
    """One model step on the last sampled tokens, then one sampling step."""
    logits, cache, deds = decode_step(spec.step, params, st.cache, st.token, ~st.done)
    return _record(spec, st.replace(cache=cache), inputs, logits, deds)


def whole_loop(spec: LoopSpec, params, cache: Cache, logits0, ded0, key, inputs: LoopInputs, n_out: int) -> LoopState:
    """`start`, then `advance` in a ``lax.while_loop`` until inputs.max_new steps or every row is done."""
    st = start(spec, cache, logits0, ded0, key, inputs, n_out)
    keep_going = lambda s: (s.t < inputs.max_new) & ~jnp.all(s.done)
    return jax.lax.while_loop(keep_going, lambda s: advance(spec, params, s, inputs), st)


def prefill_and_trim(spec: LoopSpec, params, tokens, lengths, g_all, max_len: int, stack_deductive: bool = True):
    """`step.prefill` for `spec` (its run config and KV-cache dtype); without the KV-cache the cache
    keeps no k/v."""
    cache, logits0, ded0 = prefill(spec.step.cfg, params, tokens, lengths, g_all, max_len, spec.step.kv_dtype,
                                   stack_deductive, spec.step.prefill_attention)
    if not spec.step.kv_cache:
        cache = cache.replace(k=None, v=None)
    return cache, logits0, ded0


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "kv_dtype", "stack_deductive", "attention",
                                             "sharding_rules"))
def _prefill_jit(cfg, params, tokens, lengths, g_all, *, max_len, kv_dtype, stack_deductive, attention,
                 sharding_rules):
    with rules_scope(sharding_rules):
        return prefill(cfg, params, tokens, lengths, g_all, max_len, kv_dtype, stack_deductive, attention)


@functools.partial(jax.jit, static_argnames=("spec", "n_out"), donate_argnames=("cache",))
def _loop_jit(spec, params, cache, logits0, ded0, key, inputs, *, n_out):
    return whole_loop(spec, params, cache, logits0, ded0, key, inputs, n_out)


@functools.partial(jax.jit, static_argnames=("spec", "n_out"), donate_argnames=("cache",))
def _start_jit(spec, cache, logits0, ded0, key, inputs, *, n_out):
    return start(spec, cache, logits0, ded0, key, inputs, n_out)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("st",))
def _advance_jit(spec, params, st, inputs):
    return advance(spec, params, st, inputs)


@contextlib.contextmanager
def _unused_donations_ok():
    """shared_g shrinks the G-cache, so some donated cache buffers go unused: not worth a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        yield


def prefill_cache(spec: LoopSpec, params, tokens, lengths, g_all, max_len: int, stack_deductive: bool = True):
    """`step.prefill` of tokens [B, P] (lengths [B]; g_all None or [L, B|1, H, dk, dk]), jitted.

    Returns (cache with buffers of max_len positions (no k/v without the KV-cache), logits0 [B, V]
    float32, the prompt's deductive outputs stacked [L, B, H, dk, dk], or None without
    `stack_deductive` (`run_loop` needs them with collect_deductive))."""
    cache, logits0, ded0 = _prefill_jit(spec.step.cfg, params, tokens, lengths, g_all, max_len=max_len,
                                        kv_dtype=spec.step.kv_dtype, stack_deductive=stack_deductive,
                                        attention=spec.step.prefill_attention, sharding_rules=active_rules_key())
    if not spec.step.kv_cache:
        cache = cache.replace(k=None, v=None)
    return cache, logits0, ded0


def run_loop(spec: LoopSpec, params, cache: Cache, logits0, ded0, key, inputs: LoopInputs, *,
             n_out: int) -> LoopState:
    """The whole decode loop on the device, from `prefill_cache`'s outputs (the cache is donated;
    ded0 may be None without collect_deductive) to the final state (out [B, n_out], count [B], ...)."""
    with _unused_donations_ok():
        return _loop_jit(spec, params, cache, logits0, ded0, key, inputs, n_out=n_out)


def start_loop(spec: LoopSpec, cache: Cache, logits0, ded0, key, inputs: LoopInputs, *, n_out: int) -> LoopState:
    """The loop state after step 0 (token 0 sampled from logits0), as `run_loop` starts; cache donated."""
    with _unused_donations_ok():
        return _start_jit(spec, cache, logits0, ded0, key, inputs, n_out=n_out)


def advance_loop(spec: LoopSpec, params, st: LoopState, inputs: LoopInputs) -> LoopState:
    """One iteration of `run_loop`'s body (st is donated)."""
    return _advance_jit(spec, params, st, inputs)


def compiled_counts() -> dict[str, int]:
    """Compiled variants of each jitted decode entry point: {"prefill", "loop", "start", "advance"}."""
    return {"prefill": _prefill_jit._cache_size(), "loop": _loop_jit._cache_size(),
            "start": _start_jit._cache_size(), "advance": _advance_jit._cache_size()}
