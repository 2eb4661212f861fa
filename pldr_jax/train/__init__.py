"""Pretraining: optimiser, sharding, train state, jitted steps, orbax checkpoints and the loop."""

from .optimizer import lr_schedule, make_optimizer, reference_lr_factor
from .sharding import (DEFAULT_RULES, MESH_AXES, batch_sharding, init_train_state, make_mesh, param_shardings,
                       shard_batch, state_shardings)
from .state import TrainState, create_train_state
from .step import StepOptions, make_eval_step, make_train_step, reduce_eval

__all__ = ["make_optimizer", "lr_schedule", "reference_lr_factor", "MESH_AXES", "DEFAULT_RULES", "make_mesh",
           "param_shardings", "state_shardings", "batch_sharding", "shard_batch", "init_train_state",
           "TrainState", "create_train_state", "StepOptions", "make_train_step", "make_eval_step", "reduce_eval"]
