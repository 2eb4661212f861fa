"""Deductive outputs (A -> A_LM, A_P, G_LM) and the DAG regulariser, always in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def iswiglu(y: jax.Array) -> jax.Array:
    """iSwiGLU(y) = y * silu(y) (>= 0)."""
    return y * jax.nn.silu(y)


def derive_g(p_plga: dict, A: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A [B, H, dk, dk] -> (A_LM, A_P, G_LM), each [B, H, dk, dk] float32.

    A_LM = iSwiGLU(W @ A + b) + 1e-9;  A_P = A_LM ** P (elementwise);  G_LM = a @ A_P + ba,
    with per-head W, b, P, a, ba [H, dk, dk].

    A_LM > 0 (iSwiGLU(y) = y^2 sigmoid(y) >= 0, plus 1e-9), so A_LM ** P is computed as
    exp(P log A_LM): the same function (within float32 rounding, ~1e-7 relative), without the
    general power's special cases (negative bases, integer exponents), which XLA:CPU runs ~3.5x
    slower ([8, 14, 64, 64]: 2.2 against 0.6 ms; experiments/README.md "Prefill against its floor").
    """
    f = lambda k: p_plga[k].astype(jnp.float32)
    A = A.astype(jnp.float32)
    A_LM = iswiglu(jnp.einsum("hij,bhjk->bhik", f("W"), A) + f("b")) + 1e-9
    A_P = jnp.exp(f("P") * jnp.log(A_LM))
    G_LM = jnp.einsum("hij,bhjk->bhik", f("a"), A_P) + f("ba")
    return A_LM, A_P, G_LM


def dag(M: jax.Array) -> jax.Array:
    """DAG value of M [..., dk, dk]: mean over leading axes of |log(trace(expm(M * M)) / dk)|."""
    M = M.astype(jnp.float32)
    dk = M.shape[-1]
    flat = (M * M).reshape(-1, dk, dk)
    tr = jnp.trace(jax.vmap(jax.scipy.linalg.expm)(flat), axis1=-2, axis2=-1)
    return jnp.mean(jnp.abs(jnp.log(tr / dk)))
