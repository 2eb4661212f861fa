"""The training loop: data -> sharded train steps -> validation, logging, orbax checkpoints, plot.

`train(model_cfg, train_cfg)` runs the same code on one CPU, on many (simulated) devices and on
many processes (call `init_distributed` first, on every process, with the same arguments):

1. `setup.setup_run`: the checks made before any work, the mesh, the backend choices (resolved
   once, with ``TrainConfig.backend_options``), the compiled steps, the checkpoint directory,
2. `resume.decide_resume`: with ``resume``, restore state, data position and RNG from the newest
   good checkpoint in ``workdir/checkpoints`` (onto the current mesh, whatever it was saved on),
3. `inputs.prepare_inputs`: the tokenizer (loaded, or trained on the data by process 0 into
   ``workdir/tokenizer.model``), the grain pipelines (each process reads its own shard; global
   batch = ``batch_size``), the G_LM of a predefined-G model; `setup.record_run_config`,
4. `resume.restore_position` or `setup.init_state`: the state the loop starts from,
5. `steploop.run_steps`: one jitted step per batch; every ``log_every`` steps a JSONL line in
   ``workdir/metrics.jsonl`` (loss, accuracy, lr, grad norm, tokens/s, tokens/s per device, MFU,
   goodput, the step-time split) and the progress bar (`reporting.Reporter`); every ``eval_every``
   steps validation loss / accuracy / perplexity (`evaluation.ValidationEval`); the dynamics probe
   and lm-eval tasks when asked (`operations.OperationsTasks`); every ``save_every`` steps an
   asynchronous checkpoint (the newest ``keep_checkpoints`` kept; `saving.CheckpointCadence`); at
   the end a final validation and checkpoint.  SIGTERM / SIGINT / ``max_runtime_s`` stop the loop
   after the step in flight with a checkpoint of it on every process (`operations.RunOperations`),
6. `reporting.plot_run`: ``workdir/loss_curve.png`` (and ``dynamics.png``).

Only process 0 writes logs, plots and the tokenizer; every process takes part in checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Mapping, Sequence

from ..config import PLDRConfig
from .config import TrainConfig
from .evaluation import ValidationEval, evaluate
from .inputs import make_g_lm, prepare_datasets, prepare_inputs, prepare_tokenizer
from .multihost import init_distributed
from .operations import OperationsTasks, RunOperations
from .reporting import Reporter, plot_history, plot_run, read_metrics
from .resume import decide_resume, restore_position
from .saving import CheckpointCadence, CheckpointSaveError
from .setup import TrainRun, init_state, record_run_config, setup_run
from .steploop import run_steps

__all__ = ["TrainConfig", "TrainResult", "CheckpointSaveError", "train", "train_result", "init_distributed", "prepare_tokenizer",
           "prepare_datasets", "make_g_lm", "plot_history", "read_metrics", "evaluate"]


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    state: the final TrainState (sharded). model_cfg: the model config trained (dtype applied).
    step_metrics: one dict per step run in this call ({"step", "loss", "accuracy", "lr", ...}).
    evals: validation results [{"step", "val_loss", "val_accuracy", "val_perplexity"}].
    paths: {"workdir", "checkpoints", "metrics", "plot", "tokenizer", "g_lm"} (str or None).
    wall_s: seconds of this call; start_step / end_step: optimiser steps before / after.
    g_lm: the predefined G_LM used (None for learned G).
    resumed_from: the checkpoint step this call resumed from (None: started afresh).
    quarantined: [{"step", "moved_to", "problems"}] of checkpoints proven corrupt while resuming and
      moved aside (never deleted).  notes: what resuming had to say (no digest, data re-sharded).
    stopped: "SIGTERM" / "SIGINT" / "max-runtime" when a stop request ended the run at end_step (its
      checkpoint written), else None.
    """
    state: Any
    model_cfg: PLDRConfig
    step_metrics: list
    evals: list
    paths: dict
    wall_s: float
    start_step: int
    end_step: int
    g_lm: Any = None
    tokenizer: Any = None
    first_step_s: float | None = None
    resumed_from: int | None = None
    quarantined: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    stopped: str | None = None

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.step_metrics]


def train(model_cfg: PLDRConfig, tcfg: TrainConfig, *, train_data: Iterable | None = None,
          val_data: Iterable | None = None, tokenizer=None, documents: Sequence[str] | None = None,
          devices: Sequence | None = None, log=print,
          compiler_options: Mapping[str, Any] | None = None) -> TrainResult:
    """Train `model_cfg` with `tcfg` (see the module docstring).

    train_data / val_data: optional replacements for the grain pipelines -- a `PretrainDataset`
    or any iterable of host-local batches {"inputs", "targets"} int32 [batch_size / processes, L]
    (an iterator with get_state/set_state is checkpointed too).  tokenizer / documents: use these
    instead of loading / training a tokenizer and reading `tcfg.data`.  devices: mesh devices
    (default all).  log: a print-like function for status lines (process 0 only).
    compiler_options: XLA options for the jitted steps (see `make_train_step`).
    The compiled steps are cached per (model, optimiser, step options, mesh, compiler options,
    backend choices): repeated calls in one process (resume, notebooks, tests) do not recompile.
    """
    run = setup_run(model_cfg, tcfg, devices=devices, log=log, compiler_options=compiler_options)
    run.resume_point = decide_resume(run)
    saver = CheckpointCadence(run)
    prepare_inputs(run, train_data, val_data, tokenizer, documents)
    ops = RunOperations(run.model_cfg, tcfg, run.workdir, mesh=run.mesh, tokenizer=run.tokenizer, g_lm=run.g_dev,
                        log=run.log)
    if run.resume_point is not None:
        restore_position(run)
    else:
        init_state(run)
    record_run_config(run, {"throughput": ops.run_summary()})  # after the data position is settled: a refused
    ops.batches = run.batches                                  # resume writes nothing
    reporter = Reporter(run)
    reporter.row_fields.append(ops.row_fields)
    for w in reporter.writers:
        if hasattr(w, "write_config"):
            w.write_config(run.config_record, run.start_step)
    with ops:
        run_steps(run, reporter, saver, periodic=[ValidationEval(run, reporter), OperationsTasks(ops, run, reporter)],
                  ops=ops)
    return train_result(run, reporter, plot_run(run))


def train_result(run: TrainRun, reporter: Reporter, plot_path) -> TrainResult:
    """The `TrainResult` of a finished run (its reporter's metrics, `plot_path`: the plot written)."""
    point, workdir = run.resume_point, run.workdir
    paths = {"workdir": str(workdir), "checkpoints": str(run.ckpt_dir), "metrics": str(workdir / "metrics.jsonl"),
             "plot": str(plot_path) if plot_path else None, "tokenizer": run.tok_path,
             "g_lm": str(run.g_path) if run.g_path else None}
    return TrainResult(state=run.state, model_cfg=run.model_cfg, step_metrics=reporter.step_metrics,
                       evals=reporter.evals, paths=paths, wall_s=time.perf_counter() - run.t_start,
                       start_step=run.start_step, end_step=run.step, g_lm=run.g_lm, tokenizer=run.tokenizer,
                       first_step_s=reporter.first_step_s, resumed_from=point.step if point else None,
                       quarantined=point.quarantined if point else [], notes=point.notes if point else [],
                       stopped=run.stopped)
