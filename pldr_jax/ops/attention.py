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


def _bmm(a: jax.Array, b: jax.Array, contract_b: int, out_dtype, merged: bool) -> jax.Array:
    """Per-(row, head) matmuls: a [B, H, m, k] with b [B, H, k, n] (contract_b=2) or [B, H, n, k]
    (contract_b=3) -> [B, H, m, n] accumulated in out_dtype (bf16 inputs: f32 accumulation), over one
    merged [B * H] batch axis (a bitcast reshape; `merged`) or two batch axes [B, H]."""
    precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if a.dtype == jnp.bfloat16 else None
    if not merged:
        dims = (((3,), (contract_b,)), ((0, 1), (0, 1)))
        return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=out_dtype)
    B, H = a.shape[:2]
    dims = (((2,), (contract_b - 1,)), ((0,), (0,)))
    out = lax.dot_general(a.reshape(B * H, *a.shape[2:]), b.reshape(B * H, *b.shape[2:]), dims,
                          precision=precision, preferred_element_type=out_dtype)
    return out.reshape(B, H, *out.shape[1:])


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)   # masked logits (jax.nn.dot_product_attention's)


def plga_attention(q: jax.Array, k: jax.Array, v: jax.Array, g_lm: jax.Array | None,
                   mask: jax.Array | None, *, heads_first: bool = False,
                   new_kv: tuple[jax.Array, jax.Array] | None = None, merged_heads: bool = True,
                   live_len: jax.Array | None = None, kv_chunk: int = 0) -> jax.Array:
    """softmax((q G_LM) k^T / sqrt(dk) + mask) v.

    q [B, Lq, H, dk], k/v [B, Lk, H, dk] (or [B, H, Lk, dk] with `heads_first`, the decode cache's
    layout: read without a transposed copy), g_lm [B|1, H, dk, dk] or None (identity = SDPA),
    mask [B, 1, Lq, Lk] bool or None.  Returns [B, Lq, H, dk] in q's dtype.

    new_kv: (k, v) [B, 1, H, dk] of a one-token step's own token (Lq == 1), attended over besides
    k/v: the decode step reads the cache as it was *before* this step's write, so the write and
    the attention do not depend on each other (a TPU then updates the buffer in place in HBM
    instead of staging it on chip and writing the whole buffer back: experiments/README.md, "TPU
    decode bytes").  Same terms as attending over the written buffer.

    merged_heads: the products run over one merged [B * H] batch axis (default) or, False, over two
    batch axes [B, H] (`pldr_jax.backend` ``decode_merged_heads``: accelerators' decode step, where
    a head-sharded cache then stays sharded); the same products.  XLA:CPU runs ``dot_general`` with
    two batch axes as many small products, which made attention (and the q @ G_LM product) cost
    5-50x more than its flops from batch 8 up -- half of a batched decode step
    (experiments/README.md, "Decode speed").

    live_len, kv_chunk: a one-token step (Lq == 1, `heads_first`) over a buffer longer than
    kv_chunk > 0 reads only the cache slots below live_len ([] int32; every slot from it on is
    masked for every row: the decode step's next free slot), kv_chunk slots at a time, by a loop
    whose trip count is ceil(live_len / kv_chunk), the softmax combined across chunks online
    (running maximum and sum, float32): a step then reads the live KV-cache instead of the whole
    buffer (`pldr_jax.backend` ``decode_kv_chunk``).  The same terms as the whole-buffer softmax;
    the sums are grouped per chunk and the probabilities are rounded to q's dtype before they are
    normalised (float32: equal to ~1e-6).

    k/v may be stored wider than q (a float32 cache holding a 16-bit model's keys and values,
    `pldr_jax.backend` ``kv_cache_dtype``): the products are then the same (16-bit values are exact
    in float32, accumulation is float32 either way) and the probabilities are still rounded to q's
    dtype before the product with v.

    The math of ``jax.nn.dot_product_attention``'s XLA path (logits and softmax in float32, masked
    logits at -0.7 x the float32 maximum, probabilities cast to v's dtype).
    """
    B, Lq, H, dk = q.shape
    f32 = jnp.float32
    heads = lambda t: jnp.swapaxes(t, 1, 2)                                  # [B, L, H, dk] <-> [B, H, L, dk]
    k, v = (k, v) if heads_first else (heads(k), heads(v))                   # [B, H, Lk, dk]
    Lk = k.shape[2]
    bmm = lambda a, b, contract_b, out: _bmm(a, b, contract_b, out, merged_heads)
    qh = heads(q)                                                            # [B, H, Lq, dk]
    if g_lm is not None:
        g = jnp.broadcast_to(g_lm.astype(f32), (B, H, dk, dk))
        qh = bmm(qh.astype(f32), g, 2, f32).astype(q.dtype)
    logits_dtype = jnp.promote_types(q.dtype, f32)
    scale = jnp.array(1.0 / math.sqrt(dk), logits_dtype)
    if kv_chunk and live_len is not None and heads_first and Lq == 1 and k.shape[2] > kv_chunk:
        out = _attend_live_chunks(qh, k, v, mask, new_kv, live_len, kv_chunk, scale, bmm)
        return heads(out).astype(q.dtype)
    logits = bmm(qh.astype(k.dtype), k, 3, logits_dtype) * scale           # [B, H, Lq, Lk]
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(_MASKED, logits_dtype))
    if new_kv is not None:                                                   # + the own token's key
        own = jnp.sum(qh.astype(logits_dtype) * heads(new_kv[0]).astype(logits_dtype), -1, keepdims=True)
        logits = jnp.concatenate([logits, own * scale], axis=-1)             # [B, H, 1, Lk + 1]
    probs = jax.nn.softmax(logits.astype(f32), axis=-1).astype(q.dtype).astype(v.dtype)
    out = bmm(probs[..., :Lk], v, 2, v.dtype)                                # [B, H, Lq, dk]
    if new_kv is not None:
        out = out + probs[..., Lk:] * heads(new_kv[1]).astype(v.dtype)
    return heads(out).astype(q.dtype)


def _attend_live_chunks(qh, k, v, mask, new_kv, live_len, chunk: int, scale, bmm):
    """`plga_attention`'s one-token attention over the cache slots below live_len (plus the own
    token's new_kv, when it is not in the buffer), `chunk` slots per loop iteration with an online
    softmax.

    qh [B, H, 1, dk] (q @ G_LM, q's dtype); k, v [B, H, S, dk]; mask [B, 1, 1, S] or None;
    new_kv ([B, 1, H, dk], [B, 1, H, dk]) or None; live_len [] int32.  Every row must keep at
    least one key (its own token).  Returns [B, H, 1, dk] float32.
    The last chunk's start is clamped to S - chunk (`dynamic_slice`); slots an earlier chunk
    already covered are masked out of it.
    """
    f32 = jnp.float32
    B, H, S, dk = k.shape
    C = min(chunk, S)
    out_dt = qh.dtype
    if new_kv is not None:
        k_own, v_own = (jnp.swapaxes(t, 1, 2) for t in new_kv)               # [B, H, 1, dk]
        m = jnp.sum(qh.astype(f32) * k_own.astype(f32), -1, keepdims=True) * scale.astype(f32)  # [B, H, 1, 1]
        # the own token's probability exp(own - m) = 1, rounded as the other probabilities are
        acc = v_own.astype(v.dtype).astype(f32)                              # [B, H, 1, dk]
        total = jnp.ones_like(m)
    else:
        m = jnp.full((B, H, 1, 1), _MASKED, f32)
        acc, total = jnp.zeros((B, H, 1, dk), f32), jnp.zeros((B, H, 1, 1), f32)
    slot = jnp.arange(C)

    def body(c, carry):
        m, total, acc = carry
        start = jnp.minimum(c * C, S - C)
        kc = lax.dynamic_slice_in_dim(k, start, C, axis=2)                   # [B, H, C, dk]
        vc = lax.dynamic_slice_in_dim(v, start, C, axis=2)
        idx = start + slot
        keep = (idx >= c * C) & (idx < live_len)                              # [C]
        if mask is not None:
            keep = keep & lax.dynamic_slice_in_dim(mask, start, C, axis=3)    # [B, 1, 1, C]
        logits = bmm(qh.astype(k.dtype), kc, 3, f32) * scale.astype(f32)     # [B, H, 1, C]
        logits = jnp.where(keep, logits, _MASKED)
        m_new = jnp.maximum(m, jnp.max(logits, -1, keepdims=True))
        p = jnp.where(keep, jnp.exp(logits - m_new), 0.0)                  # (a row's all-masked chunk)
        corr = jnp.exp(m - m_new)
        total = total * corr + jnp.sum(p, -1, keepdims=True)
        pv = bmm(p.astype(out_dt).astype(v.dtype), vc, 2, f32)                # [B, H, 1, dk]
        return m_new, total, acc * corr + pv

    n = (jnp.minimum(live_len, S) + C - 1) // C
    m, total, acc = lax.fori_loop(0, n, body, (m, total, acc))
    return acc / total
