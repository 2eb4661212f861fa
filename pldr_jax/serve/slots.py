"""The engine's device side: a batch of decode slots, the jitted admission of prefilled requests
into free slots, and the jitted generate step that advances every slot.

The model is the project's decode path: `decode.loop.prefill_cache` (`decode.step.prefill`) fills
the cache of the requests admitted together; `admit` samples their first tokens from the prompts'
logits and writes their rows into free rows of the slots' cache; `generate_step` runs `decode.step.decode_step` over every
slot and samples one token per live slot, ``steps`` times per call.  The slots' cache is one
`decode.cache.Cache` of ``slots`` rows and S positions; each row writes its keys/values at its own
position (per-row KV slots: requests join at different steps, so there is no common write slot).  With a shared G (the
authors' ``cache_first_G``, or a given G) the G-cache has one row for every slot.

**Sampling per row.**  Each slot has its own temperature, top-k, top-p and PRNG key (per-slot
arrays: changing them never recompiles).  A request's t-th token (t = 0 from the prompt's logits)
is drawn exactly as `decode.Sampler` draws the t-th token of that prompt alone with the same seed:
``categorical(fold_in(key(seed), t), filter_logits(logits[1, V], ...))`` (`decode.loop._record`
with one row: the batch of one row is the key's whole draw), vmapped over the slots with each
slot's key and token count; a slot with top_k == 1 takes the argmax (`sampling.greedy_tokens`), as
the Sampler's greedy path.  So a request's tokens do not depend on which other requests share the
batch, nor on the step it arrived at.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ..decode.cache import Cache
from ..decode.sampling import filter_logits, greedy_tokens
from ..decode.step import StepSpec, decode_step

__all__ = ["SlotParams", "TOP_LOGPROBS", "sample_rows", "token_logprobs", "empty_slots", "admit", "generate_step"]

#: How many of the most likely tokens a step reports per slot (OpenAI's ``logprobs`` is at most 5).
TOP_LOGPROBS = 5


@flax.struct.dataclass
class SlotParams:
    """Per-slot host values of one step (small arrays sent with every step; never recompile).

    live [B] bool: the slot holds a request.  count [B] int32: tokens the slot's request has sampled
    (the next token's index t).  key [B, 2] uint32: the raw PRNG key of each request's seed.
    temperature [B] float32, top_k [B] int32 (1 = greedy), top_p [B] float32."""
    live: Any
    count: Any
    key: Any
    temperature: Any
    top_k: Any
    top_p: Any


def sample_rows(logits, p: SlotParams):
    """One token per row of logits [B, V]: row b as `decode.sampling.sample_logits` draws row 0 of a
    one-row batch with key ``fold_in(key_b, count_b)`` (see the module docstring) -> int32 [B]."""
    def one(row, key, t, temperature, top_k, top_p, filtered):
        x = filter_logits(row[None], temperature, top_k, top_p) if filtered else \
            row[None].astype(jnp.float32) / temperature
        return jax.random.categorical(jax.random.fold_in(jax.random.wrap_key_data(key), t), x, axis=-1)[0]

    def draw(filtered):
        return lambda: jax.vmap(lambda *a: one(*a, filtered))(
            logits, p.key, p.count, p.temperature, p.top_k, p.top_p).astype(jnp.int32)

    greedy = greedy_tokens(logits)
    sampled = p.live & (p.top_k != 1)
    # only what some row needs: a vocabulary sort where a row filters (top-k > 1 or top-p < 1; an
    # unfiltered row's filter_logits is its logits / temperature, the same values), a draw where a
    # row samples (lax.cond runs one branch)
    filtered = jnp.any(sampled & ((p.top_k > 1) | (p.top_p < 1.0)))
    drawn = jax.lax.cond(jnp.any(sampled), lambda: jax.lax.cond(filtered, draw(True), draw(False)),
                         lambda: greedy)
    return jnp.where(p.top_k == 1, greedy, drawn)


def token_logprobs(logits, tokens):
    """log p of tokens [B] under logits [B, V] (the model's distribution, before any sampling
    filter), and the TOP_LOGPROBS most likely (ids [B, K], log p [B, K])."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp


def empty_slots(one: Cache, slots: int, shared_g: bool) -> Cache:
    """A zero cache of `slots` rows shaped like `one` (a one-row prefill's cache or its shape);
    the G-cache keeps one row when `shared_g`."""
    def rows(x, keep_one=False):
        if x is None:
            return None
        return jnp.zeros(((1 if keep_one else slots),) + tuple(x.shape[1:]), x.dtype)

    per = lambda t, keep_one=False: None if t is None else tuple(rows(a, keep_one) for a in t)
    return Cache(k=per(one.k), v=per(one.v), A=per(one.A, shared_g), A_LM=per(one.A_LM, shared_g),
                 G_LM=per(one.G_LM, shared_g), tokens=rows(one.tokens), lengths=rows(one.lengths),
                 prompt_lengths=rows(one.prompt_lengths),
                 kv_next=None if one.kv_next is None else jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("shared_g", "take_g", "with_logprobs"),
                   donate_argnames=("cache", "tokens"))
def admit(cache: Cache, tokens, new: Cache, logits0, p: SlotParams, slots, *, shared_g: bool, take_g: bool,
          with_logprobs: bool):
    """Sample the first token of n prefilled requests from their prompts' logits0 [n, V] (p: their
    n-row SlotParams) and write their n-row cache `new` into rows `slots` [n] of the slots' `cache`
    (donated), the tokens into `tokens` [B] (donated); a slot index >= B drops its row (filler rows
    of a padded batch).  With `shared_g` the G-cache is one row for every slot: taken from row 0 of
    `new` when `take_g` (the first request), else left as it is.
    Returns (cache, tokens, first tokens [n], logprobs (`token_logprobs`) or None)."""
    tok = sample_rows(logits0, p)
    put = lambda big, small: big.at[slots].set(small.astype(big.dtype), mode="drop")
    per = lambda big, small: None if big is None else tuple(put(b, s) for b, s in zip(big, small))
    keep_g = lambda big, small: (tuple(s[:1].astype(b.dtype) for b, s in zip(big, small)) if take_g else big) \
        if shared_g else per(big, small)
    out = cache.replace(k=per(cache.k, new.k), v=per(cache.v, new.v), A=keep_g(cache.A, new.A),
                        A_LM=keep_g(cache.A_LM, new.A_LM), G_LM=keep_g(cache.G_LM, new.G_LM),
                        tokens=put(cache.tokens, new.tokens), lengths=put(cache.lengths, new.lengths),
                        prompt_lengths=None if cache.prompt_lengths is None else
                        put(cache.prompt_lengths, new.prompt_lengths))
    lp = token_logprobs(logits0, tok) if with_logprobs else None
    return out, put(tokens, tok), tok, lp


@functools.partial(jax.jit, static_argnames=("spec", "with_logprobs", "steps"), donate_argnames=("cache", "tokens"))
def generate_step(spec: StepSpec, params, cache: Cache, tokens, p: SlotParams, limit, eos, *, with_logprobs: bool,
                  steps: int = 1):
    """`steps` iterations (one ``lax.scan``) of: one `decode.step.decode_step` of every slot on its
    last token (tokens [B]; a slot's length grows where it is live), then one token per live slot
    (`sample_rows`).  A slot stops inside the block after its EOS (eos [B] int32, -1 = none) or its
    limit-th token (limit [B] int32, counted with p.count), so the tokens are the one-step-at-a-time
    ones.  Returns (cache, last tokens [B], new tokens [steps, B] (0 where not live), live [steps, B]
    (the token of that step is the slot's), logprobs (`token_logprobs`, each [steps, B, ...]) or None)."""
    def body(carry, _):
        cache, tok, count, live = carry
        logits, cache, _ = decode_step(spec, params, cache, tok, live)
        new = jnp.where(live, sample_rows(logits, p.replace(live=live, count=count)), 0)
        lps = token_logprobs(logits, new) if with_logprobs else None
        count = count + live.astype(count.dtype)
        done = live & ((new == eos) | (count >= limit))
        return (cache, jnp.where(live, new, tok), count, live & ~done), (new, live, lps)

    (cache, tokens, _, _), (new, live, lps) = jax.lax.scan(body, (cache, tokens, p.count, p.live), None,
                                                           length=steps)
    return cache, tokens, new, live, lps
