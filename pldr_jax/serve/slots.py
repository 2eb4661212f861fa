"""The engine's device side: a batch of decode slots, the jitted admission of requests into free
slots, and the jitted generate block that advances every slot.

The model is the project's decode path: `admit` runs `decode.loop.prefill_and_trim`
(`decode.step.prefill`) over the prompts admitted together, samples their first tokens from the
prompts' logits and writes their cache rows into free rows of the slots' cache, all in one device
call; `generate_step` runs `decode.step.decode_step` over every slot and samples one token per live
slot, up to ``steps`` times per call (a ``lax.while_loop`` that ends early when a slot stops and
requests are waiting for it).  The slots' cache is one `decode.cache.Cache` of ``slots`` rows and S
positions; each row writes its keys/values at its own position (per-row KV slots: requests join at
different steps, so there is no common write slot).  With a shared G (the authors'
``cache_first_G``, or a given G) the G-cache has one row for every slot.

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
from ..decode.loop import LoopSpec, prefill_and_trim
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


@functools.partial(jax.jit, static_argnames=("spec", "shared_g", "take_g", "with_logprobs", "sharding_rules"),
                   donate_argnames=("cache", "tokens"))
def admit(spec: LoopSpec, params, cache: Cache, tokens, prompts, lengths, g_all, p: SlotParams, slots, *,
          shared_g: bool, take_g: bool, with_logprobs: bool, sharding_rules=None):
    """Prefill n requests together and put them into free slots, in one device call.

    prompts [n, P] int32 right-padded (lengths [n]) run through `decode.loop.prefill_and_trim` into a
    cache of P positions (the prompt bucket, not the slots' S: only the prompt's keys/values are
    computed and copied); their first tokens are sampled from the prompts' logits (p: their n-row
    `SlotParams`); their cache rows go to rows `slots` [n] of the slots' `cache` (donated; k/v at
    positions 0 .. P-1, the rest of a row is masked out by its length), the tokens into `tokens` [B]
    (donated).  A slot index >= B drops its row (filler rows of a padded batch).  With `shared_g` the
    G-cache is one row for every slot: taken from row 0 when `take_g` (the first request), else left
    as it is.  sharding_rules: `partitioning.active_rules_key()` of the caller's scope (the prefill
    traced under `decode.sharding.prefill_scope` compiles apart).  Returns (cache, tokens, first
    tokens [n], logprobs (`token_logprobs`) or None)."""
    new, logits0, _ = prefill_and_trim(spec, params, prompts, lengths, g_all, prompts.shape[1], stack_deductive=False)
    tok = sample_rows(logits0, p)
    S = cache.tokens.shape[1]
    put = lambda big, small: big.at[slots].set(small.astype(big.dtype), mode="drop")
    put_kv = lambda big, small: big.at[slots, :, :small.shape[2]].set(small.astype(big.dtype), mode="drop")
    per = lambda big, small, f=put: None if big is None else tuple(f(b, s) for b, s in zip(big, small))
    keep_g = lambda big, small: (tuple(s[:1].astype(b.dtype) for b, s in zip(big, small)) if take_g else big) \
        if shared_g else per(big, small)
    row_tokens = jnp.pad(new.tokens, ((0, 0), (0, S - new.tokens.shape[1])))
    out = cache.replace(k=per(cache.k, new.k, put_kv), v=per(cache.v, new.v, put_kv), A=keep_g(cache.A, new.A),
                        A_LM=keep_g(cache.A_LM, new.A_LM), G_LM=keep_g(cache.G_LM, new.G_LM),
                        tokens=put(cache.tokens, row_tokens), lengths=put(cache.lengths, new.lengths),
                        prompt_lengths=None if cache.prompt_lengths is None else
                        put(cache.prompt_lengths, new.prompt_lengths))
    lp = token_logprobs(logits0, tok) if with_logprobs else None
    return out, put(tokens, tok), tok, lp


@functools.partial(jax.jit, static_argnames=("spec", "with_logprobs", "steps"), donate_argnames=("cache", "tokens"))
def generate_step(spec: StepSpec, params, cache: Cache, tokens, p: SlotParams, limit, eos, max_steps, stop_on_free, *,
                  with_logprobs: bool, steps: int):
    """A block of at most ``min(max_steps, steps)`` iterations (one ``lax.while_loop``) of: one
    `decode.step.decode_step` of every live slot on its last token (tokens [B]; a slot's length grows
    where it is live), then one token per live slot (`sample_rows`).

    A slot is live where p.live and it has not ended: its last token is not its EOS (eos [B] int32,
    -1 = none; a request admitted with an EOS first token) and it has fewer than its limit (limit
    [B] int32) tokens (p.count).  It stops inside the block after its EOS or limit-th token, so the
    tokens are the one-step-at-a-time ones.  The block ends when no slot is live, after max_steps
    (int32 scalar; `steps`, static, is the output buffers' length) iterations, or, where
    stop_on_free (a bool scalar) is set, after the iteration in which a slot stopped (its slot can be
    refilled at once instead of idling to the block's end).  Returns (cache, last tokens [B], new
    tokens [steps, B] (0 where not live), live [steps, B] (the token of that iteration is the slot's;
    all False past the iterations run), logprobs (`token_logprobs`, each [steps, B, ...]) or None)."""
    B = tokens.shape[0]
    K = TOP_LOGPROBS
    bufs = (jnp.zeros((steps, B), jnp.int32), jnp.zeros((steps, B), bool),
            (jnp.zeros((steps, B), jnp.float32), jnp.zeros((steps, B, K), jnp.int32),
             jnp.zeros((steps, B, K), jnp.float32)) if with_logprobs else None)
    live0 = p.live & (p.count < limit) & (tokens != eos)

    def body(carry):
        i, cache, tok, count, live, _, (new_buf, live_buf, lp_buf) = carry
        logits, cache, _ = decode_step(spec, params, cache, tok, live)
        new = jnp.where(live, sample_rows(logits, p.replace(live=live, count=count)), 0)
        count = count + live.astype(count.dtype)
        done = live & ((new == eos) | (count >= limit))
        bufs = (new_buf.at[i].set(new), live_buf.at[i].set(live),
                None if lp_buf is None else tuple(b.at[i].set(x) for b, x in zip(lp_buf, token_logprobs(logits, new))))
        return i + 1, cache, jnp.where(live, new, tok), count, live & ~done, jnp.any(done), bufs

    def more(carry):
        i, _, _, _, live, stopped, _ = carry
        return (i < jnp.minimum(max_steps, steps)) & jnp.any(live) & ~(stop_on_free & stopped)

    _, cache, tokens, _, _, _, (new, live, lps) = jax.lax.while_loop(
        more, body, (jnp.int32(0), cache, tokens, p.count, live0, jnp.bool_(False), bufs))
    return cache, tokens, new, live, lps
