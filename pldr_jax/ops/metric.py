"""The metric tensor A and the residual metric learner that refines it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .layers import glu, layer_norm


def metric_tensor(q: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """Gram matrix of rotated queries summed over positions.

    q [B, L, H, dk]; token_mask [B, L] (1 = real token) or None (the reference: every position,
    future tokens and padding included).  Returns A [B, H, dk, dk] float32.
    """
    qf = q.astype(jnp.float32)
    if token_mask is not None:
        qf = qf * token_mask.astype(jnp.float32)[:, :, None, None]
    return jnp.einsum("blhd,blhe->bhde", qf, qf)


def metric_learner(p_norm: dict, p_res: dict, A: jax.Array, eps: float, kernels: str = "xla") -> jax.Array:
    """A [B, H, dk, dk] -> LayerNorm, then R residual units `A = LN_r(A + GLU_N(..GLU_1(A)))`.

    p_res leaves carry leading [R, N] (GLUs) or [R] (norms) axes.  Float32 throughout.
    kernels: see `ops.layers.linear`.
    """
    shape = A.shape
    # every op acts on the last axis: run on [rows, dk] (2-D matmuls; their backward is ~20% faster
    # on XLA:CPU than with the [B, H] batch axes kept)
    A = layer_norm(p_norm, A.astype(jnp.float32).reshape(-1, shape[-1]), eps)
    R = p_res["norm"]["scale"].shape[0]
    N = p_res["w1"]["kernel"].shape[1]
    f32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)
    for r in range(R):
        y = A
        for j in range(N):
            y = glu(f32(jax.tree_util.tree_map(lambda a: a[r, j], {k: p_res[k] for k in ("w1", "w2", "w3")})), y,
                    kernels)
        A = layer_norm(jax.tree_util.tree_map(lambda a: a[r], p_res["norm"]), A + y, eps)
    return A.reshape(shape)
