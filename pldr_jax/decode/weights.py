"""Weights for decoding: the compute-dtype policy and the decode weight layout.

Dtype policy (`decode_dtype`): XLA:CPU's bfloat16 matrix-vector products are slow, so on CPU a
bfloat16 config decodes in float32 when the batch is below ``bf16_min_batch`` (None = the
platform's, `pldr_jax.backend`: 8 on CPU, 0 on accelerators); bfloat16 weights are then up-cast
once, before the loop (`prepare_params`).  Otherwise a bfloat16 config decodes in bfloat16 (the
deductive path, softmax and logits stay float32).  Pass ``bf16_min_batch=0`` (or 1) to force the
configured dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..backend import choices
from ..config import PLDRConfig
from ..params import fuse_projections, unstack_layers

__all__ = ["decode_dtype", "prepare_params"]

_MATMUL_LAYER_KEYS = ("wq", "wk", "wv", "wqkv", "dense", "ffn")


def decode_dtype(cfg: PLDRConfig, batch: int, bf16_min_batch: int | None = None) -> str:
    """Compute dtype used to decode `batch` rows: a 16-bit config runs in float32 below
    `bf16_min_batch` rows (None = the platform's; XLA:CPU's 16-bit matrix-vector path is slow),
    else cfg.dtype."""
    if bf16_min_batch is None:
        bf16_min_batch = choices().bf16_min_batch
    if cfg.dtype in ("bfloat16", "float16") and batch < bf16_min_batch:
        return "float32"
    return cfg.dtype


def _transpose_linear(p: dict) -> dict:
    """{"kernel" [in, out], "bias"} -> {"kernel_t" [out, in], "bias"} (see `ops.layers.linear`)."""
    if "kernel" not in p:
        return p
    q = dict(p)
    q["kernel_t"] = jnp.asarray(q.pop("kernel")).T
    return q


def _transpose_layer(lp: dict) -> dict:
    """One layer's params with every decode-time matmul kernel transposed (`_transpose_linear`)."""
    lp = dict(lp)
    for name in ("wq", "wk", "wv", "wqkv", "dense"):
        if name in lp:
            lp[name] = _transpose_linear(lp[name])
    lp["ffn"] = {k: _transpose_linear(v) for k, v in lp["ffn"].items()}
    return lp


def prepare_params(cfg: PLDRConfig, params: dict, batch: int, *, bf16_min_batch: int | None = None,
                   fuse: bool = True, transpose: bool | None = None, embed_f32: bool | None = None):
    """(run_cfg, run_params) for decoding `batch` rows.

    Per-layer weight arrays (`unstack_layers`: no weight-slice copies inside the decode loop), the
    q/k/v projections and the FFN's w1/w2 fused into one matrix each (`fuse`), kernels stored
    transposed as [out, in] (`transpose`; None = where the platform wants it for the decode dtype,
    `pldr_jax.backend` ``decode_transposed``: float32 on CPU), cast to the decode
    dtype (`decode_dtype`; the deductive-path weights stay as stored; a 16-bit decode's embedding
    table is float32 with `embed_f32`; None = where the platform wants it, ``decode_embed_f32``: CPU).  The result is a decode
    layout (`forward` accepts it too).  A no-op, no copy, when already prepared: call it once and
    pass the result to `generate` to keep the conversion out of every call.
    """
    run = decode_dtype(cfg, batch, bf16_min_batch)
    if transpose is None:
        transpose = run in choices().decode_transposed
    run_cfg = cfg if run == cfg.dtype else cfg.replace(dtype=run)
    params = unstack_layers(params)
    dt = jnp.dtype(run)

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt:
            return jnp.asarray(x).astype(dt)
        return x

    if dt == jnp.float32:      # up-cast everything (16-bit storage -> float32 compute)
        layers = tuple(jax.tree_util.tree_map(cast, lp) for lp in params["layers"])
    else:                      # 16-bit compute: only the big matrices
        layers = tuple({k: (jax.tree_util.tree_map(cast, v) if k in _MATMUL_LAYER_KEYS else v)
                        for k, v in lp.items()} for lp in params["layers"])
    if fuse:
        layers = tuple(fuse_projections(lp) for lp in layers)
    final = jax.tree_util.tree_map(cast, params["final"])
    if transpose:
        layers = tuple(_transpose_layer(lp) for lp in layers)
        final = _transpose_linear(final)
    # a 16-bit decode on CPU keeps a float32 table (`backend` decode_embed_f32; rows cast after the lookup)
    wide_table = dt != jnp.float32 and (choices().decode_embed_f32 if embed_f32 is None else embed_f32)
    table_cast = (lambda x: jnp.asarray(x).astype(jnp.float32)) if wide_table else cast
    out = dict(params, layers=layers, embed=jax.tree_util.tree_map(table_cast, params["embed"]), final=final)
    if dt == jnp.float32:
        out["embed_norm"] = jax.tree_util.tree_map(cast, params["embed_norm"])
    return run_cfg, out
