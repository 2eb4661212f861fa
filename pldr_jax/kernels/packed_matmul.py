"""The decode weights' matmul as a native XLA:CPU kernel over 16-output panels (``packed_matmul.cc``).

A decode step multiplies a few rows (the batch) by every weight matrix once per token, so its cost
is reading the weights.  XLA:CPU runs float32 products of 8-32 rows far below the memory bandwidth
those bytes allow (measured: experiments/README.md "A packed-panel matmul for the float32 decode
weights").  Here the weight is stored once, when the decode weights are prepared
(`pldr_jax.decode.prepare_params`, `pack_kernel`), as [P, K, 16] panels of 16 outputs each, so
every panel is one contiguous stream that up to 8 rows consume in one pass.

`packed_matmul` computes what `pldr_jax.ops.layers.linear` computes for its decode layout: x @ W +
bias in x's dtype, float32 accumulation (for bfloat16: the sum rounded to bfloat16, then the bias
added in bfloat16).  Each output is one float32 sum over k in order, so the values do not depend on
the thread count; they differ from XLA's dot by the grouping of the sum only (float32: ~1e-7
relative).

Not differentiable and not batchable (`jax.vmap`): `pldr_jax.backend` selects it (``decode_matmul``
= "packed") for unsharded CPU decoding only, and `prepare_params` packs only there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .build import load

__all__ = ["PANEL", "KERNEL_DTYPES", "packed_matmul_available", "pack_kernel", "unpack_kernel", "packed_matmul"]

#: outputs per panel (the kernel's vector width in float32)
PANEL = 16
#: dtypes the kernel multiplies in
KERNEL_DTYPES = ("float32", "bfloat16")


def packed_matmul_available() -> bool:
    """Whether the kernel is built and registered in this process (builds it on first call)."""
    return load("packed_matmul").available


def pack_kernel(kernel: jax.Array) -> jax.Array:
    """A linear layer's kernel [in, out] -> [ceil(out / 16), in, 16] panels (outputs past `out` zero)."""
    K, N = kernel.shape
    P = -(-N // PANEL)
    w = jnp.pad(jnp.asarray(kernel), ((0, 0), (0, P * PANEL - N)))
    return w.reshape(K, P, PANEL).transpose(1, 0, 2)


def unpack_kernel(panels: jax.Array, out_features: int) -> jax.Array:
    """`pack_kernel`'s inverse: [P, in, 16] -> [in, out_features]."""
    P, K, _ = panels.shape
    return panels.transpose(1, 0, 2).reshape(K, P * PANEL)[:, :out_features]


def packed_matmul(x: jax.Array, panels: jax.Array, bias: jax.Array, *, threads: int = 0) -> jax.Array:
    """x [..., K] @ the packed kernel `panels` [P, K, 16] + bias [N] -> [..., N] in x's dtype.

    x, panels and bias are cast to x's dtype (float32 or bfloat16).  threads: worker count (0 = XLA's
    intra-op pool size).
    """
    status = load("packed_matmul")
    if not status.available:
        raise RuntimeError(f"the native packed matmul kernel is unavailable: {status.reason}")
    dt = x.dtype
    if dt.name not in KERNEL_DTYPES:
        raise ValueError(f"packed_matmul handles {KERNEL_DTYPES}; x is {dt}")
    P, K, width = panels.shape
    N = bias.shape[-1]
    if width != PANEL or x.shape[-1] != K or bias.ndim != 1 or not (P - 1) * PANEL < N <= P * PANEL:
        raise ValueError(f"packed_matmul: x {x.shape}, panels {panels.shape}, bias {bias.shape} do not match "
                         f"(expected x [..., K], panels [ceil(N / {PANEL}), K, {PANEL}], bias [N])")
    lead = x.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    call = jax.ffi.ffi_call("pldr_packed_matmul", jax.ShapeDtypeStruct((rows, N), dt))
    y = call(x.reshape(rows, K), panels.astype(dt), bias.astype(dt), threads=np.int64(threads))
    return y.reshape(*lead, N)
