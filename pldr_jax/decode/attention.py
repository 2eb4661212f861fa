"""The decoder's attention strategies (`pldr_jax.layer.Attention` values), one per decode form.

A one-token step with the KV-cache (heads-first buffers [B, H, S, dk], `decode.cache`) writes the
step's key and value into the buffers and attends over them; which write and which attention is
`pldr_jax.backend`'s choice, made once per request (`decode.plan`) and carried here as a value:

* `RowSlotsKV`: row b's key and value at its own position (an in-place scatter; CPU);
* `SharedSlotKV`: every row's at one shared slot (one ``dynamic_update_slice``; accelerators:
  ``decode_shared_kv_slot``), attending over the buffers *before* the write plus the step's own key
  and value (`ops.attention.plga_attention` new_kv), so the write and the attention do not depend on
  each other (`decode.cache` "KV slots");
* `NativeKV`: the per-row write and the attention as one native XLA:CPU kernel
  (`pldr_jax.kernels.decode_attention_update`; ``decode_attention`` = "native");
* `LastQuery`: no KV-cache: the whole sequence runs, the output only at one query row per sequence
  (the last layer of a no-KV-cache step).

`merged_heads` (one [B * H] batch axis or two, ``decode_merged_heads``) and `kv_chunk` (attend over
the live slots, this many at a time, ``decode_kv_chunk``; 0 = the whole buffer) are static fields.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ..layer import Attention, SequenceAttention, attention_in_query_blocks
from ..ops.attention import plga_attention

__all__ = ["KVWrite", "RowSlotsKV", "SharedSlotKV", "NativeKV", "LastQuery"]

_static = lambda default: flax.struct.field(pytree_node=False, default=default)


@flax.struct.dataclass
class KVWrite(Attention):
    """A one-token step over the KV-cache: k_buf, v_buf [B, H, S, dk]; mask [B, 1, 1, S] bool (True =
    may attend); where: the slots this step's keys and values go to ([B] int32 per row, or [] int32
    shared).  Returns (att, the written buffers)."""
    k_buf: jax.Array
    v_buf: jax.Array
    mask: jax.Array
    where: jax.Array
    merged_heads: bool = _static(True)
    kv_chunk: int = _static(0)


@flax.struct.dataclass
class RowSlotsKV(KVWrite):
    """Row b's key and value at slot where[b] (its own position; mask admits it), then attention over
    the written buffers."""

    def __call__(self, q, k, v, g_lm):
        rows = jnp.arange(q.shape[0])
        kb, vb = (buf.at[rows, :, self.where].set(t[:, 0].astype(buf.dtype))
                  for buf, t in ((self.k_buf, k), (self.v_buf, v)))
        live = jnp.max(self.where) + 1 if self.kv_chunk else None        # slots below the next free one
        att = plga_attention(q, kb, vb, g_lm, self.mask, heads_first=True, merged_heads=self.merged_heads,
                             live_len=live, kv_chunk=self.kv_chunk)
        return att, (kb, vb)


@flax.struct.dataclass
class SharedSlotKV(KVWrite):
    """Every row's key and value at the one slot `where` (mask excluding it: not written yet);
    attention over the buffers before the write plus the step's own key and value."""

    def __call__(self, q, k, v, g_lm):
        att = plga_attention(q, self.k_buf, self.v_buf, g_lm, self.mask, heads_first=True, new_kv=(k, v),
                             merged_heads=self.merged_heads, live_len=self.where if self.kv_chunk else None,
                             kv_chunk=self.kv_chunk)
        kb, vb = (jax.lax.dynamic_update_slice_in_dim(buf, jnp.swapaxes(t, 1, 2).astype(buf.dtype), self.where, axis=2)
                  for buf, t in ((self.k_buf, k), (self.v_buf, v)))
        return att, (kb, vb)


@flax.struct.dataclass
class NativeKV(KVWrite):
    """`RowSlotsKV`'s write and attention as the native kernel (buffers in the compute dtype, updated
    in place, masked slots not read)."""

    def __call__(self, q, k, v, g_lm):
        from ..kernels.decode_attention import decode_attention_update
        att, kb, vb = decode_attention_update(q, g_lm, k, v, self.where, self.k_buf, self.v_buf, self.mask)
        return att, (kb, vb)


@flax.struct.dataclass
class LastQuery(SequenceAttention):
    """The paper's attention over the call's own keys and values (mask [B, 1, L, L]), the output only
    at position rows[b] of row b ([B] int32): out [B, 1, D]."""
    rows: jax.Array | None = None

    def queries(self, x, q):
        r = jnp.arange(x.shape[0])
        return x[r, self.rows][:, None], q[r, self.rows][:, None]

    def __call__(self, q, k, v, g_lm):
        r = jnp.arange(q.shape[0])
        mask = self.mask[r, :, self.rows][:, :, None]                        # [B, 1, 1, L]
        return attention_in_query_blocks(q, k, v, g_lm, mask, self.block), (k, v)
