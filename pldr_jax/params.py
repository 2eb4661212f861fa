"""The parameter pytree: layout, initialisation, logical axes, layer stacking.

Layout (JAX convention: Linear kernels are [in, out], `y = x @ kernel + bias`)::

    {"embed": {"embedding": [V, D]},
     "embed_norm": {"scale": [D], "bias": [D]},
     "layers": {                                   # every leaf has a leading [num_layers] axis
         "wq"|"wk"|"wv"|"dense": {"kernel": [D, D], "bias": [D]},
         "norm1"|"norm2": {"scale": [D], "bias": [D]},
         "ffn": {"w1"|"w2": {"kernel": [D, F], "bias": [F]}, "w3": {"kernel": [F, D], "bias": [D]}},
         # learned-G models only (cfg.custom_G_type is None):
         "metric_norm": {"scale": [dk], "bias": [dk]},
         "metric_res": {"w1"|"w2": {"kernel": [R, N, dk, A_dff], "bias": [R, N, A_dff]},
                        "w3": {"kernel": [R, N, A_dff, dk], "bias": [R, N, dk]},
                        "norm": {"scale": [R, dk], "bias": [R, dk]}},
         "plga": {"W"|"b"|"P"|"a"|"ba": [H, dk, dk]}},
     "final": {"kernel": [D, V], "bias": [V]}}

R = num_reslayerA, N = num_denseA.  `unstack_layers` turns "layers" into a tuple of per-layer
dicts (no leading axis): `forward` then runs a Python loop over layers instead of `lax.scan`,
which is faster for small-batch decoding on CPU (no per-step weight-slice copies).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import PLDRConfig

Params = dict[str, Any]


# --------------------------------------------------------------------------- initialisers
def _xavier_uniform(key, shape, fan_in, fan_out, dtype):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _xavier_normal(key, shape, fan_in, fan_out, dtype):
    std = math.sqrt(2.0 / (fan_in + fan_out))
    return std * jax.random.normal(key, shape, dtype)


def _torch_default_linear(key, shape_kernel, fan_in, dtype):
    """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    return (jax.random.uniform(kw, shape_kernel, dtype, -bound, bound),
            jax.random.uniform(kb, shape_kernel[-1:], dtype, -bound, bound))


def _linear(key, n_in, n_out, dtype, lead=()):
    """Xavier-uniform kernel [*lead, n_in, n_out], zero bias [*lead, n_out]."""
    return {"kernel": _xavier_uniform(key, (*lead, n_in, n_out), n_in, n_out, dtype),
            "bias": jnp.zeros((*lead, n_out), dtype)}


def _norm(n, dtype, lead=()):
    return {"scale": jnp.ones((*lead, n), dtype), "bias": jnp.zeros((*lead, n), dtype)}


def _init_layer(cfg: PLDRConfig, key, dtype) -> Params:
    D, F, H, dk = cfg.d_model, cfg.dff, cfg.num_heads, cfg.head_dim
    keys = iter(jax.random.split(key, 16))
    layer = {
        "wq": _linear(next(keys), D, D, dtype),
        "wk": _linear(next(keys), D, D, dtype),
        "dense": _linear(next(keys), D, D, dtype),
        "norm1": _norm(D, dtype),
        "norm2": _norm(D, dtype),
        "ffn": {"w1": _linear(next(keys), D, F, dtype), "w2": _linear(next(keys), D, F, dtype),
                "w3": _linear(next(keys), F, D, dtype)},
    }
    kv = next(keys)
    if cfg.init == "reference":  # the reference never applies its init to wv (it inits wk twice)
        k_, b_ = _torch_default_linear(kv, (D, D), D, dtype)
        layer["wv"] = {"kernel": k_, "bias": b_}
    else:
        layer["wv"] = _linear(kv, D, D, dtype)
    if cfg.learned_g:
        R, N, Af = cfg.num_reslayerA, cfg.num_denseA, cfg.A_dff
        layer["metric_norm"] = _norm(dk, dtype)
        layer["metric_res"] = {
            "w1": _linear(next(keys), dk, Af, dtype, (R, N)),
            "w2": _linear(next(keys), dk, Af, dtype, (R, N)),
            "w3": _linear(next(keys), Af, dk, dtype, (R, N)),
            "norm": _norm(dk, dtype, (R,)),
        }
        # torch fans of an [H, dk, dk] tensor: fan_in = dk*dk, fan_out = H*dk
        fi, fo = dk * dk, H * dk
        layer["plga"] = {
            "W": _xavier_normal(next(keys), (H, dk, dk), fi, fo, dtype),
            "b": jnp.zeros((H, dk, dk), dtype),
            "P": _xavier_normal(next(keys), (H, dk, dk), fi, fo, dtype),
            "a": _xavier_normal(next(keys), (H, dk, dk), fi, fo, dtype),
            "ba": jnp.zeros((H, dk, dk), dtype),
        }
    return layer


def init_params(cfg: PLDRConfig, key: jax.Array) -> Params:
    """Initialise parameters with the reference's initialisers (cfg.init selects the `wv` fix).

    Pure and jittable: `jax.jit(init_params, static_argnums=0, out_shardings=...)` initialises
    directly into a sharded layout.  Returns the stacked layout (see module docstring).
    """
    dtype = jnp.dtype(cfg.param_dtype)
    k_emb, k_layers, k_final = jax.random.split(key, 3)
    layer_keys = jax.random.split(k_layers, cfg.num_layers)
    layers = jax.vmap(lambda k: _init_layer(cfg, k, dtype))(layer_keys)
    return {
        "embed": {"embedding": jax.random.normal(k_emb, (cfg.vocab_size, cfg.d_model), dtype)},
        "embed_norm": _norm(cfg.d_model, dtype),
        "layers": layers,
        "final": _linear(k_final, cfg.d_model, cfg.vocab_size, dtype),
    }


def abstract_params(cfg: PLDRConfig) -> Params:
    """ShapeDtypeStructs of the parameters, no memory used (`jax.eval_shape`)."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def count_params(params_or_cfg) -> int:
    """Number of scalar parameters of a params tree (or of a config, via eval_shape)."""
    tree = abstract_params(params_or_cfg) if isinstance(params_or_cfg, PLDRConfig) else params_or_cfg
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------- layer stacking
def unstack_layers(params: Params) -> Params:
    """Stacked layout -> per-layer tuple in params["layers"] (Python loop in `forward`)."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    per = tuple(jax.tree_util.tree_map(lambda x, i=i: x[i], layers) for i in range(n))
    return {**params, "layers": per}


def stack_layers(params: Params) -> Params:
    """Per-layer tuple -> stacked layout (leading num_layers axis; `lax.scan` in `forward`)."""
    layers = params["layers"]
    if not isinstance(layers, (tuple, list)):
        return params
    return {**params, "layers": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}


def fuse_projections(lp: dict) -> dict:
    """One layer's params (per-layer or stacked) with the matrices that read the same input fused
    on their output axis: wq|wk|wv -> "wqkv" [.., D, 3D] and ffn w1|w2 -> "w12" [.., D, 2F].

    `forward` accepts either form.  One larger matmul instead of two or three independent ones: on
    XLA:CPU independent matmuls run concurrently on the same two cores and each is then 2-4x slower.
    Traced inside a jitted step, the gradients flow back to the unfused leaves.  No-op when fused.
    (The metric learner's small GLUs measured slower fused: see experiments/README.md.)
    """
    if "wqkv" in lp:
        return lp
    if not isinstance(lp["wq"], dict) or "kernel" not in lp["wq"]:
        raise ValueError("fuse the projections before transposing them (decode.prepare_params does)")

    def cat(*ps):
        return {k: jnp.concatenate([jnp.asarray(p[k]) for p in ps], axis=-1) for k in ("kernel", "bias")}

    lp = dict(lp)
    lp["wqkv"] = cat(lp.pop("wq"), lp.pop("wk"), lp.pop("wv"))
    ffn = dict(lp["ffn"])
    ffn["w12"] = cat(ffn.pop("w1"), ffn.pop("w2"))
    lp["ffn"] = ffn
    return lp


def fuse_params(params: Params) -> Params:
    """`fuse_projections` applied to every layer (stacked or per-layer layout)."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return {**params, "layers": tuple(fuse_projections(lp) for lp in layers)}
    return {**params, "layers": fuse_projections(layers)}


# --------------------------------------------------------------------------- logical axes
def _linear_axes(a_in, a_out, lead=()):
    return {"kernel": (*lead, a_in, a_out), "bias": (*lead, a_out)}


def _norm_axes(a, lead=()):
    return {"scale": (*lead, a), "bias": (*lead, a)}


def logical_axes(cfg: PLDRConfig) -> Params:
    """A tree with the params' structure whose leaves are tuples of logical axis names.

    Names: "layers", "vocab", "embed" (D), "heads" (D split into heads on the projection output),
    "mlp" (dff), "dk", "a_mlp" (A_dff), "res", "glu", "attn_heads" (H).  `train/sharding.py` maps
    them to mesh axes with one rule table.
    """
    L = ("layers",)
    layer = {
        "wq": _linear_axes("embed", "heads", L), "wk": _linear_axes("embed", "heads", L),
        "wv": _linear_axes("embed", "heads", L), "dense": _linear_axes("heads", "embed", L),
        "norm1": _norm_axes("norm", L), "norm2": _norm_axes("norm", L),
        "ffn": {"w1": _linear_axes("embed", "mlp", L), "w2": _linear_axes("embed", "mlp", L),
                "w3": _linear_axes("mlp", "embed", L)},
    }
    if cfg.learned_g:
        RN = (*L, "res", "glu")
        layer["metric_norm"] = _norm_axes("dk", L)
        layer["metric_res"] = {"w1": _linear_axes("dk", "a_mlp", RN), "w2": _linear_axes("dk", "a_mlp", RN),
                               "w3": _linear_axes("a_mlp", "dk", RN), "norm": _norm_axes("dk", (*L, "res"))}
        layer["plga"] = {k: (*L, "attn_heads", "dk", "dk_out") for k in ("W", "b", "P", "a", "ba")}
    return {"embed": {"embedding": ("vocab", "embed")}, "embed_norm": _norm_axes("norm"),
            "layers": layer, "final": _linear_axes("embed", "vocab")}
