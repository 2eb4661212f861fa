"""Training losses: masked cross-entropy / accuracy and the DAG regulariser of deductive outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .ops.deductive import dag


def masked_loss(logits: jax.Array, targets: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Masked cross-entropy and accuracy over targets != pad_id (as the reference).

    logits [B, L, V], targets [B, L] int.  Returns (mean CE over real targets, accuracy), float32
    scalars; both are 0 when there is no real target.
    """
    logits = logits.astype(jnp.float32)
    real = (targets != pad_id).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    n = jnp.maximum(real.sum(), 1.0)
    loss = ((logz - tgt) * real).sum() / n
    acc = ((jnp.argmax(logits, -1) == targets).astype(jnp.float32) * real).sum() / n
    return loss, acc


def dag_loss(deductive: dict) -> dict:
    """DAG values {"A_LM", "A_P", "G_LM"} of deductive outputs [layers, B, H, dk, dk] (or any
    leading axes): mean over layers, batch and heads of |log(trace(expm(M * M)) / dk)|."""
    return {k: dag(deductive[k]) for k in ("A_LM", "A_P", "G_LM") if k in deductive}


def dag_total(deductive: dict, coeffs: tuple[float, float, float]) -> jax.Array:
    """c_A * dag(A_LM) + c_P * dag(A_P) + c_G * dag(G_LM); zero coefficients skip their expm."""
    total = jnp.float32(0.0)
    for c, k in zip(coeffs, ("A_LM", "A_P", "G_LM")):
        if c:
            total = total + c * dag(deductive[k])
    return total
