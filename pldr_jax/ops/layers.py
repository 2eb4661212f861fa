"""Linear, LayerNorm and SwiGLU as pure functions over parameter dicts."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(p: dict, x: jax.Array) -> jax.Array:
    """`x @ kernel + bias`; x [..., in] -> [..., out], computed in x's dtype.

    p may hold "kernel_t" [out, in] (the transposed kernel, as decode-prepared params do: XLA:CPU's
    matrix-vector product is faster contracting the weight's last axis) instead of "kernel".
    """
    if "kernel_t" in p:
        w, dims = p["kernel_t"].astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ()))
    else:
        w, dims = p["kernel"].astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ()))
    # 16-bit inputs accumulate in float32 (as TPU/GPU matmul units do); on XLA:CPU this also selects
    # the oneDNN bf16 kernels, ~2x faster than a bf16-output matmul and than float32 (see experiments/)
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else None
    y = jax.lax.dot_general(x, w, dims, preferred_element_type=acc).astype(x.dtype)
    return y + p["bias"].astype(x.dtype)


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32; returns x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def glu(p: dict, x: jax.Array) -> jax.Array:
    """SwiGLU with biases: `w3(silu(w1 x) * w2 x)`; [..., n] -> [..., n].

    p may hold a fused "w12" (w1 and w2 concatenated on the output axis) instead of "w1", "w2".
    """
    if "w12" in p:
        h1, h2 = jnp.split(linear(p["w12"], x), 2, axis=-1)
    else:
        h1, h2 = linear(p["w1"], x), linear(p["w2"], x)
    return linear(p["w3"], jax.nn.silu(h1) * h2)
