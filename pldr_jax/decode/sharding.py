"""Sharded decoding: where the decode weights, the prompts and the cache live on a device mesh.

Rows (the batch) are split over the mesh's data axes, attention heads (and the FFN width and the
vocabulary) over its tensor axis, with the one rule table (`pldr_jax.partitioning.RULES`) minus
the FSDP split of the model width (a decode step reads every weight once: splitting D over the
data axes would all-gather each weight every step).  A dimension that does not divide by its mesh
axes is replicated (`partitioning.logical_to_spec`), so any batch size and head count run.

The decode weight layout (`weights.prepare_params`: per-layer, fused, kernels transposed to
[out, in], `layouts.TransposedLinear`) gets its logical axis names from `decode_param_axes`; the cache's come from
`cache.cache_logical_axes`.  The jitted prefill and loop take sharded inputs and XLA (GSPMD)
propagates the shardings through them; `shard_cache` pins the cache to its logical sharding between
prefill and the loop.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..partitioning import RULES, activation_sharding, logical_to_spec, merged_rules
from .cache import Cache, cache_logical_axes

__all__ = ["decode_rules", "decode_param_axes", "shard_params", "shard_rows", "shard_cache", "prefill_scope"]

# [out, in] (transposed) / [in, out] logical names of each decode-time linear layer
_LINEAR_AXES = {"wqkv": ("heads", "embed"), "wq": ("heads", "embed"), "wk": ("heads", "embed"),
                "wv": ("heads", "embed"), "dense": ("embed", "heads"), "w12": ("mlp", "embed"),
                "w1": ("mlp", "embed"), "w2": ("mlp", "embed"), "w3": ("embed", "mlp"),
                "final": ("vocab", "embed")}


def decode_rules(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The logical-name -> mesh-axis table for decoding on `mesh`: `partitioning.RULES` without the
    FSDP split of the model width ("batch" over every one of its axes present).  `rules` overrides
    entries (a user's table: the same for the weights, the activations and the cache)."""
    batch = tuple(a for a in RULES["batch"] if a in mesh.shape)
    return merged_rules({"embed": None, "batch": batch, **(rules or {})})


def _leaf_axes(path, leaf) -> tuple:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    nd = getattr(leaf, "ndim", 0)
    owner = next((k for k in reversed(keys[:-1]) if k in _LINEAR_AXES), None)
    name = keys[-1] if keys else None
    if owner is not None and name in ("kernel_t", "kernel", "bias"):   # dict keys or `layouts` fields
        out_ax, in_ax = _LINEAR_AXES[owner]
        if name == "kernel_t":
            return (out_ax, in_ax)
        return (in_ax, out_ax) if name == "kernel" else (out_ax,)
    if "embed" in keys and name == "embedding":
        return ("vocab", "embed")
    if "plga" in keys and nd >= 1:
        return ("attn_heads",) + (None,) * (nd - 1)
    return (None,) * nd


def decode_param_axes(run_params) -> Any:
    """A tree like `run_params` (the `prepare_params` layout) whose leaves are tuples of logical
    axis names (None = replicated dimension)."""
    return jax.tree_util.tree_map_with_path(_leaf_axes, run_params)


def _spec(names, shape, mesh, rules) -> PartitionSpec:
    return logical_to_spec(names, shape, mesh, rules)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def shard_params(run_params, mesh: Mesh, rules: Mapping[str, Any]):
    """`run_params` placed on `mesh` (heads / FFN width / vocabulary over the tensor axis)."""
    axes = decode_param_axes(run_params)
    shardings = jax.tree_util.tree_map(
        lambda names, x: NamedSharding(mesh, _spec(names, x.shape, mesh, rules)), axes, run_params,
        is_leaf=_is_names)
    return jax.device_put(run_params, shardings)


def shard_rows(x, mesh: Mesh, rules: Mapping[str, Any]):
    """An array whose leading axis is the batch, split over the data axes (when it divides)."""
    names = ("batch",) + (None,) * (x.ndim - 1)
    return jax.device_put(x, NamedSharding(mesh, _spec(names, x.shape, mesh, rules)))


def shard_cache(cache: Cache, mesh: Mesh, rules: Mapping[str, Any]) -> Cache:
    """`cache` placed by its logical axes (`cache_logical_axes`): rows over the data axes, heads over
    the tensor axis (a no-op for buffers already placed so)."""
    axes = cache_logical_axes(cache)
    shardings = jax.tree_util.tree_map(
        lambda names, x: NamedSharding(mesh, _spec(names, x.shape, mesh, rules)), axes, cache, is_leaf=_is_names)
    return jax.device_put(cache, shardings)


def prefill_scope(attention, mesh: Mesh | None, rules: Mapping[str, Any] | None = None):
    """The context to trace a prefill with the prompt attention `attention` (`step.StepSpec`'s
    ``prefill_attention``) in: where it runs a kernel that is mapped over the mesh's shards itself
    (``needs_mesh``: Pallas splash, inside `jax.shard_map`; a Pallas call is not partitioned by
    GSPMD), the mesh and the decode rules as the activations' sharding
    (`partitioning.activation_sharding`); otherwise nothing (GSPMD propagates the inputs' shardings
    as before)."""
    if mesh is None or mesh.devices.size <= 1 or not getattr(attention, "needs_mesh", False):
        return contextlib.nullcontext()
    return activation_sharding(mesh, rules if rules is not None else decode_rules(mesh))
