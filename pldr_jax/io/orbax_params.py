"""Params-only restore of a `pldr_jax.train` orbax checkpoint, for inference and conversion.

A training checkpoint step folder holds the items "state" (the TrainState pytree: step, params,
opt_state, rng), "config" (JSON: {"model": PLDRConfig dict, "train": TrainConfig dict, "g_lm",
"tokenizer", ...}) and "data" (the iterator position).  `restore_params` reads the model config and
restores only the ``params`` subtree of "state" (orbax partial restore: `ocp.args.PyTreeRestore`
with a params-only target and ``partial_restore=True``), with shapes from
`params.abstract_params(cfg)`.  No optimiser is rebuilt and no optimiser moment is read (a third of
the memory of the full state), and the stored training config is never parsed, so a checkpoint
whose TrainConfig had other fields (older or newer code) still loads.

This module sits below `pldr_jax.train` and never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ..config import PLDRConfig
from ..params import abstract_params

__all__ = ["checkpoint_steps", "read_run_config", "restore_params"]

STATE_ITEM, CONFIG_ITEM, PARAMS_KEY = "state", "config", "params"


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps saved in a CheckpointManager directory (sorted; [] when none)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / STATE_ITEM).is_dir())


def _step_dir(directory: str | os.PathLike, step: int | None) -> Path:
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {directory} (no <step>/{STATE_ITEM} folders)")
    if step is None:
        step = steps[-1]
    if int(step) not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory} (available: {steps})")
    return Path(directory).absolute() / str(int(step))


def read_run_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON config item stored with checkpoint `step` (default: the latest) of a
    CheckpointManager `directory`, as a plain dict."""
    d = _step_dir(directory, step) / CONFIG_ITEM
    if not d.is_dir():
        raise FileNotFoundError(f"{d.parent}: the checkpoint has no {CONFIG_ITEM!r} item (not written by "
                                f"pldr_jax.train?)")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
        return dict(ck.restore(d, args=ocp.args.JsonRestore()))


def _as_shardings(shardings: Any, abstract: Any) -> Any:
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda _: shardings, abstract)
    return shardings


def restore_params(directory: str | os.PathLike, step: int | None = None, *,
                   shardings: Any = None) -> tuple[PLDRConfig, dict, dict]:
    """(model config, params, run config dict) of checkpoint `step` (default: the latest) of a
    `pldr_jax.train` CheckpointManager `directory` (its `checkpoints/` folder).

    Restores the params subtree only (stacked layout, float32 master weights as saved) onto
    `shardings`: None (the first local device), one `jax.sharding.Sharding` for every leaf, or a
    pytree of shardings with the params' structure (e.g. `train.sharding.param_shardings`).
    """
    step_dir = _step_dir(directory, step)
    conf = read_run_config(directory, int(step_dir.name))
    if "model" not in conf:
        raise ValueError(f"{step_dir}: the checkpoint config has no 'model' entry (not written by pldr_jax.train?)")
    cfg = PLDRConfig.from_dict(conf["model"])
    abstract = abstract_params(cfg)
    shard_tree = _as_shardings(shardings, abstract)
    target = {PARAMS_KEY: jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard_tree)}
    restore_args = {PARAMS_KEY: jax.tree_util.tree_map(
        lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape, dtype=a.dtype), abstract, shard_tree)}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ck:
        out = ck.restore(step_dir / STATE_ITEM, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    return cfg, out[PARAMS_KEY], conf
