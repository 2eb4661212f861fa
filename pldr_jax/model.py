"""The PLDR-LLM forward pass as pure functions of (config, params, tokens).

`forward` reproduces the reference's full-sequence pass (metric tensor over every position, as the
reference) unless `pad_aware_A=True`, which masks padding out of A (what batched inference wants).
Each layer is `layer.decoder_layer`, the one the decoder (`pldr_jax.decode`) runs too; `embed` and
`normalize_g_lm` are shared with it as well.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from .config import PLDRConfig
from .layer import SequenceAttention, decoder_layer
from .ops.layers import layer_norm, linear
from .ops.rope import rope_tables
from .partitioning import active_rules_key, constrain, rules_scope

DEDUCTIVE_KEYS = ("A", "A_LM", "A_P", "G_LM")


@flax.struct.dataclass
class ForwardOutput:
    """Result of `forward`.

    logits: [B, L, V] float32 (None when params have no "final" output head).
    deductive: {"A", "A_LM", "A_P", "G_LM"} each [num_layers, B, H, dk, dk] float32 for a model
      that derives G; with a given G (predefined-G model or `g_lm=`) only "G_LM" is present,
      [num_layers, B|1, H, dk, dk].
    hidden: [B, L, D] output of the last decoder layer (before the output head).
    intermediates: None, or (with `collect=True`) {"embed": [B, L, D], "layer_out": [layers, B, L, D],
      "k", "v": [layers, B, L, H, dk] (rotated keys, values)}.
    """
    logits: jax.Array
    deductive: dict
    hidden: jax.Array
    intermediates: Any = None


# --------------------------------------------------------------------------- embedding
def embed(cfg: PLDRConfig, params: dict, tokens: jax.Array, *, lookup_first: bool = False) -> jax.Array:
    """tokens [B, L] -> LayerNorm(Embedding * sqrt(D)) [B, L, D] in the compute dtype.

    lookup_first: look the rows up in the table as stored, then cast them to the compute dtype
    (the same values; decoding, whose prepared table may be wider than the compute dtype,
    `pldr_jax.backend` ``decode_embed_f32``); else cast the table, then look up (below)."""
    # under a mesh: gather the (FSDP-sharded) table whole first, so the lookup's result is sharded
    # like the tokens (batch), not like the table (no all-to-all to reshard it); cast to the compute
    # dtype before that, so a 16-bit model moves 16-bit rows (and its gradient is reduce-scattered
    # at that width), as the plain FSDP yardstick does.  float32 models: unchanged.
    dt = jnp.dtype(cfg.dtype)
    table = params["embed"]["embedding"]
    table = constrain(table if lookup_first else table.astype(dt), (None, None))
    x = jnp.take(table, tokens, axis=0).astype(dt).astype(jnp.float32)
    x = x * jnp.float32(math.sqrt(cfg.d_model))
    return layer_norm(params["embed_norm"], x, cfg.layer_norm_eps).astype(jnp.dtype(cfg.dtype))


# --------------------------------------------------------------------------- G_LM argument
def normalize_g_lm(cfg: PLDRConfig, g_lm) -> jax.Array | None:
    """Validate a G_LM override and return it as [num_layers, B|1, H, dk, dk] float32 (or None).

    Accepts [layers, H, dk, dk], [layers, 1|B, H, dk, dk].  Predefined-G configs need one
    (an "identity" config defaults to the identity).
    """
    L, H, dk = cfg.num_layers, cfg.num_heads, cfg.head_dim
    if g_lm is None:
        if cfg.custom_G_type == "identity":
            return jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (L, 1, H, dk, dk))
        if not cfg.learned_g:
            raise ValueError(f"g_lm is required for a predefined-G config (custom_G_type="
                             f"{cfg.custom_G_type!r}): pass an array [num_layers={L}, H={H}, dk={dk}, dk={dk}]")
        return None
    if not hasattr(g_lm, "shape"):
        g_lm = jnp.asarray(g_lm, jnp.float32)
    shape = tuple(g_lm.shape)
    if len(shape) == 4:
        g_lm = g_lm[:, None]
        shape = tuple(g_lm.shape)
    if len(shape) != 5 or shape[0] != L or shape[2:] != (H, dk, dk):
        raise ValueError(f"g_lm has shape {tuple(shape)}; expected [num_layers={L}, H={H}, dk={dk}, dk={dk}] "
                         f"or [num_layers, batch|1, H, dk, dk]")
    return jnp.asarray(g_lm, jnp.float32)


def check_tokens(cfg: PLDRConfig, tokens) -> None:
    """Static checks of a token batch: integer dtype, rank 2, length <= max_seq_len."""
    dt = getattr(tokens, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.integer):
        raise ValueError(f"tokens must be an integer array [B, L], got dtype {dt}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have rank 2 [B, L], got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"tokens length {tokens.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")


# --------------------------------------------------------------------------- forward
REMAT_POLICIES = ("none", "dots", "full")


def remat_policy(remat: bool | str) -> str:
    """False / True / "none" / "dots" / "full" -> one of `REMAT_POLICIES` (True = "full")."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES} (or a bool), got {remat!r}")
    return remat


def checkpoint_layer(fn, remat: bool | str):
    """`fn` wrapped for the backward pass by the remat policy: "none" keeps every activation,
    "dots" keeps the matmul outputs that have no batch dimension (weights x activations) and
    recomputes the rest, "full" keeps only the layer's inputs."""
    policy = remat_policy(remat)
    if policy == "none":
        return fn
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return jax.checkpoint(fn)


def forward(cfg: PLDRConfig, params: dict, tokens: jax.Array, g_lm: jax.Array | None = None, *,
            pad_aware_A: bool = False, collect: bool = False, remat: bool | str = False,
            kernels: str = "xla", attn_block: int = 0, attention: SequenceAttention | None = None,
            positions: jax.Array | None = None,
            attn_mask: jax.Array | None = None, metric_mask: jax.Array | None = None) -> ForwardOutput:
    """Full-sequence forward pass.

    tokens [B, L] int (0 = pad).  g_lm: None (derive G_LM, learned models) or a G_LM override
    [num_layers, (B|1,) H, dk, dk] used in every layer (predefined-G models need one).
    pad_aware_A: mask padding out of the metric tensor (False = the reference, which sums over all
    positions, padding included).  collect: also return per-layer outputs and k/v.  remat:
    rematerialise each layer in the backward pass (saves memory in training): False / "none",
    "dots", True / "full" (`checkpoint_layer`).  kernels: the matmul implementation
    (`pldr_jax.backend`): "xla" (default; plain dot_general, so `jax.jvp` / `jax.hessian` work) or
    "cpu" (XLA:CPU's fast backward; reverse mode only).  Same values either way.  attn_block:
    compute attention this many queries at a time (`layer.attention_in_query_blocks`: memory
    linear, not quadratic, in the sequence length; 0 = all at once).  Same values.
    attention: the attention implementation, a mask-less `layer.SequenceAttention` (or a subclass:
    a fused kernel) whose mask is set here; None = ``SequenceAttention(block=attn_block)``.
    positions [B, L] int, attn_mask [B, 1, L, L] bool (True = may attend), metric_mask [B, L] bool
    (True = summed into A): a packed row's RoPE positions, attention mask and metric tokens
    (`eval.shared_context`: the continuations of one context in one row); None = 0..L-1, causal over
    the non-pad tokens, and (metric_mask) every token / the non-pad tokens by `pad_aware_A`.

    Layer iteration follows the params layout: stacked layers -> `lax.scan` (flat compile time);
    a tuple of per-layer dicts (`unstack_layers`) -> a Python loop (no weight-slice copies).

    Jitted; the sharding rule table in force (`partitioning.activation_sharding`) is part of its
    compile-cache key.
    """
    if attn_mask is not None and attention is not None and not attention.general_mask:
        raise ValueError(f"{type(attention).__name__} implements the causal-padding mask only: pass attention=None "
                         "(the query blocks) with attn_mask")
    return _forward(cfg, params, tokens, g_lm, pad_aware_A=pad_aware_A, collect=collect, remat=remat,
                    kernels=kernels, attn_block=attn_block, attention=attention, positions=positions,
                    attn_mask=attn_mask, metric_mask=metric_mask, sharding_rules=active_rules_key())


@functools.partial(jax.jit, static_argnames=("cfg", "pad_aware_A", "collect", "remat", "kernels", "attn_block",
                                             "attention", "sharding_rules"))
def _forward(cfg, params, tokens, g_lm, *, pad_aware_A, collect, remat, kernels, attn_block, attention, positions,
             attn_mask, metric_mask, sharding_rules) -> ForwardOutput:
    with rules_scope(sharding_rules):
        return _forward_body(cfg, params, tokens, g_lm, pad_aware_A, collect, remat, kernels, attn_block, attention,
                             positions, attn_mask, metric_mask)


def _forward_body(cfg, params, tokens, g_lm, pad_aware_A, collect, remat, kernels, attn_block, attention, positions,
                  attn_mask, metric_mask) -> ForwardOutput:
    check_tokens(cfg, tokens)
    g_all = normalize_g_lm(cfg, g_lm)
    B, L = tokens.shape
    valid = tokens != 0
    positions = jnp.broadcast_to(jnp.arange(L), (B, L)) if positions is None else positions
    token_mask_A = metric_mask if metric_mask is not None else (valid if pad_aware_A else None)
    x0 = constrain(embed(cfg, params, tokens), ("batch", "length", "act_embed"))
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)          # once, for every layer
    att = SequenceAttention(block=attn_block) if attention is None else attention
    # the causal-padding mask as the strategy holds it (a fused kernel: the keys' validity only)
    att = att.over_tokens(valid) if attn_mask is None else att.replace(mask=attn_mask)

    def body(x, lp, g):
        x, ded, (k, v) = decoder_layer(cfg, lp, x, rope, att, g_lm=g, metric_mask=token_mask_A, kernels=kernels)
        extra = {"layer_out": x, "k": k, "v": v} if collect else {}
        return x, (ded, extra)

    body = checkpoint_layer(body, remat)
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        x, outs = x0, []
        for i, lp in enumerate(layers):
            x, o = body(x, lp, None if g_all is None else g_all[i])
            outs.append(o)
        ded, extra = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
    else:
        x, (ded, extra) = jax.lax.scan(lambda c, xs: body(c, *xs), x0, (layers, g_all))
    # params without "final" (a task head's decoder, `pldr_jax.heads`): no LM logits
    logits = linear(params["final"], x, kernels).astype(jnp.float32) if "final" in params else None
    inter = {"embed": x0, **extra} if collect else None
    return ForwardOutput(logits=logits, deductive=ded, hidden=x, intermediates=inter)
