"""Execution strategies chosen from the backend choices (`pldr_jax.backend.BackendChoices`).

The core (`pldr_jax.layer`, `pldr_jax.model`) takes *how* to execute as values; this module maps a
resolved `BackendChoices` to them, in one place, for the entry points that start work (the train
step, `losses.loss_terms` callers, the decode plan's prompt pass: `decode.plan`):

* `attention_strategy(backend)`: the full-sequence attention, a mask-less `layer.SequenceAttention`
  (``attention_block`` queries at a time), or a fused kernel (``attention_impl``: cuDNN, Pallas
  splash, XLA SDPA; `pldr_jax.kernels.fused_attention`).
"""

from __future__ import annotations

from .backend import BackendChoices
from .kernels.fused_attention import fused_strategy
from .layer import SequenceAttention

__all__ = ["attention_strategy"]


def attention_strategy(backend: BackendChoices, block: int | None = None,
                       impl: str | None = None) -> SequenceAttention:
    """The full-sequence attention for `backend`: a fused kernel (`kernels.fused_attention`) for its
    ``attention_impl`` (or `impl`), else the layer's own, `block` queries at a time (None = the
    backend's ``attention_block``)."""
    block = backend.attention_block if block is None else int(block)
    fused = fused_strategy(backend.attention_impl if impl is None else impl, block)
    return SequenceAttention(block=block) if fused is None else fused
