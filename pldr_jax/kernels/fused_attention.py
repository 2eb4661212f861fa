"""Power-law graph attention on the accelerators' fused attention kernels.

Power-law graph attention is ``softmax((q G_LM) kᵀ / √dk + mask) v`` (`ops.attention.plga_attention`):
once the query is multiplied by G_LM (``q' = q G_LM``, a per-(row, head) dk x dk product in float32,
rounded to q's dtype, as `plga_attention` does), it is ordinary scaled dot-product attention, so the
platforms' fused kernels apply unchanged -- memory linear in the sequence length, no L x L logits:

* ``"cudnn"``: cuDNN's fused (flash) attention on NVIDIA GPUs, `jax.nn.dot_product_attention(...,
  implementation="cudnn")`: causal, the keys' padding as per-row key counts (right padding);
  16-bit inputs only (a float32 model runs the ``"blocks"`` path);
* ``"splash"``: Pallas splash attention on TPUs (`jax.experimental.pallas.ops.tpu.splash_attention`):
  a causal block-sparse mask (blocks above the diagonal are skipped) and the keys' padding as
  segment ids (any pattern); inside `jax.shard_map` over the batch and head axes of the mesh being
  traced (a Pallas call is not partitioned by GSPMD); ``interpret=True`` runs the same kernel on
  CPU (tests);
* ``"xla_sdpa"``: `jax.nn.dot_product_attention`'s XLA implementation (the L x L logits, as the
  ``"blocks"`` path with one block): the formulation, checked on any platform;
* ``"blocks"``: the project's own path, `layer.attention_in_query_blocks` (the fallback; chosen by
  the caller, not here).

The mask these kernels implement is the model's `ops.attention.causal_padding_mask`: causal, and
padding keys (token 0) masked for every query: `FusedAttention` takes the keys' validity
`key_valid` [B, Lk] itself (`over_tokens`; or reads it off such a mask, `key_valid_of`), so no
[B, 1, L, L] mask exists in the program.  A packed mask of another shape (`eval.shared_context`) needs the ``"blocks"``
path.  The kernels differ from `plga_attention` only for a query that sees no valid key (every
query of an all-pad row): `plga_attention` averages every value there (all logits masked alike),
the kernels attend to the row's first key (`visible_keys`) -- finite, and such positions never
reach the loss (pad targets are masked out of it).  Numerics: logits and softmax in float32
(cuDNN, splash and XLA's SDPA alike), probabilities rounded to the value dtype before the
product with v (splash: unnormalised, then divided: the same to bfloat16 rounding); the 1 / √dk
scale is folded into q' for splash (exact when dk is a power of two, as in every preset).
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..layer import SequenceAttention, attention_in_query_blocks
from ..ops.attention import causal_padding_mask

__all__ = ["FUSED", "IMPLEMENTATIONS", "FusedAttention", "fused_strategy", "check_attention_impl", "power_law_query", "key_valid_of", "visible_keys", "fused_attention", "splash_block"]

#: the fused implementations this module runs
FUSED = ("cudnn", "splash", "xla_sdpa")
#: the values of the backend choice ``attention_impl``: "blocks" (the layer's own query blocks), the
#: fused ones, and "splash_interpret" (the splash kernel in Pallas interpret mode: any platform)
IMPLEMENTATIONS = ("blocks",) + FUSED + ("splash_interpret",)


def power_law_query(q: jax.Array, g_lm: jax.Array | None, scale: float = 1.0) -> jax.Array:
    """q' = scale * q @ G_LM per (row, head): q [B, L, H, dk], g_lm [B|1, H, dk, dk] or None (the
    identity) -> [B, L, H, dk] in q's dtype (the product and the scaling in float32, then rounded,
    as `ops.attention.plga_attention` rounds q @ G_LM)."""
    if g_lm is None:
        return q if scale == 1.0 else (q.astype(jnp.float32) * np.float32(scale)).astype(q.dtype)
    B, _, H, dk = q.shape
    g = jnp.broadcast_to(g_lm.astype(jnp.float32), (B, H, dk, dk))
    qp = jnp.einsum("blhd,bhde->blhe", q.astype(jnp.float32), g, preferred_element_type=jnp.float32)
    return (qp if scale == 1.0 else qp * np.float32(scale)).astype(q.dtype)


def key_valid_of(mask: jax.Array | None) -> jax.Array | None:
    """The keys' validity [B, Lk] of a `causal_padding_mask` [B, 1, Lq, Lk] (Lq == Lk): its last
    query's row, which the causal part does not cut (None for None)."""
    if mask is None:
        return None
    if mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"fused attention takes a causal self-attention mask [B, 1, L, L], got {mask.shape}")
    return mask[:, 0, -1, :]


def visible_keys(key_valid: jax.Array) -> jax.Array:
    """key_valid [B, Lk] with the first key made visible in a row that has no valid key (an all-pad
    row), so no query's softmax is over nothing."""
    empty = ~jnp.any(key_valid, axis=-1)
    return key_valid.at[:, 0].set(key_valid[:, 0] | empty)


def _sdpa(qp, k, v, key_valid, implementation: str, padding: str):
    """`jax.nn.dot_product_attention` causal over [B, L, H, dk] inputs; the padding as a key mask
    [B, 1, 1, Lk] ("mask") or per-row key counts ("lengths": cuDNN's form, right padding)."""
    kw = {}
    if key_valid is not None:
        valid = visible_keys(key_valid)
        if padding == "lengths":
            kw["key_value_seq_lengths"] = jnp.sum(valid, axis=-1, dtype=jnp.int32)
        else:
            kw["mask"] = valid[:, None, None, :]
    return jax.nn.dot_product_attention(qp, k, v, is_causal=True, implementation=implementation, **kw)


def splash_block(length: int) -> int:
    """The splash kernel's block length for a sequence of `length` (512, 256 or 128, the largest
    dividing it); 0 when none does (the kernel needs multiples of 128)."""
    return next((b for b in (512, 256, 128) if length % b == 0), 0)


def _splash_local(qp, k, v, key_valid, interpret: bool):
    """Splash attention over one shard: qp, k, v [B, L, h, dk] (qp already scaled), key_valid [B, L]
    bool or None -> [B, L, h, dk]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    B, L, h, dk = qp.shape
    blk = splash_block(L)
    mask = sa.MultiHeadMask([sa.CausalMask((L, L)) for _ in range(h)])
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    heads = lambda t: jnp.swapaxes(t, 1, 2)                                   # [B, h, L, dk]
    if key_valid is None:
        out = jax.vmap(kernel)(heads(qp), heads(k), heads(v))
    else:
        seg = sa.SegmentIds(q=jnp.ones((B, L), jnp.int32), kv=visible_keys(key_valid).astype(jnp.int32))
        out = jax.vmap(lambda q1, k1, v1, s: kernel(q1, k1, v1, segment_ids=s))(heads(qp), heads(k), heads(v), seg)
    return heads(out)


def _splash(qp, k, v, key_valid, interpret: bool):
    """`_splash_local` inside `jax.shard_map` over the mesh being traced (batch over its "data" /
    "fsdp" axes, heads over "tensor", as the active rules of `partitioning` place them), or directly
    without a mesh."""
    from jax.sharding import PartitionSpec as P

    from ..partitioning import active_rules_key, logical_to_spec
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(dict(mesh.shape).values()) == 1:
        return _splash_local(qp, k, v, key_valid, interpret)
    sizes = dict(mesh.shape)
    key = active_rules_key()
    spec = logical_to_spec(("batch", "length", "heads", None), qp.shape, mesh, None if key is None else dict(key))
    kspec = P(spec[0], None)
    fn = lambda q1, k1, v1, kv1: _splash_local(q1, k1, v1, kv1, interpret)
    if key_valid is None:
        return jax.shard_map(lambda q1, k1, v1: fn(q1, k1, v1, None), mesh=mesh, in_specs=(spec, spec, spec),
                             out_specs=spec, check_vma=False)(qp, k, v)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, kspec), out_specs=spec,
                         check_vma=False)(qp, k, v, key_valid)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, g_lm: jax.Array | None,
                    key_valid: jax.Array | None, implementation: str, *, interpret: bool = False,
                    padding: str | None = None) -> jax.Array:
    """Causal power-law graph attention over q [B, L, H, dk], k, v [B, L, H, dk], g_lm [B|1, H, dk,
    dk] or None (identity), key_valid [B, L] bool (False = padding key) or None, by
    `implementation` in `FUSED` (see the module docstring) -> [B, L, H, dk] in q's dtype.

    interpret: run the splash kernel in Pallas interpret mode (any platform).  padding: how the
    keys' padding reaches `jax.nn.dot_product_attention` ("mask" [B, 1, 1, L], or "lengths": key
    counts per row, exact for right-padded rows); default "lengths" for cuDNN (it takes no
    broadcast mask without an L x L bias), "mask" for xla_sdpa.
    """
    if implementation not in FUSED:
        raise ValueError(f"fused attention implementation must be one of {FUSED}, got {implementation!r}")
    B, L, H, dk = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"fused attention is self-attention: q, k, v of one shape, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if implementation == "splash":
        if not splash_block(L):
            raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {L}: "
                             "use attention_impl='blocks'")
        qs = power_law_query(q, g_lm, 1.0 / math.sqrt(dk))      # splash does not scale the logits
        return _splash(qs, k.astype(q.dtype), v.astype(q.dtype), key_valid, interpret).astype(q.dtype)
    qp = power_law_query(q, g_lm)
    impl = "cudnn" if implementation == "cudnn" else "xla"
    pad = padding or ("lengths" if impl == "cudnn" else "mask")
    return _sdpa(qp, k.astype(q.dtype), v.astype(q.dtype), key_valid, impl, pad).astype(q.dtype)


@flax.struct.dataclass
class FusedAttention(SequenceAttention):
    """A `layer.SequenceAttention` whose attention runs as a fused kernel (`fused_attention`): cuDNN,
    Pallas splash, or XLA's SDPA.  It holds the keys' validity `key_valid` [B, L] (`over_tokens`,
    as `model.forward` and the decode prefill set it), or a causal-padding `mask` [B, 1, L, L]
    (read by `key_valid_of`): no [B, 1, L, L] mask is built for the kernel (it was a loop-invariant
    input of every layer and live through the whole step: 256 MiB at 4 x 8192).  Where the
    implementation does not apply it runs the query blocks of its parent (`block` queries at a time,
    the mask built from `key_valid` inside the layer): cuDNN with float32 inputs (it takes 16-bit
    ones), splash with a sequence length that is no multiple of 128, keys that are not the queries'
    own.  Only the causal-padding mask (`general_mask` False: `model.forward` refuses a packed-row
    mask).  Hashable without its arrays: part of the jit cache key."""
    key_valid: jax.Array | None = None
    implementation: str = flax.struct.field(pytree_node=False, default="xla_sdpa")
    interpret: bool = flax.struct.field(pytree_node=False, default=False)
    general_mask: ClassVar[bool] = False

    def __post_init__(self):
        if self.implementation not in FUSED:
            raise ValueError(f"fused attention implementation must be one of {FUSED}, got {self.implementation!r}")

    @property
    def needs_mesh(self) -> bool:
        """Whether the kernel maps itself over the shards of the mesh being traced (splash, in
        `jax.shard_map`): a sharded caller traces it under `partitioning.activation_sharding`."""
        return self.implementation == "splash"

    def over_tokens(self, key_valid: jax.Array) -> "FusedAttention":
        return self.replace(mask=None, key_valid=key_valid)

    def _applies(self, q, k, v) -> bool:
        if k.shape != q.shape or v.shape != q.shape:
            return False
        if self.implementation == "cudnn" and jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return False
        return not (self.implementation == "splash" and not splash_block(q.shape[1]))

    def __call__(self, q, k, v, g_lm):
        if not self._applies(q, k, v):
            mask = self.mask
            if mask is None and self.key_valid is not None:
                mask = causal_padding_mask(self.key_valid, q.shape[1])
            return attention_in_query_blocks(q, k, v, g_lm, mask, self.block), (k, v)
        valid = self.key_valid if self.key_valid is not None else key_valid_of(self.mask)
        return fused_attention(q, k, v, g_lm, valid, self.implementation, interpret=self.interpret), (k, v)


def check_attention_impl(impl: str) -> str:
    """`impl` when it is one of `IMPLEMENTATIONS`; ValueError naming them otherwise."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    return impl


def fused_strategy(impl: str, block: int = 0) -> FusedAttention | None:
    """The `FusedAttention` for a backend choice ``attention_impl`` (`IMPLEMENTATIONS`; None for
    "blocks": the layer's own `SequenceAttention`), falling back to `block`-query blocks."""
    if check_attention_impl(impl) == "blocks":
        return None
    if impl == "splash_interpret":
        return FusedAttention(block=block, implementation="splash", interpret=True)
    return FusedAttention(block=block, implementation=impl)
