"""The PLDR-LLM decoder layer: its pieces and the one `decoder_layer` every caller runs.

`decoder_layer` serves the full-sequence forward pass (training, evaluation, `model.forward`), the
decoder's prefill and each of the reference's four decode modes (KV-cache on/off x G-cache on/off);
where the modes differ, they pass different arguments:

* where G_LM comes from: given (`g_lm`: a predefined G, an override, the G-cache), re-derived from a
  cached prompt-time metric tensor (`metric`: the KV-only mode), or derived from this layer's
  queries (neither; `metric_mask` masks tokens out of A);
* `kv_buffers`: the KV-cache buffers a one-token step writes its keys and values into and attends
  over (None: attend over this call's own keys and values);
* `query_rows`: compute the output at one position per row only (the last layer of a no-KV-cache
  step, whose other positions nobody reads).

The pieces (`project_qkv`, `metric_A`, `deduce`, `attend_and_mix`) are public for tests and analyses
that inspect one stage.  ``kernels`` selects the matmul implementation (`pldr_jax.backend`; "xla"
by default, "cpu" in a CPU training step); ``attn_block`` the attention's query block length
(`attention_in_query_blocks`; 0 = all queries at once, the default); the values are the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import PLDRConfig
from .kernels.decode_attention import decode_attention_update
from .ops.attention import plga_attention
from .ops.deductive import derive_g
from .ops.layers import glu, layer_norm, linear
from .ops.metric import metric_learner, metric_tensor
from .ops.rope import apply_rope
from .partitioning import constrain, split_size

__all__ = ["project_qkv", "metric_A", "deduce", "attention_in_query_blocks", "attend_and_mix", "decoder_layer"]


def project_qkv(cfg: PLDRConfig, lp: dict, x: jax.Array, positions: jax.Array, kernels: str = "xla",
                rope: tuple[jax.Array, jax.Array] | None = None):
    """x [B, L, D], positions [B, L] -> rotated q, k and v, each [B, L, H, dk].  rope: the
    positions' `ops.rope.rope_tables` (cos, sin) [B|1, L, dk/2] or [L, dk/2], computed once for every
    layer (None: from positions here)."""
    B, L, _ = x.shape
    split = lambda t: t.reshape(B, L, cfg.num_heads, cfg.head_dim)
    if "wqkv" in lp:   # fused [D, 3D] projection (`params.fuse_projections`)
        q, k, v = (split(t) for t in jnp.split(linear(lp["wqkv"], x, kernels), 3, axis=-1))
    else:
        q, k, v = (split(linear(lp[n], x, kernels)) for n in ("wq", "wk", "wv"))
    q = apply_rope(q, positions, cfg.rope_theta, cfg.reference_rope, tables=rope)
    k = apply_rope(k, positions, cfg.rope_theta, cfg.reference_rope, tables=rope)
    names = ("batch", "length", "heads", None)
    return constrain(q, names), constrain(k, names), constrain(v, names)


def metric_A(cfg: PLDRConfig, lp: dict, q: jax.Array, token_mask: jax.Array | None,
             kernels: str = "xla") -> jax.Array:
    """The learned metric tensor A [B, H, dk, dk] from rotated queries q [B, L, H, dk]; token_mask
    [B, L] (False = left out of A) or None (every position, as the reference)."""
    A = constrain(metric_tensor(q, token_mask), ("batch", "heads", None, None))
    return constrain(metric_learner(lp["metric_norm"], lp["metric_res"], A, cfg.layer_norm_eps, kernels),
                     ("batch", "heads", None, None))


def deduce(lp: dict, A: jax.Array) -> dict:
    """A [B, H, dk, dk] -> {"A", "A_LM", "A_P", "G_LM"} (float32)."""
    A_LM, A_P, G_LM = derive_g(lp["plga"], A)
    return {"A": A, "A_LM": A_LM, "A_P": A_P, "G_LM": G_LM}


def _attention_by_head_groups(q, k, v, g_lm, mask):
    """`plga_attention`; with the heads split over a mesh axis (`partitioning.split_size("heads")`
    = t > 1, dividing H) as t groups of H / t whole heads, one group per shard: `plga_attention`
    merges the batch and head axes into one, and GSPMD then gathers the heads onto every chip.
    Without a split (any CPU run): `plga_attention` itself."""
    B, L, H, dk = q.shape
    t = split_size("heads")
    if t <= 1 or H % t:
        return plga_attention(q, k, v, g_lm, mask)
    grouped = lambda x: constrain(jnp.moveaxis(x.reshape(*x.shape[:2], t, H // t, dk), 2, 0),
                                  ("heads", "batch", "length", None, None))          # [t, B, L, H/t, dk]
    g = None if g_lm is None else constrain(
        jnp.moveaxis(g_lm.reshape(g_lm.shape[0], t, H // t, dk, dk), 1, 0), ("heads", "batch", None, None, None))
    out = jax.vmap(plga_attention, in_axes=(0, 0, 0, None if g is None else 0, None))(
        grouped(q), grouped(k), grouped(v), g, mask)                                 # [t, B, L, H/t, dk]
    return jnp.moveaxis(out, 0, 2).reshape(B, L, H, dk)


def attention_in_query_blocks(q: jax.Array, k: jax.Array, v: jax.Array, g_lm, mask, block: int = 0) -> jax.Array:
    """`plga_attention(q, k, v, g_lm, mask)` computed `block` queries at a time (the same values).

    q [B, Lq, H, dk]; k, v [B, Lk, H, dk]; g_lm [B|1, H, dk, dk] or None; mask [B, 1, Lq, Lk] bool
    or None -> [B, Lq, H, dk].  A `lax.map` over query blocks whose body is rematerialised, so
    neither pass holds more than one [B * H, block, Lk] block of float32 logits / probabilities
    (all at once they are B * H * Lq * Lk * 4 bytes: 2.1 GB per buffer for 8 rows of 1024 tokens
    with 64 heads, the bulk of a training step's temporaries).  block 0, block >= Lq or a block
    that does not divide Lq: all queries at once (`plga_attention` itself).
    """
    B, Lq, H, dk = q.shape
    if block <= 0 or block >= Lq or Lq % block:
        return _attention_by_head_groups(q, k, v, g_lm, mask)
    n = Lq // block
    names = ("batch", "length", "heads", None)
    qs = jnp.swapaxes(q.reshape(B, n, block, H, dk), 0, 1)                          # [n, B, block, H, dk]
    ms = None if mask is None else jnp.moveaxis(
        mask.reshape(mask.shape[0], 1, n, block, mask.shape[-1]), 2, 0)           # [n, B, 1, block, Lk]

    def one(qm):
        qb, mb = qm
        return constrain(_attention_by_head_groups(constrain(qb, names), k, v, g_lm, mb), names)

    out = jax.lax.map(jax.checkpoint(one), (qs, ms))                               # [n, B, block, H, dk]
    return jnp.swapaxes(out, 0, 1).reshape(B, Lq, H, dk)


def attend_and_mix(cfg: PLDRConfig, lp: dict, x: jax.Array, q, k, v, g_lm, mask, kernels: str = "xla",
                   attn_block: int = 0, heads_first: bool = False, new_kv=None,
                   merged_heads: bool = True, live_len=None, kv_chunk: int = 0, att=None,
                   attention=None) -> jax.Array:
    """Attention with G_LM, output projection, then the post-LN residual blocks.

    x [B, Lq, D]; q [B, Lq, H, dk]; k, v [B, Lk, H, dk] (or [B, H, Lk, dk] with `heads_first`, the
    decode cache's layout); g_lm [B|1, H, dk, dk]; mask [B, 1, Lq, Lk] bool.  attn_block: queries
    per attention block (`attention_in_query_blocks`; 0 = all; not used with `heads_first`, a
    one-token decode step).  new_kv: the step's own key and value [B, 1, H, dk] when k/v are the
    cache before this step's write (`plga_attention`).  merged_heads, live_len, kv_chunk:
    `plga_attention`'s (decode).  att: the attention output [B, Lq, H, dk] when already computed
    (the native decode kernel, `decoder_layer` native_kv; q, k, v, g_lm, mask are then not used).
    attention: a fused attention over a causal-padding mask, attention(q, k, v, g_lm, mask) ->
    [B, Lq, H, dk] or None where it does not apply (then the query blocks); e.g.
    `pldr_jax.kernels.fused_attention.FusedAttention`.
    Returns the layer output [B, Lq, D].
    """
    B, L, D = x.shape
    act = ("batch", "length", "embed")
    if att is None and heads_first:
        att = plga_attention(q, k, v, g_lm, mask, heads_first=True, new_kv=new_kv, merged_heads=merged_heads,
                             live_len=live_len, kv_chunk=kv_chunk)
    if att is None and attention is not None:
        att = attention(q, k, v, g_lm, mask)
    if att is None:
        att = attention_in_query_blocks(q, k, v, g_lm, mask, attn_block)
    att = constrain(att, ("batch", "length", "heads", None)).reshape(B, L, D)
    h = constrain(layer_norm(lp["norm1"], x + linear(lp["dense"], att, kernels), cfg.layer_norm_eps), act)
    return constrain(layer_norm(lp["norm2"], h + glu(lp["ffn"], h, kernels), cfg.layer_norm_eps), act)


def decoder_layer(cfg: PLDRConfig, lp: dict, x: jax.Array, positions: jax.Array, mask: jax.Array, *,
                  metric_mask: jax.Array | None = None, g_lm: jax.Array | None = None,
                  metric: jax.Array | None = None, kv_buffers: tuple[jax.Array, jax.Array] | None = None,
                  kv_slot: jax.Array | None = None, merged_heads: bool = True, kv_chunk: int = 0,
                  native_kv: bool = False, query_rows: jax.Array | None = None, kernels: str = "xla",
                  attn_block: int = 0, rope: tuple[jax.Array, jax.Array] | None = None, attention=None):
    """One decoder layer (see the module docstring for which caller passes what).

    x [B, L, D] the layer input; positions [B, L] int (RoPE positions); mask [B, 1, L, Lk] bool
    (True = may attend; Lk = L, or S with `kv_buffers`).
    G_LM source: `g_lm` [B|1, H, dk, dk] used as given (the metric learner is skipped); else
    `metric` [B, H, dk, dk], a cached A that A_LM, A_P, G_LM are re-derived from; else A from this
    layer's queries, with `metric_mask` [B, L] bool (False = left out of A) or None (all positions).
    kv_buffers: (k, v) [B, H, S, dk] KV-cache buffers of a one-token step (L == 1), heads first (the
      decode cache's layout, `decode.cache`), in the compute dtype or wider: this step's key and
      value are written at position positions[b, 0] of row b (or at slot `kv_slot` [] int32 of every
      row, one in-place update; see `decode.cache` "KV slots") and attention runs over the buffers
      (with `kv_slot`: over the buffers before the write, `mask` excluding that slot, plus the
      step's own key and value, `plga_attention` new_kv).
    merged_heads: with `kv_buffers`, attention over one [B * H] batch axis or two ([B, H]:
      `pldr_jax.backend` ``decode_merged_heads``).
    kv_chunk: with `kv_buffers`, attention reads only the slots below the next free one (`kv_slot`,
      or the rows' largest position + 1), kv_chunk at a time (`plga_attention` live_len / kv_chunk;
      `pldr_jax.backend` ``decode_kv_chunk``); 0 = the whole buffer.
    native_kv: with `kv_buffers` and per-row slots (no `kv_slot`), the cache write and the attention
      run as the native XLA:CPU kernel (`pldr_jax.kernels.decode_attention_update`; `pldr_jax.backend`
      ``decode_attention``): the same terms, buffers updated in place, masked slots not read.
    query_rows: [B] int, compute the output only at position query_rows[b] of row b.
    kernels: the matmul implementation ("xla" | "cpu", `pldr_jax.backend`).
    attn_block: the attention's query block length (`attention_in_query_blocks`; 0 = all at once).
    rope: the RoPE tables of `positions` (`project_qkv`), computed once for every layer (None: here).
    attention: a fused attention for a full-sequence call (`attend_and_mix`; None = the query blocks).

    Returns (x_out [B, L, D] ([B, 1, D] with `query_rows`), deductive outputs: {"A", "A_LM", "A_P",
    "G_LM"} float32 [B, H, dk, dk], or {"G_LM"} with a given `g_lm`, (k, v) the keys and values
    attended over: [B, L, H, dk], or the updated buffers [B, H, S, dk]).
    """
    q, k, v = project_qkv(cfg, lp, x, positions, kernels, rope)
    if g_lm is not None:
        ded = {"G_LM": g_lm.astype(jnp.float32)}
    else:
        ded = deduce(lp, metric_A(cfg, lp, q, metric_mask, kernels) if metric is None else metric)
    rows = jnp.arange(x.shape[0])
    new_kv, att = None, None
    if kv_buffers is None:
        attend = (k, v)
    elif kv_slot is not None:       # [B, H, 1, dk] into [B, H, S, dk] at one slot; attention reads the
        new_kv = (k, v)             # buffers before the write, plus this token's key and value
        attend = kv_buffers
        k, v = (jax.lax.dynamic_update_slice_in_dim(buf, jnp.swapaxes(t, 1, 2).astype(buf.dtype), kv_slot, axis=2)
                for buf, t in zip(kv_buffers, (k, v)))
    elif native_kv:                 # written and attended over by the native kernel
        att, k, v = decode_attention_update(q, ded["G_LM"], k, v, positions[:, 0], *kv_buffers, mask)
        attend = (k, v)
    else:                           # row b's key and value at its own position
        k, v = (buf.at[rows, :, positions[:, 0]].set(t[:, 0].astype(buf.dtype)) for buf, t in zip(kv_buffers, (k, v)))
        attend = (k, v)
    live_len = None                 # the slots a one-token step attends over: below the next free one
    if kv_buffers is not None and kv_chunk:
        live_len = kv_slot if kv_slot is not None else jnp.max(positions[:, 0]) + 1
    if query_rows is not None:
        x, q = x[rows, query_rows][:, None], q[rows, query_rows][:, None]
        mask = mask[rows, :, query_rows][:, :, None]
    out = attend_and_mix(cfg, lp, x, q, *attend, ded["G_LM"], mask, kernels, attn_block,
                         heads_first=kv_buffers is not None, new_kv=new_kv, merged_heads=merged_heads,
                         live_len=live_len, kv_chunk=kv_chunk, att=att,
                         attention=None if kv_buffers is not None or query_rows is not None else attention)
    return out, ded, (k, v)
