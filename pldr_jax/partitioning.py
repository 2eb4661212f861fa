"""The one logical sharding rule table, for parameters, activations and the decoding cache.

Every array pldr_jax places or constrains on a device mesh names its axes logically: parameters by
`pldr_jax.params.logical_axes` ("embed", "heads", "mlp", ...), activations by `constrain` calls in
the model ("batch", "length", "act_embed", "heads", ...), the decode cache by
`decode.cache.cache_logical_axes` ("batch", "attn_heads", "kv_len", ...).  `RULES` maps each name to
mesh axes (the mesh of `train.sharding.make_mesh`: "data", "fsdp", "tensor"), and `logical_to_spec`
turns names into a `PartitionSpec` for all three; a user's `rules` (a full table or overrides merged
into `RULES` by `merged_rules`) apply to all three alike.

* The batch is split over ("data", "fsdp"); heads, FFN width and vocabulary over "tensor".
* The parameters' model width ("embed") is split over "fsdp" (FSDP: parameters and optimiser state
  sharded, gathered per layer); the activations' model width ("act_embed") is not: without it
  GSPMD propagates the *weights'* FSDP sharding into the activations, and a step gathers or
  all-reduces activation-sized tensors (as MaxText's ``activation_embed``).
* A dimension not divisible by its mesh axes, a mesh axis of size 1, absent or already used by the
  array: that axis is dropped (14 heads on a tensor axis of 4 are replicated, and run).

`constrain(x, names)` pins an activation's sharding (as MaxText's `nn.with_logical_constraint`)
while a mesh is set (`activation_sharding(mesh, rules)` while tracing, as the training step does);
otherwise it leaves x as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

__all__ = ["RULES", "merged_rules", "logical_to_spec", "activation_sharding", "active_rules_key", "rules_scope",
           "constrain", "split_size", "splits"]

#: logical axis name -> mesh axis (str, tuple of str, or None = replicated).
RULES: dict[str, Any] = {
    # activations and the batch of every array
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    # parameters
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "attn_heads": "tensor",
    "norm": None,
    "dk": None,
    "dk_out": None,
    "a_mlp": None,
    "res": None,
    "glu": None,
    # the decode cache
    "kv_len": None,
}


def merged_rules(rules: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`RULES` with the entries of `rules` (None: `RULES` itself)."""
    return dict(RULES) if not rules else {**RULES, **rules}


def _as_tuple(axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Any = None,
                    rules: Mapping[str, Any] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names` (one per dimension, None = replicated).

    rules: the table (None = `RULES`).  With `mesh` (anything with a ``.shape`` mapping of axis sizes:
    a Mesh or an AbstractMesh) mesh axes absent from it, of size 1 (with `shape`) or already used by
    the array are dropped, and with `shape` a dimension not divisible by the product of its mesh
    axes' sizes loses its innermost axes until it divides.  Unknown logical names raise ValueError
    (every axis needs a rule, even if None).
    """
    rules = RULES if rules is None else rules
    sizes = None if mesh is None else dict(mesh.shape)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}; rules cover {sorted(rules)}")
        axes = [a for a in _as_tuple(rules[name]) if a not in used and (sizes is None or a in sizes)]
        if sizes is not None and shape is not None:
            axes = [a for a in axes if sizes[a] > 1]
            while axes and shape[i] % math.prod(sizes[a] for a in axes):
                axes.pop()  # drop the innermost axis until the dimension divides
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar("pldr_jax_activation_rules", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules: Mapping[str, Any] | None = None):
    """While tracing inside: `constrain` pins activations to `mesh` (a Mesh; its abstract mesh is
    set with ``jax.sharding.use_abstract_mesh``) by `rules` (entries replacing those of `RULES`;
    None = `RULES`)."""
    token = _ACTIVE_RULES.set(None if rules is None else merged_rules(rules))
    try:
        with jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh)):
            yield
    finally:
        _ACTIVE_RULES.reset(token)


def _rules() -> Mapping[str, Any]:
    return _ACTIVE_RULES.get() or RULES


def active_rules_key() -> tuple | None:
    """The rule table `activation_sharding` set (None: `RULES`) as a hashable value: a static
    argument of a jitted function that calls `constrain`, so a trace under other rules is not reused
    from JAX's cache (`model.forward`)."""
    rules = _ACTIVE_RULES.get()
    return None if rules is None else tuple(sorted((k, v if not isinstance(v, list) else tuple(v))
                                                   for k, v in rules.items()))


@contextlib.contextmanager
def rules_scope(key: tuple | None):
    """Inside: `constrain` uses the table of `active_rules_key` value `key` (None: `RULES`); the
    mesh is left as it is."""
    token = _ACTIVE_RULES.set(None if key is None else dict(key))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x with its sharding constrained by logical `names` (one per dimension) under the current
    mesh (`activation_sharding`); x unchanged when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} axis names for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, _rules()))


def split_size(name: str) -> int:
    """How many ways the logical axis `name` is split under the current mesh (the product of its
    mesh axes' sizes; 1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    sizes = dict(mesh.shape)
    return math.prod(sizes.get(a, 1) for a in _as_tuple(_rules().get(name)))


def splits(name: str) -> bool:
    """Whether the logical axis `name` is split over mesh axes of size > 1 under the current mesh
    (e.g. splits("heads") with a tensor axis); False without a mesh."""
    return split_size(name) > 1
