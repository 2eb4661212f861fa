"""Native XLA:CPU kernels (C++ `jax.ffi` custom calls), built by ``pldr-jax kernels build`` or on
first use, into a private directory, verified against a manifest before loading; see `build`."""

from .build import KernelStatus, load
from .decode_attention import decode_attention_available, decode_attention_update
from .packed_matmul import pack_kernel, packed_matmul, packed_matmul_available

__all__ = ["KernelStatus", "load", "decode_attention_available", "decode_attention_update", "pack_kernel",
           "packed_matmul", "packed_matmul_available"]
