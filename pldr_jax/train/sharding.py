"""Device mesh, logical-axis rules and shardings for training.

One code path for one device, many simulated CPU devices and multi-process (`jax.distributed`)
runs:

* `make_mesh(data, fsdp, tensor)` builds a `jax.sharding.Mesh` with the axes `MESH_AXES`
  ("data", "fsdp", "tensor"), all of `AxisType.Auto` (GSPMD propagation; no explicit-sharding
  type rules).  -1 for one axis takes the remaining devices.
* Every parameter leaf has logical axis names (`pldr_jax.params.logical_axes`); the one rule table
  (`pldr_jax.partitioning.RULES`, here `DEFAULT_RULES`) maps each name to a mesh axis (or None =
  replicated), for the activations and the decode cache too.  A dimension whose size
  is not divisible by its mesh axis falls back to replicated for that dimension (so e.g. 14 heads
  on a tensor axis of 4 still work), and a mesh axis is used at most once per array.
* The batch is sharded over ("data", "fsdp") on its leading axis: FSDP = data parallelism whose
  parameters and optimiser state are additionally split over the "fsdp" axis (XLA inserts the
  all-gathers / reduce-scatters).  "tensor" splits heads, FFN width and vocabulary.
* `init_train_state` runs `create_train_state` under `jax.jit(out_shardings=...)`: each device
  computes only its own shards; the full model never exists on one device.
* `shard_batch` turns each process's local batch into one global array
  (`jax.make_array_from_process_local_data`); process p's rows are global rows
  [p * B_local, (p + 1) * B_local).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ..config import PLDRConfig
from ..params import abstract_params, logical_axes
from ..partitioning import RULES, logical_to_spec, merged_rules
from .state import TrainState, create_train_state

__all__ = ["MESH_AXES", "BATCH_AXES", "DEFAULT_RULES", "make_mesh", "parse_mesh_shape", "logical_to_spec",
           "param_partition_specs", "tree_partition_specs", "param_shardings", "state_shardings",
           "state_shardings_for", "abstract_train_state",
           "init_train_state", "batch_sharding", "replicated", "shard_batch", "check_batch_size",
           "data_parallel_size", "describe_shardings"]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

#: the one rule table (`pldr_jax.partitioning.RULES`): parameters, activations and the decode cache
DEFAULT_RULES: dict[str, Any] = RULES


# --------------------------------------------------------------------------- mesh
def parse_mesh_shape(spec: str | Sequence[int] | None) -> tuple[int, int, int]:
    """"data,fsdp,tensor" (e.g. "-1,1,1", "2,4,1") or a sequence of up to 3 ints -> a 3-tuple."""
    if spec is None:
        return (-1, 1, 1)
    if isinstance(spec, str):
        try:
            vals = [int(v) for v in spec.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"mesh shape {spec!r} must be comma-separated ints 'data,fsdp,tensor'") from None
    else:
        vals = [int(v) for v in spec]
    if not 1 <= len(vals) <= 3:
        raise ValueError(f"mesh shape {spec!r} must give 1 to 3 sizes (data, fsdp, tensor)")
    vals += [1] * (3 - len(vals))
    return tuple(vals)  # type: ignore[return-value]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all devices of all processes) with axes `MESH_AXES`.

    One size may be -1 (the remaining devices).  The product must equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, tensor]
    for name, s in zip(MESH_AXES, sizes):
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or (s < 1 and s != -1):
            raise ValueError(f"mesh axis {name!r} size must be a positive int or -1, got {s!r}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got (data, fsdp, tensor) = {tuple(sizes)}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"{n} devices are not divisible by the fixed mesh axes (product {known}) of "
                             f"(data, fsdp, tensor) = {tuple(sizes)}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh (data, fsdp, tensor) = {tuple(sizes)} needs {math.prod(sizes)} devices, "
                         f"but {n} are available")
    types = (AxisType.Auto,) * 3
    if devices == list(jax.devices()):
        # let JAX order devices for the physical topology (TPU / GPU interconnect)
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=types)
    return Mesh(np.array(devices, dtype=object).reshape(sizes), MESH_AXES, axis_types=types)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: product of the mesh's "data" and "fsdp" axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# --------------------------------------------------------------------------- rules
def param_partition_specs(cfg: PLDRConfig, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None,
                          params: Any = None):
    """Tree of PartitionSpecs for the parameters of `cfg` (stacked layout); rules: entries replacing
    those of the one table (`pldr_jax.partitioning.RULES`)."""
    shapes = abstract_params(cfg) if params is None else params
    return tree_partition_specs(logical_axes(cfg), shapes, mesh, rules)


def tree_partition_specs(axes, shapes, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None):
    """Tree of PartitionSpecs of any tree of arrays (`shapes`: anything with ``.shape``) whose leaves'
    logical axis names are the tuples of `axes` (same structure, e.g. `params.logical_axes` or
    `heads.head_logical_axes`); rules: entries replacing those of the one table."""
    table = merged_rules(rules)
    return jax.tree_util.tree_map(lambda names, x: logical_to_spec(names, x.shape, mesh, table), axes, shapes,
                                  is_leaf=lambda t: isinstance(t, tuple) and all(isinstance(n, str) for n in t))


def param_shardings(cfg: PLDRConfig, mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """Tree of NamedShardings for the parameters of `cfg`."""
    specs = param_partition_specs(cfg, mesh, rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda s: isinstance(s, PartitionSpec))


def state_shardings(cfg: PLDRConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Mapping[str, Any] | None = None) -> TrainState:
    """TrainState of NamedShardings: params by the rules, optimiser moments like their
    parameters, step / rng / counters replicated."""
    p_sh = param_shardings(cfg, mesh, rules)
    return state_shardings_for(tx, jax.eval_shape(lambda: create_train_state(cfg, tx, 0)), p_sh, mesh)


def state_shardings_for(tx: optax.GradientTransformation, abstract_state: TrainState, p_sh, mesh: Mesh) -> TrainState:
    """TrainState of NamedShardings for a state of any params tree: params by `p_sh` (their
    NamedShardings), optimiser moments like their parameters (none for the leaves an
    `optax.masked` / `multi_transform` leaves out), step / rng / counters replicated."""
    rep = replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda v, s: v if isinstance(v, optax.MaskedNode) else s,
                                   abstract_state.opt_state, p_sh, transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))
    return TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep)


def abstract_train_state(cfg: PLDRConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: Mapping[str, Any] | None = None) -> TrainState:
    """TrainState of `jax.ShapeDtypeStruct`s carrying their target shardings (restore targets)."""
    abstract = jax.eval_shape(lambda: create_train_state(cfg, tx, 0))
    sh = state_shardings(cfg, tx, mesh, rules)
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)


_INIT_CACHE: dict = {}


def init_train_state(cfg: PLDRConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int = 0,
                     rules: Mapping[str, Any] | None = None,
                     compiler_options: Mapping[str, Any] | None = None) -> TrainState:
    """Initialise a TrainState directly into its sharded layout (jit with out_shardings).

    The numbers equal `create_train_state(cfg, tx, seed)` on one device (threefry is
    partitionable), whatever the mesh.  The compiled initialiser is cached per (cfg, tx, mesh).
    """
    key = (cfg, tx, mesh, tuple(sorted(merged_rules(rules).items())),
           tuple(sorted((compiler_options or {}).items())))
    init = _INIT_CACHE.get(key)
    if init is None:
        sh = state_shardings(cfg, tx, mesh, rules)
        init = jax.jit(lambda s: create_train_state(cfg, tx, s), out_shardings=sh,
                       compiler_options=dict(compiler_options) if compiler_options else None)
        if len(_INIT_CACHE) >= 8:
            _INIT_CACHE.pop(next(iter(_INIT_CACHE)))
        _INIT_CACHE[key] = init
    return init(jnp.asarray(seed, jnp.uint32))


# --------------------------------------------------------------------------- batches
def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch: B over ("data", "fsdp"), the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def check_batch_size(global_batch: int, mesh: Mesh, grad_accum: int = 1) -> None:
    """ValueError unless the global batch splits over processes, batch shards and micro-batches."""
    dp = data_parallel_size(mesh)
    pc = jax.process_count()
    if global_batch % pc:
        raise ValueError(f"global batch {global_batch} is not divisible by the {pc} processes")
    if global_batch % grad_accum:
        raise ValueError(f"global batch {global_batch} is not divisible by grad_accum={grad_accum}")
    if (global_batch // grad_accum) % dp:
        raise ValueError(f"micro-batch {global_batch // grad_accum} (global batch {global_batch} / grad_accum "
                         f"{grad_accum}) is not divisible by the {dp} batch shards (mesh data x fsdp)")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch {name: [B_local, ...]} -> global jax arrays [B_local * processes, ...]
    sharded by `batch_sharding` (works unchanged on one process)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def describe_shardings(tree) -> dict[str, str]:
    """{"path": "PartitionSpec(...)"} of a tree of NamedShardings / arrays (for logs and tests)."""
    out = {}
    for kp, leaf in jax.tree_util.tree_leaves_with_path(tree):
        s = getattr(leaf, "sharding", leaf)
        out[jax.tree_util.keystr(kp)] = str(getattr(s, "spec", s))
    return out
