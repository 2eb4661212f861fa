"""The model over the decoding cache: the prefill that fills it and one decode step per new token.

Both run `layer.decoder_layer` over per-layer weights (`weights.prepare_params`); the cache modes are
the arguments they pass it.  The reference's four modes (`MODES`; docs/model.md "Caches at inference"):

* ``kv_g`` (KV-cache + G-cache): only the new token runs; G_LM is the cached prompt G.
* ``kv`` (KV-cache only): only the new token runs; G is re-derived each step from the cached
  prompt-time A (A -> A_LM -> A_P -> G_LM; the same numbers, more work).
* ``g`` (G-cache only): the whole sequence is re-run each step in the fixed buffer (positions
  beyond the current length are padding), with the prompt's G in every layer.
* ``none``: the whole sequence is re-run and A, G are recomputed from it each step (pad-aware A),
  so G drifts from the prompt's: the tokens may differ from the cached modes (as in the reference).

With a given G (predefined-G configs, or ``g_lm=``) G is that tensor in every step of every mode,
and the metric learner never runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig
from ..layer import SequenceAttention, decoder_layer, deduce
from ..model import embed
from ..ops.attention import causal_padding_mask
from ..ops.layers import linear
from ..ops.rope import rope_tables
from .attention import LastQuery, NativeKV, RowSlotsKV, SharedSlotKV
from .cache import Cache

__all__ = ["MODES", "mode_name", "StepSpec", "prefill", "decode_step"]

#: mode name -> (kv_cache, g_cache)
MODES: dict[str, tuple[bool, bool]] = {"kv_g": (True, True), "kv": (True, False), "g": (False, True),
                                       "none": (False, False)}


def mode_name(kv_cache: bool, g_cache: bool) -> str:
    """The `MODES` name of a (kv_cache, g_cache) pair."""
    return {v: k for k, v in MODES.items()}[(bool(kv_cache), bool(g_cache))]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of the decode step (hashable: a static jit argument)."""
    cfg: PLDRConfig            # run config (decode dtype applied, `weights.decode_dtype`)
    kv_cache: bool
    g_cache: bool
    given_g: bool              # G_LM is given (predefined-G config or g_lm=)
    kv_dtype: str | None = None  # KV-cache buffer dtype (None = cfg.dtype; `backend` kv_cache_dtype)
    shared_slot: bool = False  # every row writes a step's key/value at one slot (`cache` "KV slots")
    merged_heads: bool = True  # attention over one [B * H] axis (`backend` decode_merged_heads)
    kv_chunk: int = 0          # attend over the live KV slots, this many at a time, when the buffer
                               # is longer (`backend` decode_kv_chunk; 0 = the whole buffer)
    native_kv: bool = False    # per-row KV write + attention as the native XLA:CPU kernel
                               # (`backend` decode_attention; `kernels.decode_attention_update`)
    prefill_attention: SequenceAttention = SequenceAttention()  # the prompt pass's attention (a
                               # mask-less template: `strategies.attention_strategy`, the training
                               # step's choice: a fused kernel on accelerators, `decode.plan`)

    @property
    def fixed_g(self) -> bool:
        """G_LM stays the prompt's (or the given one) after prefill."""
        return self.given_g or self.g_cache


def _run_layers(cfg: PLDRConfig, params, x, rope, attention, *, metric_mask=None, g_lm=None, metric=None):
    """`decoder_layer` over every layer of per-layer params.

    x [B, L, D]; rope: the positions' RoPE tables, shared by every layer; attention: layer index ->
    that layer's `layer.Attention` strategy.  Per-layer inputs, indexed by layer (a tuple or a
    stacked array), None when unused: g_lm [L][B|1, H, dk, dk] (a given G), metric [L][B|1, H, dk,
    dk] (a cached A: A_LM, A_P, G_LM are re-derived from it); else G from the queries, with
    metric_mask [B, L].  Returns (x_out [B, L|1, D], keys [L][B, L, H, dk] (or the updated buffers
    [L][B, H, S, dk]), values, per-layer deductive dicts).
    """
    layers = params["layers"]
    if not isinstance(layers, (tuple, list)):
        raise ValueError("decoding needs per-layer weights: pass params through unstack_layers / prepare_params")
    ks, vs, deds = [], [], []
    for i, lp in enumerate(layers):
        ded = None if metric is None else deduce(lp, metric[i])
        g = ded["G_LM"] if ded is not None else None if g_lm is None else g_lm[i]
        x, own, (k, v) = decoder_layer(cfg, lp, x, rope, attention(i), g_lm=g, metric_mask=metric_mask)
        ks.append(k)
        vs.append(v)
        deds.append(own if ded is None else ded)
    return x, ks, vs, deds


def _pad_to(x, S, axis=1):
    """x zero-padded to S positions on `axis`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, S - x.shape[axis])
    return jnp.pad(x, pad)


def _kv_buffer(t, S, dtype):
    """Prefill keys/values [B, P, H, dk] -> a cache buffer [B, H, S, dk] of `dtype`."""
    return _pad_to(jnp.transpose(t, (0, 2, 1, 3)).astype(dtype), S, axis=2)


@functools.lru_cache(maxsize=32)
def prompt_rope_tables(P: int, dk: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """The RoPE (cos, sin) tables [P, dk/2] of positions 0 .. P-1, made once per shape by a
    compiled `ops.rope.rope_tables` (the values a rotation computes in the graph, bit for bit) and
    used by the traced prefill (P = the prompt length) and decode step (P = the buffer length; a
    step gathers its rows' positions) as constants.  Computed in the graph instead, XLA fuses the
    cos and sin into every layer's q and k rotation and recomputes them per element and head (~85 %
    of the prefill rotation's time; ~0.1 ms per rotation, 1 ms of a batch-32 decode step:
    experiments/README.md "Prefill against its floor", "Where the decode step's time goes (CPU)")."""
    pos = np.arange(P, dtype=np.int32)
    compiled = jax.jit(rope_tables, static_argnums=(1, 2)).lower(pos, dk, theta).compile()
    cos, sin = compiled(pos)
    return np.asarray(cos), np.asarray(sin)


def prefill(cfg: PLDRConfig, params, tokens, lengths, g_all, max_len: int, kv_dtype: str | None = None,
            stack_deductive: bool = True, attention: SequenceAttention = SequenceAttention()):
    """Run right-padded prompts tokens [B, P] (lengths [B]) once; the same for every mode.

    Each row's A sums over its own tokens only; padding is masked out of A and of the keys.
    g_all: None (derive G) or a given G_LM [L, B|1, H, dk, dk].  kv_dtype: the KV buffers' dtype
    (None = cfg.dtype).  The positions are 0 .. P-1 in every row, so the RoPE tables are constants
    (`prompt_rope_tables`), shared by every layer.  Returns (cache with k/v in heads-first buffers
    [B, H, max_len, dk], logits [B, V] float32 of each row's last prompt token, the prompt's
    deductive outputs {"A", "A_LM", "G_LM"} stacked [L, B, H, dk, dk] (only "G_LM" with a given G),
    or None without `stack_deductive`: the cache holds the same values per layer, and the stacked
    copies cost a write of 3 x L x B x H x dk x dk floats (27 MB at batch 8 of v51 110M)).
    attention: the prompt's attention, a mask-less `layer.SequenceAttention` template (its mask set
    here, `over_tokens`; `StepSpec.prefill_attention`: on accelerators a fused kernel).
    """
    B, P = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    valid = positions < lengths[:, None]
    att = attention.over_tokens(valid)
    rope = tuple(jnp.asarray(t) for t in prompt_rope_tables(P, cfg.head_dim, float(cfg.rope_theta)))
    x, ks, vs, deds = _run_layers(cfg, params, embed(cfg, params, tokens, lookup_first=True), rope,
                                  lambda i: att, metric_mask=valid, g_lm=g_all)
    logits = linear(params["final"], x[jnp.arange(B), lengths - 1]).astype(jnp.float32)
    names = ("G_LM",) if g_all is not None else ("A", "A_LM", "G_LM")
    per_layer = lambda name: tuple(d[name] for d in deds) if name in names else None
    kv_dt = jnp.dtype(kv_dtype or cfg.dtype)
    cache = Cache(k=tuple(_kv_buffer(k, max_len, kv_dt) for k in ks),
                  v=tuple(_kv_buffer(v, max_len, kv_dt) for v in vs),
                  A=per_layer("A"), A_LM=per_layer("A_LM"), G_LM=per_layer("G_LM"),
                  tokens=_pad_to(tokens.astype(jnp.int32), max_len), lengths=lengths.astype(jnp.int32),
                  prompt_lengths=lengths.astype(jnp.int32), kv_next=jnp.max(lengths).astype(jnp.int32))
    return cache, logits, ({name: jnp.stack(per_layer(name)) for name in names} if stack_deductive else None)


def decode_step(spec: StepSpec, params, cache: Cache, token, active):
    """One model step: token [B] goes to position lengths[b] of row b (its length grows where
    active [B] is True).

    With the KV-cache only the new token runs, over the cached keys and values; without it the whole
    buffer [B, S] runs again (beyond each row's length = padding), its last layer only at the new
    token.  Returns (logits [B, V] in the compute dtype (every sampler reads them exactly; a
    float32 copy of a 16-bit model's 32 x 32000 logits cost 0.4-0.8 ms of a batch-32 step), the
    new cache, per-layer deductive outputs: {"G_LM"} (+ the cached "A_LM") with a fixed G, else
    {"A", "A_LM", "A_P", "G_LM"}, each [B|1, H, dk, dk]).  The RoPE tables of the step's positions
    are rows of the constant `prompt_rope_tables` of the buffer's S positions.
    """
    cfg = spec.cfg
    B, S = cache.tokens.shape
    pos = jnp.minimum(cache.lengths, S - 1)
    tokens = cache.tokens.at[jnp.arange(B), pos].set(token)
    lengths = jnp.where(active, pos + 1, cache.lengths)
    g_lm = cache.G_LM if spec.fixed_g else None
    rope = tuple(jnp.asarray(t) for t in prompt_rope_tables(S, cfg.head_dim, float(cfg.rope_theta)))  # [S, dk/2]
    if spec.kv_cache:               # the new token only; without a G-cache G comes from the cached A
        slot_ids = jnp.arange(S)[None, :]
        if spec.shared_slot:        # one slot for every row (`cache` "KV slots")
            slot = jnp.minimum(cache.kv_next, S - 1)
            valid = (slot_ids < cache.prompt_lengths[:, None]) | (   # the step's own slot is not
                (slot_ids >= jnp.max(cache.prompt_lengths)) & (slot_ids < slot))  # written yet
        else:
            valid = slot_ids <= pos[:, None]
        mask = valid[:, None, None, :]
        kv = lambda i: (cache.k[i], cache.v[i])
        if spec.shared_slot:
            attention = lambda i: SharedSlotKV(*kv(i), mask, slot, merged_heads=spec.merged_heads,
                                               kv_chunk=spec.kv_chunk)
        elif spec.native_kv:
            attention = lambda i: NativeKV(*kv(i), mask, pos)
        else:
            attention = lambda i: RowSlotsKV(*kv(i), mask, pos, merged_heads=spec.merged_heads,
                                             kv_chunk=spec.kv_chunk)
        x, ks, vs, deds = _run_layers(cfg, params, embed(cfg, params, token[:, None], lookup_first=True),
                                      tuple(t[pos][:, None] for t in rope), attention, g_lm=g_lm,
                                      metric=None if spec.fixed_g else cache.A)
        cache = cache.replace(k=tuple(ks), v=tuple(vs))
        if spec.shared_slot:
            cache = cache.replace(kv_next=cache.kv_next + 1)
    else:                           # the whole sequence; without a G-cache A and G come from it
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        valid = positions < lengths[:, None]
        whole = SequenceAttention(mask=causal_padding_mask(valid, S))
        last = LastQuery(mask=whole.mask, rows=lengths - 1)
        n = cfg.num_layers
        x, _, _, deds = _run_layers(cfg, params, embed(cfg, params, tokens, lookup_first=True), rope,
                                    lambda i: last if i == n - 1 else whole, metric_mask=valid, g_lm=g_lm)
    if spec.fixed_g and cache.A_LM is not None:
        deds = [dict(ded, A_LM=a_lm) for ded, a_lm in zip(deds, cache.A_LM)]
    logits = linear(params["final"], x[:, 0])      # the head's dtype: a sampler converts what it needs
    return logits, cache.replace(tokens=tokens, lengths=lengths), deds
