"""Rotary position embeddings in both pairings.

* interleaved (reference / torchtune, v51): elements (2i, 2i+1) rotate by pos * theta^(-2i/dk);
* NeoX rotate-half (v52 HF checkpoints): elements (i, i + dk/2) rotate by the same angles.
Angles and the rotation are computed in float32.  The cos / sin tables (`rope_tables`) can be
computed once and passed to every `apply_rope` of a pass (`tables=`): XLA fuses the table's cos and
sin into each rotation and recomputes them per element (per head, for q and k, in every layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, dk: int, theta: float) -> jax.Array:
    """positions [..., L] int -> angles [..., L, dk/2] float32 (pos * theta^(-2i/dk))."""
    inv = 1.0 / (theta ** (jnp.arange(0, dk, 2, dtype=jnp.float32)[: dk // 2] / dk))
    return positions.astype(jnp.float32)[..., None] * inv


def rope_tables(positions: jax.Array, dk: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions [B, L] (or [L]) int -> (cos, sin) of the angles, each [B, L, dk/2] (or [L, dk/2])
    float32: what `apply_rope` computes from positions, for its ``tables=`` argument."""
    ang = rope_angles(positions, dk, theta)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, positions: jax.Array | None, theta: float, interleaved: bool = True, *,
               tables: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Rotate x [B, L, H, dk] at positions [B, L] (or [L]); returns x's dtype.  tables: the
    `rope_tables` (cos, sin) of those positions, computed once by the caller (the same values;
    positions are then not read)."""
    dk = x.shape[-1]
    if tables is None and positions is None:
        raise ValueError("apply_rope needs positions or tables (the rope_tables of the positions)")
    cos, sin = rope_tables(positions, dk, theta) if tables is None else tables   # [B|1, L, dk/2] or [L, dk/2]
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos = cos[:, :, None, :]                           # [B, L, 1, dk/2]
    sin = sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).reshape(xf.shape)
    else:
        h = dk // 2
        x0, x1 = xf[..., :h], xf[..., h:]
        out = jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.astype(x.dtype)
