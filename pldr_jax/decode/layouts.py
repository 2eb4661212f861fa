"""The decode weight layouts: linear layers stored transposed or in native-matmul panels.

Each is a `pldr_jax.ops.layers.LinearLayout` (a pytree), so `ops.layers.linear` dispatches to it
and the core knows neither (`prepare_params` chooses them, `pldr_jax.backend`):

* `TransposedLinear`: the kernel as [out, in] (``decode_transposed``: XLA:CPU's float32
  matrix-vector product is faster contracting the weight's last axis);
* `PackedLinear`: the kernel as [ceil(out / 16), in, 16] panels multiplied by the native kernel
  `pldr_jax.kernels.packed_matmul` (``decode_matmul`` = "packed": float32 decoding on CPU; the same
  terms, the sum grouped differently).

Decode weights only: never differentiated.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ..ops.layers import LinearLayout

__all__ = ["TransposedLinear", "PackedLinear", "transpose_linear", "pack_linear"]


@flax.struct.dataclass
class TransposedLinear(LinearLayout):
    """kernel_t [out, in], bias [out]: ``x @ kernel_t.T + bias`` in x's dtype (float32 accumulation for
    16-bit x)."""
    kernel_t: jax.Array
    bias: jax.Array

    def apply(self, x):
        low = jnp.dtype(x.dtype).itemsize < 4
        y = jax.lax.dot_general(x, self.kernel_t.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32 if low else None).astype(x.dtype)
        return y + self.bias.astype(x.dtype)


@flax.struct.dataclass
class PackedLinear(LinearLayout):
    """kernel_p [ceil(out / 16), in, 16] panels (`pldr_jax.kernels.pack_kernel`), bias [out]: the
    native packed matmul."""
    kernel_p: jax.Array
    bias: jax.Array

    def apply(self, x):
        from ..kernels.packed_matmul import packed_matmul
        return packed_matmul(x, self.kernel_p, self.bias)


def transpose_linear(p):
    """{"kernel" [in, out], "bias"} -> `TransposedLinear`; anything else as it is."""
    if not isinstance(p, dict) or "kernel" not in p:
        return p
    return TransposedLinear(kernel_t=jnp.asarray(p["kernel"]).T, bias=p["bias"])


def pack_linear(p):
    """{"kernel" [in, out], "bias"} -> `PackedLinear`; anything else as it is."""
    if not isinstance(p, dict) or "kernel" not in p:
        return p
    from ..kernels.packed_matmul import pack_kernel
    return PackedLinear(kernel_p=pack_kernel(p["kernel"]), bias=p["bias"])
