"""Weights for decoding: the compute-dtype policy and the decode weight layout.

Dtype policy (`decode_dtype`): on CPU a bfloat16 config decodes in float32 when the batch is below
``bf16_min_batch`` (None = the platform's, `pldr_jax.backend`: 16 on CPU with the native packed
float32 matmul, which outruns XLA:CPU's bfloat16 products there, 8 without it; 0 on accelerators);
bfloat16 weights are then up-cast once, before the loop (`prepare_params`).  Otherwise a bfloat16
config decodes in bfloat16 (the deductive path, softmax and logits stay float32).  Pass
``bf16_min_batch=0`` (or 1) to force the configured dtype.

Layout (`prepare_params`): per-layer weights, fused q/k/v and w1/w2; on CPU in float32 either packed
in 16-output panels for the native matmul (`layouts.PackedLinear`, `pldr_jax.backend`
``decode_matmul``) or, without it, transposed to [out, in] (`layouts.TransposedLinear`,
``decode_transposed``).  The choices come from one `pldr_jax.backend.BackendChoices` value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..backend import BackendChoices, backend_for
from ..config import PLDRConfig
from ..params import fuse_projections, unstack_layers
from .layouts import PackedLinear, pack_linear, transpose_linear

__all__ = ["decode_dtype", "packs_weights", "prepare_params", "has_packed_weights"]

_MATMUL_LAYER_KEYS = ("wq", "wk", "wv", "wqkv", "dense", "ffn")


def decode_dtype(cfg: PLDRConfig, batch: int, bf16_min_batch: int | None = None, *,
                 backend: BackendChoices | None = None) -> str:
    """Compute dtype used to decode `batch` rows: a 16-bit config runs in float32 below
    `bf16_min_batch` rows (None = `backend`'s, `pldr_jax.backend`; backend None = the default
    platform's), else cfg.dtype."""
    if bf16_min_batch is None:
        bf16_min_batch = backend_for(backend).bf16_min_batch
    if cfg.dtype in ("bfloat16", "float16") and batch < bf16_min_batch:
        return "float32"
    return cfg.dtype


def _relayout_layer(lp: dict, relayout) -> dict:
    """One layer's params with every decode-time matmul kernel re-laid out by `relayout`
    (`layouts.transpose_linear` or `layouts.pack_linear`)."""
    lp = dict(lp)
    for name in ("wq", "wk", "wv", "wqkv", "dense"):
        if name in lp:
            lp[name] = relayout(lp[name])
    lp["ffn"] = {k: relayout(v) for k, v in lp["ffn"].items()}
    return lp


def packs_weights(dtype, *, sharded: bool = False, backend: BackendChoices | None = None) -> bool:
    """Whether a decode in `dtype` stores its weights packed for the native matmul (`backend`'s
    ``decode_matmul`` is "packed", float32, not sharded over several devices, and the kernel builds
    on this host: the first call builds it, a failure warns once and answers False)."""
    if backend_for(backend).decode_matmul != "packed" or sharded or jnp.dtype(dtype) != jnp.float32:
        return False
    from ..kernels.packed_matmul import packed_matmul_available
    return packed_matmul_available()


def has_packed_weights(params) -> bool:
    """Whether any linear layer of `params` is a `layouts.PackedLinear` (native packed panels)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, PackedLinear))
    return any(isinstance(x, PackedLinear) for x in leaves)


def prepare_params(cfg: PLDRConfig, params: dict, batch: int, *, backend: BackendChoices | None = None,
                   bf16_min_batch: int | None = None, fuse: bool = True, transpose: bool | None = None,
                   embed_f32: bool | None = None, pack: bool | None = None):
    """(run_cfg, run_params) for decoding `batch` rows.

    Per-layer weight arrays (`unstack_layers`: no weight-slice copies inside the decode loop), the
    q/k/v projections and the FFN's w1/w2 fused into one matrix each (`fuse`), kernels stored
    transposed as [out, in] (`transpose`, `layouts.TransposedLinear`; None = where `backend` (None:
    `pldr_jax.backend.choices()`) wants it for the decode dtype,
    `pldr_jax.backend` ``decode_transposed``: float32 on CPU), cast to the decode
    dtype (`decode_dtype`; the deductive-path weights stay as stored; a 16-bit decode's embedding
    table is float32 with `embed_f32`; None = where the platform wants it, ``decode_embed_f32``: CPU).  The result is a decode
    layout (`forward` accepts it too).  A no-op, no copy, when already prepared: call it once and
    pass the result to `generate` to keep the conversion out of every call.
    pack: store the matmul kernels in the native packed matmul's panels instead (`layouts.PackedLinear`, see
    `packs_weights`; None = where the platform wants it for the decode dtype: float32 on CPU, where
    it supersedes `transpose`).  Pass False for weights that will be sharded over several devices
    (`decode.Sampler` does) or compiled for another platform.
    """
    backend = backend_for(backend)
    run = decode_dtype(cfg, batch, bf16_min_batch, backend=backend)
    if transpose is None:
        transpose = run in backend.decode_transposed
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
    if pack is None:
        pack = packs_weights(run, backend=backend)
    if pack or transpose:
        relayout = pack_linear if pack else transpose_linear
        layers = tuple(_relayout_layer(lp, relayout) for lp in layers)
        final = relayout(final)
    # a 16-bit decode on CPU keeps a float32 table (`backend` decode_embed_f32; rows cast after the lookup)
    wide_table = dt != jnp.float32 and (backend.decode_embed_f32 if embed_f32 is None else embed_f32)
    table_cast = (lambda x: jnp.asarray(x).astype(jnp.float32)) if wide_table else cast
    out = dict(params, layers=layers, embed=jax.tree_util.tree_map(table_cast, params["embed"]), final=final)
    if dt == jnp.float32:
        out["embed_norm"] = jax.tree_util.tree_map(cast, params["embed_norm"])
    return run_cfg, out
