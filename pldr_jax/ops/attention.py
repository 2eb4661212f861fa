"""Power-law graph attention as fused scaled dot-product attention on the query q @ G_LM."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def causal_padding_mask(key_valid: jax.Array, q_len: int, q_offset: jax.Array | int = 0) -> jax.Array:
    """Boolean attention mask [B, 1, Lq, Lk] (True = may attend).

    key_valid [B, Lk] (False for padding keys); query i sits at absolute position q_offset + i and
    sees keys at positions <= its own.  q_offset: int or [B] int.
    """
    Lk = key_valid.shape[-1]
    q_pos = jnp.asarray(q_offset).reshape(-1, 1) + jnp.arange(q_len)[None, :]      # [B|1, Lq]
    causal = jnp.arange(Lk)[None, None, :] <= q_pos[:, :, None]                    # [B|1, Lq, Lk]
    return (causal & key_valid[:, None, :].astype(bool))[:, None]


def _heads_first(t: jax.Array) -> jax.Array:
    """[B, L, H, dk] -> [B * H, L, dk]."""
    B, L, H, dk = t.shape
    return jnp.transpose(t, (0, 2, 1, 3)).reshape(B * H, L, dk)


def _bmm(a: jax.Array, b: jax.Array, contract_b: int, out_dtype) -> jax.Array:
    """Batched matmul over a leading axis: a [N, m, k] with b [N, k, n] (contract_b=1) or [N, n, k]
    (contract_b=2) -> [N, m, n] accumulated in out_dtype (bf16 inputs: f32 accumulation)."""
    precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if a.dtype == jnp.bfloat16 else None
    dims = (((2,), (contract_b,)), ((0,), (0,)))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=out_dtype)


def plga_attention(q: jax.Array, k: jax.Array, v: jax.Array, g_lm: jax.Array | None,
                   mask: jax.Array | None, *, heads_first: bool = False,
                   new_kv: tuple[jax.Array, jax.Array] | None = None, merged_heads: bool = True) -> jax.Array:
    """softmax((q G_LM) k^T / sqrt(dk) + mask) v.

    q [B, Lq, H, dk], k/v [B, Lk, H, dk] (or [B, H, Lk, dk] with `heads_first`, the decode cache's
    layout: read without a transposed copy), g_lm [B|1, H, dk, dk] or None (identity = SDPA),
    mask [B, 1, Lq, Lk] bool or None.  Returns [B, Lq, H, dk] in q's dtype.

    new_kv: (k, v) [B, 1, H, dk] of a one-token step's own token (Lq == 1), attended over besides
    k/v: the decode step reads the cache as it was *before* this step's write, so the write and
    the attention do not depend on each other (a TPU then updates the buffer in place in HBM
    instead of staging it on chip and writing the whole buffer back: experiments/README.md, "TPU
    decode bytes").  Same terms as attending over the written buffer.

    merged_heads: False (with `heads_first`) runs the products over two batch axes [B, H] instead of
    one merged [B * H] axis (`pldr_jax.backend` ``decode_merged_heads``: accelerators, where a
    head-sharded cache then stays sharded); the same products.

    k/v may be stored wider than q (a float32 cache holding a 16-bit model's keys and values,
    `pldr_jax.backend` ``kv_cache_dtype``): the products are then the same (16-bit values are exact
    in float32, accumulation is float32 either way) and the probabilities are still rounded to q's
    dtype before the product with v.

    The math of ``jax.nn.dot_product_attention``'s XLA path (logits and softmax in float32, masked
    logits at -0.7 x the float32 maximum, probabilities cast to v's dtype), written as batched matmuls over
    one leading [B * H] axis: XLA:CPU runs ``dot_general`` with two batch axes ([B, H]) as many
    small products, which made attention (and the q @ G_LM product) cost 5-50x more than its flops
    from batch 8 up -- half of a batched decode step (experiments/README.md, "Decode speed").
    """
    B, Lq, H, dk = q.shape
    if heads_first and not merged_heads:
        return _attention_over_head_axes(q, k, v, g_lm, mask, new_kv)
    Lk = k.shape[2] if heads_first else k.shape[1]
    flat = (lambda t: t.reshape(B * H, Lk, dk)) if heads_first else _heads_first
    qh = _heads_first(q)                                                       # [BH, Lq, dk]
    if g_lm is not None:
        g = jnp.broadcast_to(g_lm.astype(jnp.float32), (B, H, dk, dk)).reshape(B * H, dk, dk)
        qh = _bmm(qh.astype(jnp.float32), g, 1, jnp.float32).astype(q.dtype)
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = _bmm(qh.astype(k.dtype), flat(k), 2, logits_dtype) * jnp.array(1.0 / math.sqrt(dk), logits_dtype)
    if mask is not None:
        m = jnp.broadcast_to(mask, (B, H, Lq, Lk)).reshape(B * H, Lq, Lk)
        logits = jnp.where(m, logits, jnp.asarray(-0.7 * float(jnp.finfo(jnp.float32).max), logits_dtype))
    if new_kv is not None:                                                     # + the own token's key
        kn = _heads_first(new_kv[0]).astype(logits_dtype)                      # [BH, 1, dk]
        own = jnp.sum(qh.astype(logits_dtype) * kn, axis=-1, keepdims=True) * jnp.array(
            1.0 / math.sqrt(dk), logits_dtype)                                 # [BH, 1, 1]
        logits = jnp.concatenate([logits, own], axis=-1)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype).astype(v.dtype)
    if new_kv is not None:
        probs, p_own = probs[..., :Lk], probs[..., Lk:]
    out = _bmm(probs, flat(v), 1, v.dtype)                                     # [BH, Lq, dk]
    if new_kv is not None:
        out = out + p_own * _heads_first(new_kv[1]).astype(v.dtype)
    return jnp.transpose(out.reshape(B, H, Lq, dk), (0, 2, 1, 3)).astype(q.dtype)


def _attention_over_head_axes(q, k, v, g_lm, mask, new_kv):
    """`plga_attention` with `heads_first` k/v [B, H, Lk, dk], as products over two batch axes
    [B, H] (no merged [B * H] axis; same maths, the same dtypes and masking constant)."""
    B, Lq, H, dk = q.shape
    Lk = k.shape[2]
    f32 = jnp.float32
    dot = lambda a, b, contract, out: lax.dot_general(
        a, b, (((3,), (contract,)), ((0, 1), (0, 1))), preferred_element_type=out,
        precision=lax.DotAlgorithmPreset.BF16_BF16_F32 if a.dtype == jnp.bfloat16 else None)
    qh = jnp.swapaxes(q, 1, 2)                                                 # [B, H, Lq, dk]
    if g_lm is not None:
        g = jnp.broadcast_to(g_lm.astype(f32), (B, H, dk, dk))
        qh = dot(qh.astype(f32), g, 2, f32).astype(q.dtype)
    logits_dtype = jnp.promote_types(q.dtype, f32)
    scale = jnp.array(1.0 / math.sqrt(dk), logits_dtype)
    logits = dot(qh.astype(k.dtype), k, 3, logits_dtype) * scale              # [B, H, Lq, Lk]
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(-0.7 * float(jnp.finfo(f32).max), logits_dtype))
    if new_kv is not None:
        kn = jnp.swapaxes(new_kv[0], 1, 2).astype(logits_dtype)               # [B, H, 1, dk]
        logits = jnp.concatenate([logits, jnp.sum(qh.astype(logits_dtype) * kn, -1, keepdims=True) * scale], -1)
    probs = jax.nn.softmax(logits.astype(f32), axis=-1).astype(q.dtype).astype(v.dtype)
    out = dot(probs[..., :Lk], v, 2, v.dtype)                                  # [B, H, Lq, dk]
    if new_kv is not None:
        out = out + probs[..., Lk:] * jnp.swapaxes(new_kv[1], 1, 2).astype(v.dtype)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
