"""The PLDR-LLM forward pass as pure functions of (config, params, tokens).

`forward` reproduces the reference's full-sequence pass (metric tensor over every position, as the
reference) unless `pad_aware_A=True`, which masks padding out of A (what batched inference wants).
The layer pieces (`project_qkv`, `deduce`, `attend_and_mix`) are public so that the decoder can
compose them with its caches.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from .config import PLDRConfig
from .ops.attention import causal_padding_mask, plga_attention
from .ops.deductive import derive_g
from .ops.layers import glu, layer_norm, linear
from .ops.metric import metric_learner, metric_tensor
from .ops.rope import apply_rope

DEDUCTIVE_KEYS = ("A", "A_LM", "A_P", "G_LM")


@flax.struct.dataclass
class ForwardOutput:
    """Result of `forward`.

    logits: [B, L, V] float32.
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


# --------------------------------------------------------------------------- layer pieces
def embed(cfg: PLDRConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] -> LayerNorm(Embedding * sqrt(D)) [B, L, D] in the compute dtype."""
    x = jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(jnp.float32)
    x = x * jnp.float32(math.sqrt(cfg.d_model))
    return layer_norm(params["embed_norm"], x, cfg.layer_norm_eps).astype(jnp.dtype(cfg.dtype))


def project_qkv(cfg: PLDRConfig, lp: dict, x: jax.Array, positions: jax.Array):
    """x [B, L, D], positions [B, L] -> rotated q, k and v, each [B, L, H, dk]."""
    B, L, _ = x.shape
    split = lambda t: t.reshape(B, L, cfg.num_heads, cfg.head_dim)
    if "wqkv" in lp:   # fused [D, 3D] projection (decode-prepared params, pldr_jax.decode.prepare_params)
        q, k, v = (split(t) for t in jnp.split(linear(lp["wqkv"], x), 3, axis=-1))
    else:
        q, k, v = (split(linear(lp[n], x)) for n in ("wq", "wk", "wv"))
    q = apply_rope(q, positions, cfg.rope_theta, cfg.reference_rope)
    k = apply_rope(k, positions, cfg.rope_theta, cfg.reference_rope)
    return q, k, v


def metric_A(cfg: PLDRConfig, lp: dict, q: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    """The learned metric tensor A [B, H, dk, dk] from rotated queries q [B, L, H, dk]."""
    return metric_learner(lp["metric_norm"], lp["metric_res"], metric_tensor(q, token_mask),
                          cfg.layer_norm_eps)


def deduce(lp: dict, A: jax.Array) -> dict:
    """A [B, H, dk, dk] -> {"A", "A_LM", "A_P", "G_LM"} (float32)."""
    A_LM, A_P, G_LM = derive_g(lp["plga"], A)
    return {"A": A, "A_LM": A_LM, "A_P": A_P, "G_LM": G_LM}


def attend_and_mix(cfg: PLDRConfig, lp: dict, x: jax.Array, q, k, v, g_lm, mask) -> jax.Array:
    """Attention with G_LM, output projection, then the post-LN residual blocks.

    x [B, Lq, D]; q [B, Lq, H, dk]; k, v [B, Lk, H, dk]; g_lm [B|1, H, dk, dk]; mask
    [B, 1, Lq, Lk] bool.  Returns the layer output [B, Lq, D].
    """
    B, L, D = x.shape
    att = plga_attention(q, k, v, g_lm, mask).reshape(B, L, D)
    h = layer_norm(lp["norm1"], x + linear(lp["dense"], att), cfg.layer_norm_eps)
    return layer_norm(lp["norm2"], h + glu(lp["ffn"], h), cfg.layer_norm_eps)


def decoder_layer(cfg: PLDRConfig, lp: dict, x, positions, mask, token_mask_A, g_given):
    """One full-sequence decoder layer.

    Returns (x_out [B, L, D], deductive dict, (k, v)).  With `g_given` [B|1, H, dk, dk] the
    metric learner and the deductive derivation are skipped (the reference's G-cache path).
    """
    q, k, v = project_qkv(cfg, lp, x, positions)
    if g_given is None:
        ded = deduce(lp, metric_A(cfg, lp, q, token_mask_A))
    else:
        ded = {"G_LM": g_given.astype(jnp.float32)}
    return attend_and_mix(cfg, lp, x, q, k, v, ded["G_LM"], mask), ded, (k, v)


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
@functools.partial(jax.jit, static_argnames=("cfg", "pad_aware_A", "collect", "remat"))
def forward(cfg: PLDRConfig, params: dict, tokens: jax.Array, g_lm: jax.Array | None = None, *,
            pad_aware_A: bool = False, collect: bool = False, remat: bool = False) -> ForwardOutput:
    """Full-sequence forward pass.

    tokens [B, L] int (0 = pad).  g_lm: None (derive G_LM, learned models) or a G_LM override
    [num_layers, (B|1,) H, dk, dk] used in every layer (predefined-G models need one).
    pad_aware_A: mask padding out of the metric tensor (False = the reference, which sums over all
    positions, padding included).  collect: also return per-layer outputs and k/v.  remat:
    rematerialise each layer in the backward pass (saves memory in training).

    Layer iteration follows the params layout: stacked layers -> `lax.scan` (flat compile time);
    a tuple of per-layer dicts (`unstack_layers`) -> a Python loop (no weight-slice copies).
    """
    check_tokens(cfg, tokens)
    g_all = normalize_g_lm(cfg, g_lm)
    B, L = tokens.shape
    valid = tokens != 0
    positions = jnp.broadcast_to(jnp.arange(L), (B, L))
    mask = causal_padding_mask(valid, L)
    token_mask_A = valid if pad_aware_A else None
    x0 = embed(cfg, params, tokens)

    def body(x, lp, g):
        x, ded, (k, v) = decoder_layer(cfg, lp, x, positions, mask, token_mask_A, g)
        extra = {"layer_out": x, "k": k, "v": v} if collect else {}
        return x, (ded, extra)

    if remat:
        body = jax.checkpoint(body)
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        x, outs = x0, []
        for i, lp in enumerate(layers):
            x, o = body(x, lp, None if g_all is None else g_all[i])
            outs.append(o)
        ded, extra = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
    else:
        x, (ded, extra) = jax.lax.scan(lambda c, xs: body(c, *xs), x0, (layers, g_all))
    logits = linear(params["final"], x).astype(jnp.float32)
    inter = {"embed": x0, **extra} if collect else None
    return ForwardOutput(logits=logits, deductive=ded, hidden=x, intermediates=inter)
