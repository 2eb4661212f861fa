"""Setting a training run up: the state its parts share (`TrainRun`), the checks made before any
work, the mesh, the backend choices, the compiled steps, the checkpoint directory, a fresh state.

`setup_run` resolves the backend choices once (`pldr_jax.backend.choices` for the mesh's platform
with ``TrainConfig.backend_options``) and gets the jitted steps from a cache keyed by everything
they depend on -- model, optimiser, step options, mesh, compiler options and the resolved backend
choices -- so repeated `train` calls in one process (resume, notebooks, tests) do not recompile,
and a changed backend option (or ``PLDR_JAX_KERNELS``) never reuses a step compiled for another.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax

from ..backend import BackendChoices, choices, platform_of
from ..config import PLDRConfig
from . import multihost
from .config import TrainConfig
from .faults import CheckpointDirError, NonFiniteMonitor, estimate_checkpoint_bytes, preflight_checkpoint_dir
from .sharding import abstract_train_state, check_batch_size, init_train_state, make_mesh
from .step import make_eval_step, make_train_step

__all__ = ["CompiledSteps", "TrainRun", "compiled_steps", "resolve_backend", "setup_run", "clear_run",
           "record_run_config", "init_state"]


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The optimiser and the jitted steps of one (model, optimiser, step options, mesh, backend)."""
    tx: Any
    schedule: Callable
    train_step: Callable
    eval_step: Callable


@dataclasses.dataclass
class TrainRun:
    """What the parts of one `train` call share.  Set by `setup_run` (configuration, mesh, backend,
    steps, directories), `inputs.prepare_inputs` (tokenizer, data, G_LM), `record_run_config`,
    `resume.restore_position` / `init_state` (state, start step); `steploop.run_steps` advances
    ``state`` and ``step``.  main: this is process 0 (the one that writes logs, plots, the tokenizer).
    stop_checks: callables ``f(step) -> str | None`` asked after every step; the first message
    returned ends the loop there (logged), and the run finishes as at its last step (final
    validation and checkpoint).  All processes must answer alike."""
    model_cfg: PLDRConfig
    tcfg: TrainConfig
    workdir: Path
    ckpt_dir: Path
    mesh: Any
    backend: BackendChoices
    steps: CompiledSteps
    abstract: Any
    monitor: NonFiniteMonitor
    log: Callable[..., Any]
    main: bool
    t_start: float
    compiler_options: Mapping[str, Any] | None = None
    stop_checks: list = dataclasses.field(default_factory=list)
    # inputs (`inputs.prepare_inputs`)
    tokenizer: Any = None
    tok_path: str | None = None
    batches: Any = None
    checkpointable_data: bool = False
    val_data: Any = None
    g_lm: Any = None
    g_path: Path | None = None
    g_dev: Any = None
    config_record: dict | None = None
    # state (`resume` / `init_state`), advanced by the step loop
    resume_point: Any = None
    state: Any = None
    start_step: int = 0
    step: int = 0


_STEP_CACHE: dict = {}


def resolve_backend(tcfg: TrainConfig, mesh) -> BackendChoices:
    """The backend choices of the devices of `mesh` with `tcfg.backend_options` applied."""
    return choices(platform_of(mesh), dict(tcfg.backend_options))


def compiled_steps(model_cfg: PLDRConfig, tcfg: TrainConfig, mesh, backend: BackendChoices,
                   compiler_options: Mapping[str, Any] | None = None) -> CompiledSteps:
    """The optimiser and jitted steps for this model / optimiser / mesh / backend, cached."""
    opt_fields = (tcfg.learning_rate, tcfg.warmup_steps, tcfg.schedule_steps, tcfg.alpha, tcfg.weight_decay,
                  tcfg.clip_value, tcfg.clip_norm)
    copts = tuple(sorted((compiler_options or {}).items()))
    key = (model_cfg, opt_fields, tcfg.step_options(), mesh, copts, backend)
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= 8:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        tx, schedule = tcfg.optimizer()
        opts = tcfg.step_options()
        _STEP_CACHE[key] = CompiledSteps(
            tx, schedule,
            make_train_step(model_cfg, tx, schedule, opts=opts, mesh=mesh, compiler_options=compiler_options,
                            backend=backend),
            make_eval_step(model_cfg, opts=opts, mesh=mesh, compiler_options=compiler_options, backend=backend))
    return _STEP_CACHE[key]


def setup_run(model_cfg: PLDRConfig, tcfg: TrainConfig, *, devices: Sequence | None = None, log=print,
              compiler_options: Mapping[str, Any] | None = None) -> TrainRun:
    """Everything that can be checked before any work -- the configs, the mesh and the batch over it,
    the checkpoint directory (room on the disk; with ``overwrite`` the previous run's outputs removed)
    -- and the run's mesh, backend choices and compiled steps.  Collective: every process stops on a
    problem any of them found."""
    t_start = time.perf_counter()
    main = jax.process_index() == 0
    log = log if main else (lambda *a, **k: None)
    if tcfg.dtype is not None and tcfg.dtype != model_cfg.dtype:
        model_cfg = model_cfg.replace(dtype=tcfg.dtype)
    workdir = Path(tcfg.workdir).absolute()
    if tcfg.overwrite and tcfg.resume:
        raise ValueError("overwrite and resume are mutually exclusive")
    mesh = make_mesh(*tcfg.mesh, devices=devices)
    check_batch_size(tcfg.batch_size, mesh, tcfg.grad_accum)
    backend = resolve_backend(tcfg, mesh)
    steps = compiled_steps(model_cfg, tcfg, mesh, backend, compiler_options)
    abstract = abstract_train_state(model_cfg, steps.tx, mesh)
    ckpt_dir = workdir / "checkpoints"
    problem = None
    if main:
        try:
            if tcfg.overwrite:
                clear_run(workdir, keep=[tcfg.tokenizer])
            preflight_checkpoint_dir(ckpt_dir, estimate_checkpoint_bytes(abstract))
            workdir.mkdir(parents=True, exist_ok=True)
        except CheckpointDirError as e:
            problem = str(e)
    problem = multihost.all_gather_json("pldr_workdir", problem, tcfg.sync_timeout_s)[0]  # every process stops on it
    if problem:
        raise CheckpointDirError(problem)
    return TrainRun(model_cfg=model_cfg, tcfg=tcfg, workdir=workdir, ckpt_dir=ckpt_dir, mesh=mesh, backend=backend,
                    steps=steps, abstract=abstract, monitor=NonFiniteMonitor(tcfg.fault_policy(), log=log), log=log,
                    main=main, t_start=t_start, compiler_options=compiler_options)


def clear_run(workdir: Path, keep: Sequence[str | None] = ()) -> None:
    """Remove a previous run's outputs from `workdir` (not the paths in `keep`)."""
    keep_paths = {Path(k).absolute() for k in keep if k}
    for name in ("checkpoints", "metrics.jsonl", "loss_curve.png", "tensorboard", "tokenizer.model",
                 "tokenizer.vocab", "g_lm.npy", "run_config.json"):
        p = workdir / name
        if p.absolute() in keep_paths:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def record_run_config(run: TrainRun) -> None:
    """The run's configuration record (saved with every checkpoint; ``workdir/run_config.json``)."""
    run.config_record = {"model": run.model_cfg.to_dict(), "train": run.tcfg.to_dict(), "tokenizer": run.tok_path,
                         "g_lm": str(run.g_path) if run.g_path else None, "mesh": dict(run.mesh.shape),
                         "process_count": jax.process_count()}
    if run.main:
        (run.workdir / "run_config.json").write_text(json.dumps(run.config_record, indent=2))


def init_state(run: TrainRun) -> None:
    """A freshly initialised, sharded train state (step 0)."""
    if run.tcfg.resume:
        run.log(f"no checkpoint in {run.ckpt_dir}: starting from step 0")
    run.state = init_train_state(run.model_cfg, run.steps.tx, run.mesh, run.tcfg.seed,
                                 compiler_options=run.compiler_options)
    run.start_step = run.step = int(run.state.step)
