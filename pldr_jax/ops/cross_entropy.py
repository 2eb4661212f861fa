"""The output head fused with the cross-entropy: per-token loss without a logits round trip.

`head_cross_entropy(x, kernel, bias, targets)` equals ``logsumexp(l) - l[target]`` with
``l = x @ kernel + bias`` (float32 logits, also for a bfloat16 x).  Two implementations
(``kernels``, `pldr_jax.backend`):

* "cpu": a custom backward pass writes the logits' gradient ``softmax(l) - onehot(target)`` once,
  in x's dtype, then runs the two gradient matmuls one after the other in their fast forms and sums
  the bias gradient with a matrix-vector product (XLA:CPU's column sum of a [tokens, 32000] array
  is ~30x slower).
* "xla": plain JAX over chunks of tokens (`chunk_tokens`): a `lax.scan` over [chunk, V] logits
  blocks, each rematerialised in the backward pass, so no more than one chunk of the float32
  [tokens, V] logits exists at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..partitioning import constrain, split_size
from .layers import affine_f32, input_grad_then_weight_grad

__all__ = ["head_cross_entropy"]


@jax.custom_vjp
def _head_ce_2d(x2, kernel, bias, targets):
    return _head_ce_fwd(x2, kernel, bias, targets)[0]


def _head_ce_fwd(x2, kernel, bias, targets):
    logits = affine_f32(x2, kernel, bias)                                     # [T, V] float32
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
    tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return (lse - tgt, (tgt >= top).astype(jnp.float32)), (x2, kernel, bias, logits, lse, targets)


def _head_ce_bwd(res, cotangents):
    x2, kernel, bias, logits, lse, targets = res
    g_nll = cotangents[0]                       # `correct` is a step function: no gradient
    p = jnp.exp(logits - lse[:, None])
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
    g = jnp.where(hit, p - 1.0, p) * g_nll[:, None]                             # [T, V] float32
    db = jnp.matmul(jnp.ones((1, g.shape[0]), jnp.float32), g)[0]
    dx, dw = input_grad_then_weight_grad(x2, g.astype(x2.dtype), kernel.astype(x2.dtype))
    return dx.astype(x2.dtype), dw.astype(kernel.dtype), db.astype(bias.dtype), None


_head_ce_2d.defvjp(_head_ce_fwd, _head_ce_bwd)


def _head_ce_plain(x2, kernel, bias, targets):
    """Per-token (nll, correct) of x2 [T, D] by plain JAX (differentiable, forward mode too).
    Under a mesh the tokens (batch-major) stay sharded like the batch, the vocabulary over "tensor"."""
    logits = constrain(affine_f32(x2, kernel, bias), ("batch", "vocab"))
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
    tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return lse - tgt, jax.lax.stop_gradient((tgt >= top).astype(jnp.float32))


def _head_ce_chunked(x3, kernel, bias, targets, chunk):
    """`_head_ce_plain` over `chunk`-position blocks of the sequence axis: x3 [B, S, D], targets
    [B, S] (S divisible by chunk).  A scan over the blocks (the batch axis, and its sharding, kept
    whole) whose body is rematerialised, so the backward pass too holds one [B, chunk, V] block."""
    B, S, D = x3.shape
    n = S // chunk
    # the weights in the compute dtype, gathered whole once (under a mesh), not once per chunk
    kernel = constrain(kernel.astype(x3.dtype), (None, None))

    def one(xt):
        nll, correct = _head_ce_plain(xt[0].reshape(B * chunk, D), kernel, bias, xt[1].reshape(B * chunk))
        return nll.reshape(B, chunk), correct.reshape(B, chunk)

    body = jax.checkpoint(one)
    xs = (jnp.swapaxes(x3.reshape(B, n, chunk, D), 0, 1), jnp.swapaxes(targets.reshape(B, n, chunk), 0, 1))
    _, (nll, correct) = jax.lax.scan(lambda c, xt: (c, body(xt)), None, xs)
    return jnp.swapaxes(nll, 0, 1).reshape(B, S), jnp.swapaxes(correct, 0, 1).reshape(B, S)


def _pick_chunk(S: int, row_bytes: int, max_chunk_bytes: int) -> int:
    """The largest divisor of S with chunk * row_bytes <= max_chunk_bytes (at least 1)."""
    limit = max(1, max_chunk_bytes // max(row_bytes, 1))
    return max(d for d in range(1, S + 1) if S % d == 0 and (d <= limit or d == 1))


def _local_rows(B: int) -> int:
    """The rows of a [B, ...] batch one device holds under the mesh being traced (B without one)."""
    n = split_size("batch")
    return B // n if n > 1 and B % n == 0 else B


def head_cross_entropy(x: jax.Array, kernel: jax.Array, bias: jax.Array, targets: jax.Array,
                       kernels: str = "xla", max_chunk_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy of the output head.

    x [..., D] (compute dtype), kernel [D, V], bias [V] (float32 master weights, cast to x's dtype
    for the matmul), targets [...] int.  Returns (nll [...] float32 = logsumexp(logits) -
    logits[target], correct [...] float32 = 1 where the target's logit is the largest; `argmax ==
    target` except on exact ties, and ~15x cheaper than argmax on XLA:CPU).  Differentiable in x,
    kernel and bias through nll.
    kernels: "xla" (plain JAX, any backend) or "cpu" (the custom backward).  max_chunk_bytes ("xla"
    only, x [B, S, D]): the float32 logits are computed over chunks of the sequence axis, the chunk
    the largest divisor of S whose [B, chunk, V] block is at most this many bytes *per device*: the
    rows a device holds, B / `partitioning.split_size("batch")` under the mesh being traced (None:
    all at once).  The batch axis, and its sharding, stay whole.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    t2 = targets.reshape(-1).astype(jnp.int32)
    V = kernel.shape[-1]
    if kernels == "cpu":
        nll, correct = _head_ce_2d(x2, kernel, bias, t2)
    elif max_chunk_bytes is None or x.ndim != 3 or _local_rows(x.shape[0]) * x.shape[1] * V * 4 <= max_chunk_bytes:
        nll, correct = _head_ce_plain(x2, kernel, bias, t2)
    else:
        B, S, _ = x.shape
        chunk = _pick_chunk(S, _local_rows(B) * V * 4, max_chunk_bytes)
        nll, correct = _head_ce_chunked(x, kernel, bias, targets.astype(jnp.int32), chunk)
    return nll.reshape(lead), correct.reshape(lead)
