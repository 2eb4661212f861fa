"""Logical sharding constraints on activations (as MaxText's `nn.with_logical_constraint`).

`constrain(x, ("batch", "length", "heads", None))` pins an activation's sharding by logical axis
names, mapped to mesh axes by `ACTIVATION_RULES`: the batch over ("data", "fsdp"), heads, FFN width
and vocabulary over "tensor", the rest replicated.  Without them GSPMD propagates the *weights'*
FSDP sharding into the activations (an embedding dimension split over "fsdp"), and a step gathers
or all-reduces activation-sized tensors.  It applies only while a mesh is set
(``jax.sharding.use_abstract_mesh`` while tracing, as `train.step.make_train_step` does); otherwise, and
for any axis whose mesh size is 1 or does not divide the dimension, it leaves x as it is.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import PartitionSpec

__all__ = ["ACTIVATION_RULES", "activation_spec", "constrain", "split_size", "splits"]

#: logical activation axis -> mesh axes (tuple) or None (replicated).
ACTIVATION_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": None,
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}


def activation_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape) -> PartitionSpec:
    """PartitionSpec for an activation of `shape` with logical axis `names` on a mesh whose axis
    sizes are `mesh_shape` ({axis: size}); axes of size 1, absent, used already or not dividing the
    dimension are dropped."""
    used: set[str] = set()
    out = []
    for name, size in zip(names, shape):
        axes = [a for a in (ACTIVATION_RULES.get(name) or ()) if name is not None
                and mesh_shape.get(a, 1) > 1 and a not in used]
        while axes and size % math.prod(mesh_shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x with its sharding constrained by logical `names` (one per dimension) under the current
    mesh (`jax.sharding.use_abstract_mesh`); x unchanged when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} axis names for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, activation_spec(names, x.shape, dict(mesh.shape)))


def split_size(name: str) -> int:
    """How many ways the logical activation axis `name` is split under the current mesh (the product
    of its mesh axes' sizes; 1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    sizes = dict(mesh.shape)
    return math.prod(sizes.get(a, 1) for a in (ACTIVATION_RULES.get(name) or ()))


def splits(name: str) -> bool:
    """Whether the logical activation axis `name` is split over mesh axes of size > 1 under the
    current mesh (e.g. splits("heads") with a tensor axis); False without a mesh."""
    return split_size(name) > 1
