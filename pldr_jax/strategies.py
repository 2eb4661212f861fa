"""Execution strategies chosen from the backend choices (`pldr_jax.backend.BackendChoices`).

The core (`pldr_jax.layer`, `pldr_jax.model`) takes *how* to execute as values; this module maps a
resolved `BackendChoices` to them, in one place, for the entry points that start work (the train
step, `losses.loss_terms` callers):

* `attention_strategy(backend)`: the full-sequence attention, a mask-less `layer.SequenceAttention`
  (``attention_block`` queries at a time).  Fused implementations (`pldr_jax.kernels`) plug in here.
"""

from __future__ import annotations

from .backend import BackendChoices
from .layer import SequenceAttention

__all__ = ["attention_strategy"]


def attention_strategy(backend: BackendChoices, block: int | None = None) -> SequenceAttention:
    """The full-sequence attention for `backend` (block: queries per block, None = the backend's
    ``attention_block``)."""
    return SequenceAttention(block=backend.attention_block if block is None else int(block))
