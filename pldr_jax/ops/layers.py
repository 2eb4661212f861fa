"""Linear, LayerNorm and SwiGLU as pure functions over parameter dicts."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _rows_transposed(a: jax.Array) -> jax.Array:
    """a [M, K] -> a.T [K, M] as a real row-major copy (M divisible by 16).

    A plain ``a.T`` feeding a dot is folded by XLA into the dot's dimension numbers, and XLA:CPU then
    misses its oneDNN bf16 kernel for the weight-gradient form ``x^T @ g`` (~170 against ~360
    GFLOP/s, see experiments/README.md); transposing 16-row blocks forces the copy."""
    m, k = a.shape
    return a.reshape(m // 16, 16, k).transpose(2, 0, 1).reshape(k, m)


@jax.custom_vjp
def matmul_lowp(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for 16-bit x [..., K] and w [K, N], accumulated in float32, returned in x's dtype;
    its backward pass keeps both gradient matmuls in the fast 16-bit form (see `_rows_transposed`)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(x.dtype)


def _matmul_lowp_fwd(x, w):
    return matmul_lowp(x, w), (x, w)


def _matmul_lowp_bwd(res, g):
    x, w = res
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if x2.shape[0] % 16 == 0:
        dw = jnp.matmul(_rows_transposed(x2), g2, preferred_element_type=jnp.float32)
    else:
        dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


matmul_lowp.defvjp(_matmul_lowp_fwd, _matmul_lowp_bwd)


def linear(p: dict, x: jax.Array) -> jax.Array:
    """`x @ kernel + bias`; x [..., in] -> [..., out], computed in x's dtype.

    p may hold "kernel_t" [out, in] (the transposed kernel, as decode-prepared params do: XLA:CPU's
    matrix-vector product is faster contracting the weight's last axis) instead of "kernel".
    """
    # 16-bit inputs accumulate in float32 (as TPU/GPU matmul units do); on XLA:CPU this also selects
    # the oneDNN bf16 kernels, ~2x faster than a bf16-output matmul and than float32 (see experiments/)
    low = jnp.dtype(x.dtype).itemsize < 4
    if "kernel_t" in p:   # decode layout, never differentiated
        y = jax.lax.dot_general(x, p["kernel_t"].astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32 if low else None).astype(x.dtype)
    elif low:
        y = matmul_lowp(x, p["kernel"].astype(x.dtype))
    else:
        y = jnp.matmul(x, p["kernel"].astype(x.dtype))
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
