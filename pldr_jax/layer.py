"""The PLDR-LLM decoder layer (arXiv 2502.13502), in the paper's order:

    q, k, v          = RoPE(x W_q), RoPE(x W_k), x W_v                      `project_qkv`
    A                = metric learner(sum over tokens of q q^T)             `metric_A`
    A_LM, A_P, G_LM  = the deductive outputs of A  (or G_LM given)          `deduce`
    att              = softmax((q G_LM) k^T / sqrt(dk) + mask) v            the `Attention` strategy
    out              = LN(h + GLU(h)),  h = LN(x + att W_o)                 `mix`

Every caller (training, evaluation, `model.forward`, the decoder's prefill and its four cache modes)
runs this one `decoder_layer`; what differs is where G_LM comes from (derived from this call's
queries, or given: a predefined G, an override, the G-cache) and how the layer attends, which is a
value (`Attention`):

* `SequenceAttention` (the default): the paper's attention over the call's own keys and values,
  optionally `block` queries at a time (`attention_in_query_blocks`; the same values, memory linear
  in the sequence length).  Fused implementations (`pldr_jax.kernels`) subclass it.
* decoding's strategies (`pldr_jax.decode.attention`): a one-token step writes its key and value
  into the KV-cache and attends over it (per-row or shared slots, live chunks, the native kernel), or
  computes the output at one query row per sequence.

``kernels`` selects the matmul implementation (`pldr_jax.backend`; "xla" by default, "cpu" in a CPU
training step); the values are the same.
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from .config import PLDRConfig
from .ops.attention import causal_padding_mask, plga_attention
from .ops.deductive import derive_g
from .ops.layers import glu, layer_norm, linear
from .ops.metric import metric_learner, metric_tensor
from .ops.rope import apply_rope
from .partitioning import constrain, split_size

__all__ = ["Attention", "SequenceAttention", "project_qkv", "metric_A", "deduce", "attention_in_query_blocks",
           "mix", "decoder_layer"]


class Attention:
    """How a decoder layer's queries attend: a strategy value (a pytree, `flax.struct.dataclass`, that
    carries its own arrays: a mask, KV-cache buffers, ...).  See the module docstring."""

    def queries(self, x: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x [B, L, D], q [B, L, H, dk]) at the positions whose output is wanted (here: all)."""
        return x, q

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, g_lm: jax.Array):
        """q [B, Lq, H, dk] (rotated, after `queries`), k, v [B, L, H, dk] (this call's rotated keys
        and values), g_lm [B|1, H, dk, dk] float32 -> (att [B, Lq, H, dk], the keys and values
        attended over: (k, v) themselves, or the KV-cache buffers they were written into)."""
        raise NotImplementedError


@flax.struct.dataclass
class SequenceAttention(Attention):
    """The paper's attention over the call's own keys and values, `block` queries at a time
    (`attention_in_query_blocks`; 0 = all at once).  mask [B, 1, Lq, Lk] bool (True = may attend)
    or None.  Without a mask it is hashable: `model.forward` takes one as a (static) template and
    sets its mask (`over_tokens`, or ``.replace(mask=...)`` for another mask); a fused implementation
    subclasses it."""
    mask: jax.Array | None = None
    block: int = flax.struct.field(pytree_node=False, default=0)
    #: whether any mask works (False: only the causal-padding mask; `model.forward` then refuses a
    #: packed row's mask)
    general_mask: ClassVar[bool] = True

    def over_tokens(self, key_valid: jax.Array) -> "SequenceAttention":
        """This attention for a causal self-attention over tokens whose keys are valid where
        `key_valid` [B, L] bool (False = padding): its mask set to `causal_padding_mask(key_valid, L)`.
        A fused subclass keeps `key_valid` itself (no [B, 1, L, L] mask array)."""
        return self.replace(mask=causal_padding_mask(key_valid, key_valid.shape[-1]))

    def __call__(self, q, k, v, g_lm):
        return attention_in_query_blocks(q, k, v, g_lm, self.mask, self.block), (k, v)


def project_qkv(cfg: PLDRConfig, lp: dict, x: jax.Array, positions: jax.Array | None, kernels: str = "xla",
                rope: tuple[jax.Array, jax.Array] | None = None):
    """x [B, L, D], positions [B, L] -> rotated q, k and v, each [B, L, H, dk].  rope: the (cos, sin)
    tables of the positions (`ops.rope.rope_tables`) [B|1, L, dk/2] or [L, dk/2], computed once for
    every layer (positions are then not read)."""
    B, L, _ = x.shape
    split = lambda t: t.reshape(B, L, cfg.num_heads, cfg.head_dim)
    if "wqkv" in lp:   # fused [D, 3D] projection (`params.fuse_projections`)
        q, k, v = (split(t) for t in jnp.split(linear(lp["wqkv"], x, kernels), 3, axis=-1))
    else:
        q, k, v = (split(linear(lp[n], x, kernels)) for n in ("wq", "wk", "wv"))
    q = apply_rope(q, positions, cfg.rope_theta, cfg.reference_rope, tables=rope)
    k = apply_rope(k, positions, cfg.rope_theta, cfg.reference_rope, tables=rope)
    names = ("batch", "length", "heads", None)
    return constrain(q, names), constrain(k, names), constrain(v, names)


def metric_A(cfg: PLDRConfig, lp: dict, q: jax.Array, token_mask: jax.Array | None,
             kernels: str = "xla") -> jax.Array:
    """The learned metric tensor A [B, H, dk, dk] from rotated queries q [B, L, H, dk]; token_mask
    [B, L] (False = left out of A) or None (every position, as the reference)."""
    A = constrain(metric_tensor(q, token_mask), ("batch", "heads", None, None))
    return constrain(metric_learner(lp["metric_norm"], lp["metric_res"], A, cfg.layer_norm_eps, kernels),
                     ("batch", "heads", None, None))


def deduce(lp: dict, A: jax.Array) -> dict:
    """A [B, H, dk, dk] -> {"A", "A_LM", "A_P", "G_LM"} (float32)."""
    A_LM, A_P, G_LM = derive_g(lp["plga"], A)
    return {"A": A, "A_LM": A_LM, "A_P": A_P, "G_LM": G_LM}


def _attention_by_head_groups(q, k, v, g_lm, mask):
    """`plga_attention`; with the heads split over a mesh axis (`partitioning.split_size("heads")`
    = t > 1, dividing H) as t groups of H / t whole heads, one group per shard: `plga_attention`
    merges the batch and head axes into one, and GSPMD then gathers the heads onto every chip.
    Without a split (any CPU run): `plga_attention` itself."""
    B, L, H, dk = q.shape
    t = split_size("heads")
    if t <= 1 or H % t:
        return plga_attention(q, k, v, g_lm, mask)
    grouped = lambda x: constrain(jnp.moveaxis(x.reshape(*x.shape[:2], t, H // t, dk), 2, 0),
                                  ("heads", "batch", "length", None, None))          # [t, B, L, H/t, dk]
    g = None if g_lm is None else constrain(
        jnp.moveaxis(g_lm.reshape(g_lm.shape[0], t, H // t, dk, dk), 1, 0), ("heads", "batch", None, None, None))
    out = jax.vmap(plga_attention, in_axes=(0, 0, 0, None if g is None else 0, None))(
        grouped(q), grouped(k), grouped(v), g, mask)                                 # [t, B, L, H/t, dk]
    return jnp.moveaxis(out, 0, 2).reshape(B, L, H, dk)


def attention_in_query_blocks(q: jax.Array, k: jax.Array, v: jax.Array, g_lm, mask, block: int = 0) -> jax.Array:
    """`plga_attention(q, k, v, g_lm, mask)` computed `block` queries at a time (the same values).

    q [B, Lq, H, dk]; k, v [B, Lk, H, dk]; g_lm [B|1, H, dk, dk] or None; mask [B, 1, Lq, Lk] bool
    or None -> [B, Lq, H, dk].  A `lax.map` over query blocks whose body is rematerialised, so
    neither pass holds more than one [B * H, block, Lk] block of float32 logits / probabilities
    instead of B * H * Lq * Lk of them (`pldr_jax.backend` ``attention_block``).  block 0,
    block >= Lq or a block that does not divide Lq: all queries at once (`plga_attention` itself).
    """
    B, Lq, H, dk = q.shape
    if block <= 0 or block >= Lq or Lq % block:
        return _attention_by_head_groups(q, k, v, g_lm, mask)
    n = Lq // block
    names = ("batch", "length", "heads", None)
    qs = jnp.swapaxes(q.reshape(B, n, block, H, dk), 0, 1)                          # [n, B, block, H, dk]
    ms = None if mask is None else jnp.moveaxis(
        mask.reshape(mask.shape[0], 1, n, block, mask.shape[-1]), 2, 0)           # [n, B, 1, block, Lk]

    def one(qm):
        qb, mb = qm
        return constrain(_attention_by_head_groups(constrain(qb, names), k, v, g_lm, mb), names)

    out = jax.lax.map(jax.checkpoint(one), (qs, ms))                               # [n, B, block, H, dk]
    return jnp.swapaxes(out, 0, 1).reshape(B, Lq, H, dk)


def mix(cfg: PLDRConfig, lp: dict, x: jax.Array, att: jax.Array, kernels: str = "xla") -> jax.Array:
    """The attention output att [B, L, H, dk] projected and added to x [B, L, D], then the post-LN
    residual blocks: LN(h + GLU(h)), h = LN(x + att W_o).  Returns [B, L, D]."""
    B, L, D = x.shape
    act = ("batch", "length", "act_embed")
    att = constrain(att, ("batch", "length", "heads", None)).reshape(B, L, D)
    h = constrain(layer_norm(lp["norm1"], x + linear(lp["dense"], att, kernels), cfg.layer_norm_eps), act)
    return constrain(layer_norm(lp["norm2"], h + glu(lp["ffn"], h, kernels), cfg.layer_norm_eps), act)


def decoder_layer(cfg: PLDRConfig, lp: dict, x: jax.Array, rope: tuple[jax.Array, jax.Array],
                  attention: Attention, *, g_lm: jax.Array | None = None, metric_mask: jax.Array | None = None,
                  kernels: str = "xla"):
    """One decoder layer (the module docstring's equations).

    x [B, L, D] the layer input; rope: the (cos, sin) RoPE tables of its positions
    (`ops.rope.rope_tables`); attention: how the queries attend (`SequenceAttention(mask)` for a
    whole sequence, or a decoding strategy).  g_lm [B|1, H, dk, dk]: G_LM given (the metric learner
    is skipped); None: A from this call's queries, with metric_mask [B, L] bool (False = left out of
    A) or None (every position, as the reference).  kernels: the matmul implementation.

    Returns (out [B, Lq, D] (Lq: the positions `attention.queries` keeps), the deductive outputs
    {"A", "A_LM", "A_P", "G_LM"} float32 [B, H, dk, dk] (only "G_LM" with a given G), the keys and
    values attended over (the attention's: [B, L, H, dk], or the KV-cache buffers)).
    """
    q, k, v = project_qkv(cfg, lp, x, None, kernels, rope)
    if g_lm is None:
        ded = deduce(lp, metric_A(cfg, lp, q, metric_mask, kernels))
    else:
        ded = {"G_LM": g_lm.astype(jnp.float32)}
    x, q = attention.queries(x, q)
    att, kv = attention(q, k, v, ded["G_LM"])
    return mix(cfg, lp, x, att, kernels), ded, kv
