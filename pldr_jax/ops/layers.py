"""Linear, LayerNorm and SwiGLU as pure functions over parameter dicts.

`linear` and `glu` take ``kernels`` (`pldr_jax.backend`): "xla" = plain `dot_general` accumulating
in float32, differentiated by JAX (every backend; forward-mode autodiff works); "cpu" = `dense`, the
`custom_vjp` whose backward runs in XLA:CPU's fast forms.  The forward values are the same.
Weights in another layout than {"kernel", "bias"} are `LinearLayout` values (`linear` dispatches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..partitioning import constrain


def _rows_transposed(a: jax.Array) -> jax.Array:
    """a [M, K] -> a.T [K, M] as a real row-major copy (M divisible by 16).

    A plain ``a.T`` feeding a dot is folded by XLA into the dot's dimension numbers, and XLA:CPU then
    misses its fast bf16 kernel for the weight-gradient form ``x^T @ g`` (~150 against ~330
    GFLOP/s, see experiments/README.md); transposing 16-row blocks forces the copy."""
    m, k = a.shape
    return a.reshape(m // 16, 16, k).transpose(2, 0, 1).reshape(k, m)


def weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """``x^T @ g`` for x [M, K], g [M, N] -> [K, N] float32, in the form XLA:CPU runs fastest."""
    if jnp.dtype(x.dtype).itemsize < 4 and x.shape[0] % 16 == 0:
        return jnp.matmul(_rows_transposed(x), g, preferred_element_type=jnp.float32)
    return jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def input_grad_then_weight_grad(x2: jax.Array, g2: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(g2 @ w^T [M, K] float32, x2^T @ g2 [K, N] float32) for x2 [M, K], g2 [M, N], w [K, N].

    The two products are independent, and XLA:CPU would run them at the same time on its two-thread
    pool, each then ~2-4x slower than alone; an optimization barrier orders them."""
    dx = jax.lax.dot_general(g2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    x2, g2, dx = jax.lax.optimization_barrier((x2, g2, dx))
    return dx, weight_grad(x2, g2)


def affine_f32(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x @ w + b`` -> float32 [..., N]: the matmul in x's dtype (w cast to it) accumulated in
    float32, then the float32 bias.  x [..., K], w [K, N], b [N]."""
    y = jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y + b.astype(jnp.float32)


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x @ w + b`` for x [..., K]; w [K, N] and b [N] in any float dtype (the float32 master
    weights) are cast to x's dtype.  Accumulated in float32, returned in x's dtype.

    Backward: both gradient matmuls in their fast forms (`weight_grad`), run one after the other;
    the weight and bias gradients come back float32-accurate in w's and b's dtypes (no 16-bit
    rounding), the bias gradient summed in float32."""
    return affine_f32(x, w, b).astype(x.dtype)


def _dense_fwd(x, w, b):
    return dense(x, w, b), (x, w, b)


def _dense_bwd(res, g):
    x, w, b = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dx, dw = input_grad_then_weight_grad(x2, g2, w.astype(x.dtype))
    db = jnp.sum(g2.astype(jnp.float32), axis=0)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype), db.astype(b.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class LinearLayout:
    """Base of a linear layer's weights held in a layout other than the stored {"kernel" [in, out],
    "bias"} dict (decoding's transposed or panel-packed weights: `pldr_jax.decode.layouts`).  A
    layout is a pytree (`flax.struct.dataclass`) that computes its own ``x @ kernel + bias``:
    `linear` hands it x, so the layouts are dispatched in this one place and the core knows none of
    them."""

    def apply(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> x @ kernel + bias [..., out] in x's dtype."""
        raise NotImplementedError


def linear(p: dict | LinearLayout, x: jax.Array, kernels: str = "xla") -> jax.Array:
    """`x @ kernel + bias`; x [..., in] -> [..., out], computed in x's dtype (accumulated in
    float32 for 16-bit x).  p: {"kernel" [in, out], "bias" [out]}, or a `LinearLayout` (which
    computes it).  kernels: "xla" (plain dot_general) or "cpu" (`dense`).
    """
    if isinstance(p, LinearLayout):
        return p.apply(x)
    # 16-bit inputs accumulate in float32 (as TPU/GPU matmul units do); on XLA:CPU this also selects
    # its fast bf16 kernels (experiments/README.md "Backend choices: the measurements behind them")
    if kernels == "cpu":
        return dense(x, p["kernel"], p["bias"])
    return affine_f32(x, p["kernel"], p["bias"]).astype(x.dtype)


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32; returns x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def glu(p: dict, x: jax.Array, kernels: str = "xla") -> jax.Array:
    """SwiGLU with biases: `w3(silu(w1 x) * w2 x)`; [..., n] -> [..., n].

    p may hold a fused "w12" (w1 and w2 concatenated on the output axis) instead of "w1", "w2".
    kernels: see `linear`.
    """
    if "w12" in p:
        h1, h2 = jnp.split(linear(p["w12"], x, kernels), 2, axis=-1)
    else:
        h1, h2 = linear(p["w1"], x, kernels), linear(p["w2"], x, kernels)
    hidden = jax.nn.silu(h1) * h2
    if hidden.ndim == 3:     # [B, L, F] activations (not the metric learner's [rows, A_dff])
        hidden = constrain(hidden, ("batch", "length", "mlp"))
    return linear(p["w3"], hidden, kernels)
