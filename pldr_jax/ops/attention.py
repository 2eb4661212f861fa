"""Power-law graph attention as fused scaled dot-product attention on the query q @ G_LM."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def causal_padding_mask(key_valid: jax.Array, q_len: int, q_offset: jax.Array | int = 0) -> jax.Array:
    """Boolean attention mask [B, 1, Lq, Lk] (True = may attend).

    key_valid [B, Lk] (False for padding keys); query i sits at absolute position q_offset + i and
    sees keys at positions <= its own.  q_offset: int or [B] int.
    """
    Lk = key_valid.shape[-1]
    q_pos = jnp.asarray(q_offset).reshape(-1, 1) + jnp.arange(q_len)[None, :]      # [B|1, Lq]
    causal = jnp.arange(Lk)[None, None, :] <= q_pos[:, :, None]                    # [B|1, Lq, Lk]
    return (causal & key_valid[:, None, :].astype(bool))[:, None]


def plga_attention(q: jax.Array, k: jax.Array, v: jax.Array, g_lm: jax.Array | None,
                   mask: jax.Array | None) -> jax.Array:
    """softmax((q G_LM) k^T / sqrt(dk) + mask) v.

    q [B, Lq, H, dk], k/v [B, Lk, H, dk], g_lm [B|1, H, dk, dk] or None (identity = SDPA),
    mask [B, 1, Lq, Lk] bool or None.  Returns [B, Lq, H, dk] in q's dtype.
    """
    dk = q.shape[-1]
    if g_lm is not None:
        q = jnp.einsum("blhd,bhde->blhe", q.astype(jnp.float32), g_lm.astype(jnp.float32)).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(dk))
