"""`TrainConfig`: everything about a training run except the model (a frozen, validated dataclass).

Its own module so that checkpoint reading, the CLI and the loop share it without importing the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..backend import check_options
from ..config import reject_unknown_fields
from .faults import FaultPolicy
from .multihost import DEFAULT_TIMEOUT_S
from .optimizer import lr_schedule, make_optimizer
from .step import StepOptions

__all__ = ["TrainConfig"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model (a `PLDRConfig`).

    Run: workdir (outputs), steps (optimiser updates in total; a resumed run continues up to it),
      seed (parameter init and step RNG), resume (continue from the newest checkpoint in
      workdir/checkpoints), overwrite (delete a previous run's checkpoints and logs in workdir).
    Data: data (source spec for `pldr_jax.data.make_source`: "builtin" = the embedded corpus, a
      path, "jsonl:PATH:FIELD", ..., tokenized in memory; "tokens:DIR" = a directory made by
      `pldr-jax data prepare`; "stream:SPEC" = SPEC streamed, tokenized on the fly), tokenizer (a
      sentencepiece .model; None = the prepared directory's, or one trained with
      `vocab_size` pieces on the training data), seq_len, batch_size (global, all processes),
      data_mode ("pack" | "pad" | "nopad"), validation_fraction (documents held out), data_seed.
    Optimiser (the reference recipe): learning_rate (peak), warmup_steps, total_steps (end of the
      cosine decay; None = steps), alpha (final lr = alpha * peak), weight_decay, clip_value
      (per-element clip, reference 1.0; None = off), clip_norm (global-norm clip; None = off).
    Loss / compute: dag_coeffs (c_A, c_P, c_G), grad_accum (micro-batches per update), dtype
      (override of the model's compute dtype: "float32" | "bfloat16"), remat, unroll_layers (see
      `StepOptions`; None = the platform's default, `pldr_jax.backend`), pad_aware_A,
      g_source (predefined-G models: "identity", "random_normal[:scale]", "uniform[:lo:hi]",
      "external:<file.npz>"; None = the config's custom_G_type default).
    Backend: backend_options -- overrides of the platform's `pldr_jax.backend.BackendChoices`
      ({field: value} or (field, value) pairs, e.g. {"kernels": "xla", "attention_block": 128};
      stored as sorted pairs; CLI ``--backend-option KEY=VALUE``), resolved once per run and part
      of the compiled steps' cache key.
    Mesh: mesh = (data, fsdp, tensor) sizes, one may be -1 (= the remaining devices).
    Logging / eval / checkpoints: log_every, eval_every (0 = only at the end), eval_batches
      (per evaluation, None = the whole validation split), save_every (0 = only at the end),
      keep_checkpoints, async_checkpoint, progress (tqdm bar), plot, tensorboard (if installed).
    Faults: nonfinite ("skip": a step with a non-finite loss / gradient is not applied, counted and
      logged; "stop": save the last good state and raise `NonFiniteError`; "off": the reference,
      no check), max_skipped (with "skip": stop once more than this many steps were skipped),
      sync_timeout_s (the longest any wait across processes may take -- barriers, agreeing on the
      checkpoint to resume from -- before the run stops with a message naming the missing processes).
    """
    workdir: str = "runs/pldr"
    steps: int = 1000
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    data: str = "builtin"
    tokenizer: str | None = None
    vocab_size: int = 4000
    seq_len: int = 256
    batch_size: int = 8
    data_mode: str = "pack"
    validation_fraction: float = 0.05
    data_seed: int = 0
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int | None = None
    alpha: float = 0.1
    weight_decay: float = 0.1
    clip_value: float | None = 1.0
    clip_norm: float | None = None
    dag_coeffs: tuple[float, float, float] = (0.0, 0.0, 0.0)
    grad_accum: int = 1
    dtype: str | None = None
    remat: bool | str | None = None
    unroll_layers: bool | None = None
    pad_aware_A: bool = False
    g_source: str | None = None
    mesh: tuple[int, int, int] = (-1, 1, 1)
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int | None = 20
    save_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    progress: bool = True
    plot: bool = True
    tensorboard: bool = True
    nonfinite: str = "skip"
    max_skipped: int | None = None
    sync_timeout_s: float = DEFAULT_TIMEOUT_S
    backend_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        opts = self.backend_options
        pairs = opts.items() if isinstance(opts, Mapping) else [tuple(p) for p in opts]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"TrainConfig.backend_options must be a mapping or (key, value) pairs, got {opts!r}")
        object.__setattr__(self, "backend_options", tuple(sorted(check_options(dict(pairs)).items())))
        object.__setattr__(self, "dag_coeffs", tuple(float(c) for c in self.dag_coeffs))
        object.__setattr__(self, "mesh", tuple(int(m) for m in self.mesh))
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "log_every", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        for name in ("eval_every", "save_every", "warmup_steps", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"TrainConfig.total_steps must be >= 1 or None, got {self.total_steps!r}")
        if self.warmup_steps > self.schedule_steps:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) exceeds the schedule length "
                             f"({self.schedule_steps} = total_steps or steps)")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype must be None, 'float32' or 'bfloat16', got {self.dtype!r}")
        if len(self.mesh) != 3:
            raise ValueError(f"TrainConfig.mesh must be (data, fsdp, tensor), got {self.mesh!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if isinstance(self.sync_timeout_s, bool) or not isinstance(self.sync_timeout_s, (int, float)) \
                or not self.sync_timeout_s > 0:
            raise ValueError(f"TrainConfig.sync_timeout_s must be a number of seconds > 0, got {self.sync_timeout_s!r}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"TrainConfig.eval_batches must be >= 1 or None, got {self.eval_batches!r}")
        StepOptions(dag_coeffs=self.dag_coeffs, grad_accum=self.grad_accum)  # validates
        self.fault_policy()  # validates nonfinite / max_skipped

    @property
    def schedule_steps(self) -> int:
        return self.total_steps if self.total_steps is not None else self.steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        reject_unknown_fields(cls, d)
        return cls(**dict(d))

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def optimizer(self):
        """(optax transformation, schedule) of this config."""
        tx = make_optimizer(self.learning_rate, self.warmup_steps, self.schedule_steps, self.alpha,
                            self.weight_decay, self.clip_value, clip_norm=self.clip_norm)
        return tx, lr_schedule(self.learning_rate, self.warmup_steps, self.schedule_steps, self.alpha)

    def step_options(self) -> StepOptions:
        return StepOptions(dag_coeffs=self.dag_coeffs, grad_accum=self.grad_accum, pad_aware_A=self.pad_aware_A,
                           remat=self.remat, unroll_layers=self.unroll_layers,
                           nonfinite_guard=self.fault_policy().guard)

    def fault_policy(self) -> FaultPolicy:
        return FaultPolicy(nonfinite=self.nonfinite, max_skipped=self.max_skipped)
