"""Linear, LayerNorm and SwiGLU as pure functions over parameter dicts."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(p: dict, x: jax.Array) -> jax.Array:
    """`x @ kernel + bias`; x [..., in] -> [..., out], computed in x's dtype."""
    return jnp.matmul(x, p["kernel"].astype(x.dtype)) + p["bias"].astype(x.dtype)


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32; returns x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def glu(p: dict, x: jax.Array) -> jax.Array:
    """SwiGLU with biases: `w3(silu(w1 x) * w2 x)`; [..., n] -> [..., n]."""
    return linear(p["w3"], jax.nn.silu(linear(p["w1"], x)) * linear(p["w2"], x))
