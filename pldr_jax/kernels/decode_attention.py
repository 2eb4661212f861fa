"""The CPU decode step's cache write + attention as one native kernel (``decode_attention.cc``).

`decode_attention_update` is `pldr_jax.layer.decoder_layer`'s per-row KV write
(``buf.at[rows, :, positions].set(...)``) followed by `pldr_jax.ops.attention.plga_attention` over
the written buffers, for a one-token step on XLA:CPU (`pldr_jax.backend` ``decode_attention``
= "native").  The same terms: q @ G_LM in float32 (rounded to q's dtype), logits in float32 scaled
by 1/sqrt(dk), masked logits at -0.7 x the float32 maximum, softmax in float32, probabilities
rounded to q's dtype, products with V accumulated in float32; the sums are grouped differently
(float32: equal to ~1e-6).  What it changes is the memory traffic:

* the KV buffers are updated in place (the custom call's outputs alias its inputs);
* a masked slot (beyond a row's length, a shorter prompt's padding) is never read;
* 16-bit buffers are read as they are: XLA:CPU converted a whole bfloat16 buffer to float32 and
  back around every scatter and batched dot (why `backend.kv_cache_dtype` kept a 16-bit model's
  cache in float32 on CPU before this kernel);
* the (row, head) pairs run on XLA's intra-op thread pool.

Not differentiable and not batchable (`jax.vmap`): it is a decode step's, selected by
`pldr_jax.backend` for unsharded CPU decoding only; everything else uses the `jax.lax` path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .build import load

__all__ = ["decode_attention_available", "decode_attention_update", "KERNEL_DTYPES"]

#: compute / cache dtypes the kernel handles
KERNEL_DTYPES = ("float32", "bfloat16")


def decode_attention_available() -> bool:
    """Whether the kernel is built and registered in this process (builds it on first call)."""
    return load("decode_attention").available


def decode_attention_update(q: jax.Array, g_lm: jax.Array, k_new: jax.Array, v_new: jax.Array,
                            positions: jax.Array, k_buf: jax.Array, v_buf: jax.Array, mask: jax.Array,
                            *, threads: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write a one-token step's keys and values into the KV-cache and attend over it.

    q [B, 1, H, dk] (float32 or bfloat16: the compute dtype; the query before G_LM);
    g_lm [B|1, H, dk, dk]; k_new, v_new [B, 1, H, dk] (this step's rotated key and value);
    positions [B] int (row b's slot; a slot outside [0, S) writes nothing); k_buf, v_buf
    [B, H, S, dk] float32 or bfloat16 (both the same); mask [B, 1, 1, S] or [B, S] bool (True = may
    attend; must admit each row's own slot).  threads: worker count (0 = XLA's intra-op pool size).

    Returns (attention output [B, 1, H, dk] in q's dtype, k_buf, v_buf updated).
    """
    status = load("decode_attention")
    if not status.available:
        raise RuntimeError(f"the native decode attention kernel is unavailable: {status.reason}")
    B, Lq, H, dk = q.shape
    if Lq != 1:
        raise ValueError(f"decode_attention_update is for one-token steps; q has {Lq} positions")
    if q.dtype.name not in KERNEL_DTYPES or k_buf.dtype.name not in KERNEL_DTYPES:
        raise ValueError(f"decode_attention_update handles {KERNEL_DTYPES}; got q {q.dtype}, cache {k_buf.dtype}")
    if k_buf.shape != v_buf.shape or k_buf.dtype != v_buf.dtype or k_buf.shape[:2] != (B, H) or k_buf.shape[3] != dk:
        raise ValueError(f"KV buffers {k_buf.shape} {k_buf.dtype} / {v_buf.shape} {v_buf.dtype} do not match "
                         f"q {q.shape}: expected [B, H, S, dk] = [{B}, {H}, S, {dk}], one dtype")
    S = k_buf.shape[2]
    f32 = jnp.float32
    g = g_lm.astype(f32)
    if g.shape[0] not in (1, B) or g.shape[1:] != (H, dk, dk):
        raise ValueError(f"g_lm {g_lm.shape}: expected [1 or {B}, {H}, {dk}, {dk}]")
    call = jax.ffi.ffi_call(
        "pldr_decode_attention",
        (jax.ShapeDtypeStruct((B, H, dk), f32), jax.ShapeDtypeStruct(k_buf.shape, k_buf.dtype),
         jax.ShapeDtypeStruct(v_buf.shape, v_buf.dtype)),
        input_output_aliases={6: 1, 7: 2})
    out, k_buf, v_buf = call(
        q[:, 0].astype(f32), g, k_new[:, 0].astype(k_buf.dtype), v_new[:, 0].astype(v_buf.dtype),
        positions.astype(jnp.int32).reshape(B), mask.reshape(B, S).astype(bool), k_buf, v_buf,
        scale=np.float32(1.0 / math.sqrt(dk)), round_bf16=q.dtype == jnp.bfloat16, threads=np.int64(threads))
    return out[:, None].astype(q.dtype), k_buf, v_buf
