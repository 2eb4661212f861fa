"""Pretraining: optimiser, sharding, train state, jitted steps, orbax checkpoints and the loop.

    from pldr_jax.train import TrainConfig, train
    result = train(pldr_jax.PLDRConfig.preset("small"), TrainConfig(workdir="runs/small", steps=1000))

Pieces: `make_optimizer` (clip + AdamW + warm-up/cosine, the reference recipe), `make_mesh` /
`DEFAULT_RULES` / `init_train_state` (sharding), `make_train_step` / `make_eval_step` (jitted,
sharded, donated), `CheckpointManager` / `load_params` (orbax), `train` (the loop, `loop.py`; CLI:
``pldr-jax train``) over its parts: `setup` (the run's shared state `TrainRun`, mesh, backend
choices, compiled steps), `resume` (collective restore, data position), `inputs` (tokenizer, data,
G_LM), `steploop`, `evaluation`, `saving` (checkpoint cadence), `reporting` (metrics.jsonl,
TensorBoard, progress bar, plot); `integrity` / `multihost` (checkpoint digests, timed
cross-process waits).
"""

from .checkpoint import CheckpointManager, latest_step, load_params, read_config
from .config import TrainConfig
from .loop import CheckpointSaveError, TrainResult, plot_history, read_metrics, train
from .multihost import CrossProcessTimeout, init_distributed
from .resume import ResumeError
from .optimizer import lr_schedule, make_optimizer, reference_lr_factor
from .sharding import (BATCH_AXES, DEFAULT_RULES, MESH_AXES, abstract_train_state, batch_sharding, init_train_state,
                       logical_to_spec, make_mesh, param_partition_specs, param_shardings, shard_batch,
                       state_shardings)
from .state import TrainState, create_train_state
from .step import StepOptions, loss_terms, make_eval_step, make_train_step, reduce_eval

__all__ = ["make_optimizer", "lr_schedule", "reference_lr_factor",
           "MESH_AXES", "BATCH_AXES", "DEFAULT_RULES", "make_mesh", "logical_to_spec", "param_partition_specs",
           "param_shardings", "state_shardings", "abstract_train_state", "batch_sharding", "shard_batch",
           "init_train_state", "TrainState", "create_train_state", "StepOptions", "loss_terms", "make_train_step",
           "make_eval_step", "reduce_eval", "CheckpointManager", "load_params", "read_config", "latest_step",
           "TrainConfig", "TrainResult", "train", "init_distributed", "read_metrics", "plot_history",
           "CheckpointSaveError", "CrossProcessTimeout", "ResumeError"]
