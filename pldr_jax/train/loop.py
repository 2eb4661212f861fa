"""The training loop: data -> sharded train steps -> validation, logging, orbax checkpoints, plot.

`train(model_cfg, train_cfg)` runs the same code on one CPU, on many (simulated) devices and on
many processes (call `init_distributed` first, on every process, with the same arguments):

1. tokenizer (loaded, or trained on the data by process 0 into ``workdir/tokenizer.model``),
2. the grain pipelines (each process reads its own shard; global batch = ``batch_size``),
3. mesh + sharded initialisation, or ``resume``: restore state, data position and RNG from the
   newest checkpoint in ``workdir/checkpoints`` (onto the current mesh, whatever it was saved on),
4. the loop: one jitted step per batch; every ``log_every`` steps a JSONL line in
   ``workdir/metrics.jsonl`` (loss, accuracy, lr, grad norm, tokens/s) and the progress bar;
   every ``eval_every`` steps validation loss / accuracy / perplexity; every ``save_every`` steps
   an asynchronous checkpoint (the newest ``keep_checkpoints`` kept),
5. at the end: a final checkpoint and validation, ``workdir/loss_curve.png``.

Only process 0 writes logs, plots and the tokenizer; every process takes part in checkpoints.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from ..config import PLDRConfig
from . import multihost
from .checkpoint import CheckpointManager, CheckpointTimeout
from .config import TrainConfig
from .faults import CheckpointDirError, NonFiniteMonitor, estimate_checkpoint_bytes, preflight_checkpoint_dir
from .integrity import error_summary
from .multihost import init_distributed
from .resume import ResumeError, checkpoint_steps, restore_latest_good
from .sharding import (abstract_train_state, check_batch_size, init_train_state, make_mesh, replicated,
                       shard_batch)
from .step import make_eval_step, make_train_step, reduce_eval

__all__ = ["TrainConfig", "TrainResult", "CheckpointSaveError", "train", "init_distributed", "prepare_tokenizer",
           "prepare_datasets", "make_g_lm", "plot_history", "read_metrics"]


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

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.step_metrics]


def _barrier(name: str, timeout_s: float = multihost.DEFAULT_TIMEOUT_S) -> None:
    multihost.barrier(name, timeout_s)


# --------------------------------------------------------------------------- data
def prepare_tokenizer(tcfg: TrainConfig, workdir: Path | None = None, documents: Sequence[str] | None = None):
    """The run's tokenizer: `tcfg.tokenizer` if given, else ``workdir/tokenizer.model`` if present
    (resume), else one trained with `tcfg.vocab_size` pieces on the data (process 0 trains and
    saves; the others load it after a barrier).  ``tokens:DIR`` data: the tokenizer the directory
    was prepared with (``DIR/tokenizer.model``) unless `tcfg.tokenizer` is given (then its hash
    must match: checked in `prepare_datasets`).  ``stream:SPEC`` data needs `tcfg.tokenizer` (a
    streamed corpus is never loaded whole to train one)."""
    from ..data import Tokenizer, make_source
    from ..data.shards import TOKENIZER
    if tcfg.tokenizer:
        return Tokenizer.load(tcfg.tokenizer)
    data = tcfg.data if documents is None else None
    if isinstance(data, str) and data.startswith("tokens:"):
        from ..data.shards import PreparedTokens
        return Tokenizer.load(PreparedTokens(data[len("tokens:"):]).path / TOKENIZER)  # refuses a bad directory
    workdir = Path(tcfg.workdir if workdir is None else workdir)
    path = workdir / "tokenizer.model"
    if path.exists() and not tcfg.overwrite:
        return Tokenizer.load(path)
    if isinstance(data, str) and data.startswith("stream:"):
        raise ValueError(f"--data {data} needs --tokenizer MODEL: a streamed corpus is never loaded whole to train "
                         "a tokenizer on (train one on a sample, or prepare the data with pldr-jax data prepare)")
    if jax.process_index() == 0:
        docs = documents if documents is not None else list(make_source(tcfg.data))
        workdir.mkdir(parents=True, exist_ok=True)
        Tokenizer.train(docs, workdir / "tokenizer", tcfg.vocab_size, seed=tcfg.data_seed)
    _barrier("pldr_tokenizer", tcfg.sync_timeout_s)
    return Tokenizer.load(path)


def prepare_datasets(tcfg: TrainConfig, tokenizer, documents=None):
    """(train dataset, validation dataset or None) for this process's shard.

    `tcfg.data`: a source spec (tokenized here, in memory: the embedded corpus, small files),
    ``tokens:DIR`` (a prepared directory: rows read in place and built on the fly, refused before any
    training work when incomplete, damaged or made with another tokenizer) or ``stream:SPEC``
    (raw text tokenized inside the grain pipeline; see `pldr_jax.data.streaming`)."""
    from ..data import make_dataset, make_source, tokenize_documents
    pc, pi = jax.process_count(), jax.process_index()
    if tcfg.batch_size % pc:
        raise ValueError(f"batch_size ({tcfg.batch_size}) must be divisible by the {pc} processes")
    local_bs = tcfg.batch_size // pc
    data = tcfg.data if documents is None else None
    if isinstance(data, str) and data.startswith("tokens:"):
        from ..data.shards import PreparedTokens
        store = PreparedTokens(data[len("tokens:"):], tokenizer)
        common = dict(seq_len=tcfg.seq_len, mode=tcfg.data_mode, shard_index=pi, shard_count=pc,
                      validation_fraction=tcfg.validation_fraction)
        train_ds = make_dataset(None, store, batch_size=local_bs, seed=tcfg.data_seed, split="train", **common)
        val_ds = (make_dataset(None, store, batch_size=local_bs, split="validation", **common)
                  if tcfg.validation_fraction > 0 else None)
        return train_ds, val_ds
    if isinstance(data, str) and data.startswith("stream:"):
        from ..data.streaming import StreamingDataset
        common = dict(seq_len=tcfg.seq_len, batch_size=local_bs, mode=tcfg.data_mode, seed=tcfg.data_seed,
                      shard_index=pi, shard_count=pc, validation_fraction=tcfg.validation_fraction)
        spec = data[len("stream:"):]
        train_ds = StreamingDataset(spec, tokenizer, split="train", **common)
        val_ds = None
        if tcfg.validation_fraction > 0:
            if tcfg.eval_batches is None:
                raise ValueError("--data stream:... validates on a repeating stream: set eval_batches (--eval-batches)")
            val_ds = StreamingDataset(spec, tokenizer, split="validation", shuffle_window=0, **common)
        return train_ds, val_ds
    src = documents if documents is not None else make_source(tcfg.data)
    corpus = tokenize_documents(tokenizer, src)
    common = dict(seq_len=tcfg.seq_len, mode=tcfg.data_mode, shard_index=pi, shard_count=pc,
                  validation_fraction=tcfg.validation_fraction, split_seed=tcfg.data_seed)
    train_ds = make_dataset(None, corpus, batch_size=local_bs, seed=tcfg.data_seed, split="train", **common)
    val_ds = None
    if tcfg.validation_fraction > 0:
        val_ds = make_dataset(None, corpus, batch_size=local_bs, split="validation", **common)
    return train_ds, val_ds


def make_g_lm(cfg: PLDRConfig, tcfg: TrainConfig):
    """The constant G_LM [num_layers, H, dk, dk] of a predefined-G model (None for learned G)."""
    if cfg.learned_g:
        if tcfg.g_source not in (None, "learned"):
            raise ValueError(f"g_source={tcfg.g_source!r} needs a predefined-G model config (custom_G_type set); "
                             "a learned-G model derives G_LM itself")
        return None
    from ..g_sources import make_g
    spec = tcfg.g_source
    if spec is None:
        spec = {"identity": "identity", "random": "uniform"}.get(cfg.custom_G_type)
        if spec is None:
            raise ValueError("custom_G_type='external' needs g_source='external:<file.npz>'")
    g = make_g(cfg, spec, jax.random.key(tcfg.seed + 1))
    if g is None:
        raise ValueError(f"g_source={spec!r} gives no G_LM; a predefined-G model needs one")
    return np.asarray(g, np.float32)


# --------------------------------------------------------------------------- logging
class _Logger:
    def __init__(self, path: Path | None, tensorboard_dir: Path | None):
        self.path = path
        self._f = None
        self._warned = False
        if path is not None:
            # a run killed mid-write leaves a partial last line: start on a fresh line after it
            torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
            self._f = open(path, "a")
            if torn:
                self._f.write("\n")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter  # type: ignore
                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # type: ignore
                    self._tb = SummaryWriter(str(tensorboard_dir))
                except ImportError:
                    self._tb = None

    def write(self, record: dict) -> None:
        if self._f is not None:
            try:
                self._f.write(json.dumps(record) + "\n")
                self._f.flush()
            except OSError as e:  # e.g. disk full: only process 0 logs, so raising here would split the processes
                self._warn(e)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, record["step"])

    def _warn(self, e: OSError) -> None:
        """Report a failed metrics write once; training goes on (checkpoints decide whether the run stops)."""
        if not self._warned:
            self._warned = True
            print(f"warning: cannot write {self.path} ({e}); training continues, further metrics lines may be "
                  "missing", file=sys.stderr, flush=True)

    def close(self):
        if self._f is not None:
            try:
                self._f.close()
            except OSError as e:
                self._warn(e)
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl file (later records of the same kind and step replace earlier
    ones, so a resumed run's log reads as one run)."""
    p = Path(path)
    if not p.exists():
        return []
    recs = []
    for line in p.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # blank, or torn by a kill mid-write
            continue
    seen: dict = {}
    for r in recs:
        seen[(r.get("kind", "train"), r["step"])] = r
    return sorted(seen.values(), key=lambda r: (r["step"], r.get("kind", "train")))


def plot_history(metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = "") -> Path | None:
    """Train and validation loss curves of a metrics.jsonl as a PNG (matplotlib Agg)."""
    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train"]
    va = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "eval"]
    if not tr and not va:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1.4)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss", lw=1.4, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("masked cross-entropy")
    ax.set_title(title or "PLDR-LLM pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- the loop
_STEP_CACHE: dict = {}


def _compiled_steps(model_cfg: PLDRConfig, tcfg: TrainConfig, mesh, compiler_options=None):
    """(tx, schedule, train_step, eval_step) for this model / optimiser / mesh, cached."""
    opt_fields = (tcfg.learning_rate, tcfg.warmup_steps, tcfg.schedule_steps, tcfg.alpha, tcfg.weight_decay,
                  tcfg.clip_value, tcfg.clip_norm)
    copts = tuple(sorted((compiler_options or {}).items()))
    key = (model_cfg, opt_fields, tcfg.step_options(), mesh, copts)
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= 8:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        tx, schedule = tcfg.optimizer()
        opts = tcfg.step_options()
        _STEP_CACHE[key] = (tx, schedule,
                            make_train_step(model_cfg, tx, schedule, opts=opts, mesh=mesh,
                                            compiler_options=compiler_options),
                            make_eval_step(model_cfg, opts=opts, mesh=mesh, compiler_options=compiler_options))
    return _STEP_CACHE[key]


def _is_main() -> bool:
    return jax.process_index() == 0


def _clear_run(workdir: Path, keep: Sequence[str | None] = ()) -> None:
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


def _batches(source, start_step: int):
    """An iterator of host-local batches and whether it is checkpointable."""
    if hasattr(source, "iterator"):  # PretrainDataset
        return source.iterator(0), True
    it = iter(source)
    return it, hasattr(it, "get_state") and hasattr(it, "set_state")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the message names the newest complete one, left intact).
    Raised on every process together (the processes exchange their save outcomes first)."""

    raised_on_every_process = True


def _save_failure_message(ckpt_dir: Path, failed_step: int | None, step_now: int,
                          failed: Mapping[int, dict]) -> str:
    """failed_step: the checkpoint whose save failed; step_now: the step training reached;
    failed: process index -> {"error": summary of the error that process saw, "disk_full": bool}."""
    done = checkpoint_steps(ckpt_dir)
    kept = (f"the newest complete checkpoint, step {done[-1]}, is intact" if done else
            "no complete checkpoint exists yet")
    what = f"the save of step {failed_step}" if failed_step is not None else "the last save"
    if failed_step is not None and failed_step != step_now:
        what += f" (written in the background; reported at step {step_now})"
    if jax.process_count() > 1:
        seen = "; ".join(f"process {i}: {r['error']}" for i, r in sorted(failed.items()))
    else:
        seen = next(iter(failed.values()))["error"]
    full = any(r["disk_full"] for r in failed.values())
    cause = "the disk is full: " if full else ""
    return (f"checkpoint save failed: {what}: {cause}{seen}. {kept[0].upper() + kept[1:]}. "
            f"{'Free disk space' if full else 'Fix the problem'} in {ckpt_dir}, then run again with --resume "
            "(resume=True)")


def _is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` or one of its causes is ENOSPC (Python's OSError, or tensorstore's message)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or f"os_error_code='{errno.ENOSPC}'" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def evaluate(eval_step, params, val_source, mesh, g_lm=None, max_batches: int | None = None) -> dict:
    """Validation loss / accuracy / perplexity over `val_source` (first `max_batches` batches)."""
    sums = []
    it = val_source.iterator(0) if hasattr(val_source, "iterator") else iter(val_source)
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        sums.append(eval_step(params, shard_batch(batch, mesh), g_lm))
    return reduce_eval(jax.device_get(sums))


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
    The compiled steps are cached per (model, optimiser, step options, mesh): repeated calls in one
    process (resume, notebooks, tests) do not recompile.
    """
    t_start = time.perf_counter()
    log = log if _is_main() else (lambda *a, **k: None)
    if tcfg.dtype is not None and tcfg.dtype != model_cfg.dtype:
        model_cfg = model_cfg.replace(dtype=tcfg.dtype)
    workdir = Path(tcfg.workdir).absolute()
    if tcfg.overwrite and tcfg.resume:
        raise ValueError("overwrite and resume are mutually exclusive")
    # ---- everything that can be checked before any work: mesh, batch, checkpoint directory
    mesh = make_mesh(*tcfg.mesh, devices=devices)
    check_batch_size(tcfg.batch_size, mesh, tcfg.grad_accum)
    tx, schedule, train_step, eval_step = _compiled_steps(model_cfg, tcfg, mesh, compiler_options)
    abstract = abstract_train_state(model_cfg, tx, mesh)
    ckpt_dir = workdir / "checkpoints"
    timeout = tcfg.sync_timeout_s
    problem = None
    if _is_main():
        try:
            if tcfg.overwrite:
                _clear_run(workdir, keep=[tcfg.tokenizer])
            preflight_checkpoint_dir(ckpt_dir, estimate_checkpoint_bytes(abstract))
            workdir.mkdir(parents=True, exist_ok=True)
        except CheckpointDirError as e:
            problem = str(e)
    problem = multihost.all_gather_json("pldr_workdir", problem, timeout)[0]  # every process stops on it
    if problem:
        raise CheckpointDirError(problem)
    resume_point = None
    if tcfg.resume:  # collective: every process restores, all agree on the step (or all raise ResumeError)
        resume_point = restore_latest_good(ckpt_dir, abstract, expect_model=model_cfg.to_dict(), timeout_s=timeout,
                                           log=log)
    elif checkpoint_steps(ckpt_dir):
        raise ValueError(f"{ckpt_dir} already holds checkpoints (latest step {checkpoint_steps(ckpt_dir)[-1]}); "
                         "pass resume=True (--resume) to continue, overwrite=True (--overwrite) to start again, "
                         "or another workdir")
    multihost.barrier("pldr_resume_decided", timeout)  # quarantine moves are done before orbax lists the steps
    mngr = CheckpointManager(ckpt_dir, max_to_keep=tcfg.keep_checkpoints or None, async_save=tcfg.async_checkpoint,
                             timeout_s=timeout)

    # ---- data
    if train_data is None:
        if tokenizer is None:
            tokenizer = prepare_tokenizer(tcfg, workdir, documents)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                             f"{model_cfg.vocab_size}; set vocab_size >= {tokenizer.vocab_size}")
        train_data, auto_val = prepare_datasets(tcfg, tokenizer, documents)
        val_data = auto_val if val_data is None else val_data
    tok_path = getattr(tokenizer, "path", None) if tokenizer is not None else None
    if tok_path is not None:
        tok_path = Path(tok_path).absolute()
        own = workdir / "tokenizer.model"
        if tok_path != own and _is_main():  # keep the run folder self-contained
            shutil.copyfile(tok_path, own)
        tok_path = str(own)

    # ---- G_LM of a predefined-G model
    g_lm = make_g_lm(model_cfg, tcfg)
    g_path = None
    if g_lm is not None and _is_main():
        g_path = workdir / "g_lm.npy"
        np.save(g_path, g_lm)
    g_dev = None if g_lm is None else jax.device_put(g_lm, replicated(mesh))

    config_record = {"model": model_cfg.to_dict(), "train": tcfg.to_dict(), "tokenizer": tok_path,
                     "g_lm": str(g_path) if g_path else None, "mesh": dict(mesh.shape),
                     "process_count": jax.process_count()}
    if _is_main():
        (workdir / "run_config.json").write_text(json.dumps(config_record, indent=2))

    batches, checkpointable_data = _batches(train_data, 0)
    if resume_point is not None:
        state = resume_point.state
        if checkpointable_data and resume_point.data_state is not None:
            batches.set_state(resume_point.data_state)
        elif checkpointable_data:
            raise ResumeError(f"checkpoint {ckpt_dir / str(resume_point.step)} holds no data-iterator state but this "
                              "run's data is checkpointable: resuming would repeat data silently; resume with the "
                              "data the checkpoint was written with")
        else:
            log("warning: the training data has no get_state()/set_state(); it restarts from its beginning")
        log(f"resumed from {ckpt_dir / str(resume_point.step)} (step {int(state.step)})")
    else:
        if tcfg.resume:
            log(f"no checkpoint in {ckpt_dir}: starting from step 0")
        state = init_train_state(model_cfg, tx, mesh, tcfg.seed, compiler_options=compiler_options)
    start_step = int(state.step)

    logger = _Logger(workdir / "metrics.jsonl" if _is_main() else None,
                     workdir / "tensorboard" if (tcfg.tensorboard and _is_main()) else None)
    if resume_point is not None:
        logger.write({"kind": "resume", "step": resume_point.step, "quarantined": resume_point.quarantined,
                      "notes": resume_point.notes, "process_count": jax.process_count()})
    bar = None
    if tcfg.progress and _is_main() and start_step < tcfg.steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=tcfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr)

    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    step_metrics: list[dict] = []
    evals: list[dict] = []
    pending: list[tuple[int, Any]] = []
    warned: list[int] = []
    first_step_s = None
    monitor = NonFiniteMonitor(tcfg.fault_policy(), log=log)
    per_step_check = monitor.policy.per_step_check
    t_int = time.perf_counter()
    int_start = start_step

    def flush(step_now: int):
        nonlocal pending, t_int, int_start
        if not pending:
            return None
        got = jax.device_get([m for _, m in pending])
        rows = [{"step": s_, **{k: float(v) for k, v in m.items()}} for (s_, _), m in zip(pending, got)]
        step_metrics.extend(rows)
        if not per_step_check:
            for r in rows:
                monitor.observe(r["step"], r.get("nonfinite", 0.0) == 0.0)
        dt = time.perf_counter() - t_int
        n = step_now - int_start
        rec = {"kind": "train", "step": step_now}
        for k in rows[-1]:
            if k != "step":
                rec[k] = float(np.mean([r[k] for r in rows])) if k not in ("lr",) else rows[-1][k]
        ok = n > 0 and dt > 0  # n == 0: only the compiling first step since the last record
        rec["tokens_per_s"] = n * tokens_per_step / dt if ok else float("nan")
        rec["real_tokens_per_s"] = sum(r["tokens"] for r in rows[-n:]) / dt if ok else float("nan")
        rec["step_s"] = dt / n if ok else float("nan")
        rec["elapsed_s"] = time.perf_counter() - t_start
        rec["skipped_steps_total"] = monitor.skipped
        logger.write(rec)
        if not math.isfinite(rec["loss"]) and not warned and tcfg.nonfinite == "off":
            warned.append(step_now)
            log(f"warning: non-finite loss at step {step_now} (e.g. a DAG term overflowing float32 at this "
                "initialisation -- see the reference README, oddity 5)")
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        pending = []
        t_int = time.perf_counter()
        int_start = step_now
        return rec

    def run_eval(step_now: int):
        if val_data is None:
            return
        r = evaluate(eval_step, state.params, val_data, mesh, g_dev, tcfg.eval_batches)
        r = {"kind": "eval", "step": step_now, **r}
        evals.append(r)
        logger.write(r)
        if bar is not None:
            bar.write(f"step {step_now}: val_loss {r['val_loss']:.4f}  val_acc {r['val_accuracy']:.4f}  "
                      f"val_ppl {r['val_perplexity']:.2f}")
        else:
            log(f"step {step_now}: val_loss {r['val_loss']:.4f}  val_acc {r['val_accuracy']:.4f}  "
                f"val_ppl {r['val_perplexity']:.2f}")

    saving_step = None  # the step of the newest save started (its asynchronous write may still be running)

    def settle(step_now, error: BaseException | None, failed_step):
        """Collective: wait until every process's pending save is written, or stop every process as
        soon as one reports a failure (one process's failed save can leave another's waiting for it).
        `error`: this process's failure so far (then nothing is waited for)."""
        t_end = time.monotonic() + mngr.timeout_s
        while True:
            done = True
            if error is None:
                done, error = mngr.poll_pending_save(1.0)
            report = ({"error": error_summary(error), "disk_full": _is_disk_full(error)} if error is not None
                      else "done" if done else "writing")
            seen = multihost.all_gather_json("pldr_save", report, timeout)
            failed = {i: r for i, r in enumerate(seen) if isinstance(r, dict)}
            if failed:
                raise CheckpointSaveError(_save_failure_message(ckpt_dir, failed_step, step_now, failed)) from error
            if all(r == "done" for r in seen):
                return
            if time.monotonic() > t_end:
                writing = [i for i, r in enumerate(seen) if r == "writing"]
                raise CheckpointTimeout(f"the save of step {failed_step} in {ckpt_dir} was still being written on "
                                        f"process(es) {writing} after {mngr.timeout_s:.0f} s (a stalled file system?)")

    def save(step_now: int, force: bool = False, finish: bool = False):
        # A failed save (disk full, permissions) may show on some processes only, and an asynchronous one
        # only later: every process reports what it saw and all stop together, or none does.
        nonlocal saving_step
        if saving_step is not None:
            settle(step if step_now is None else step_now, None, saving_step)  # the previous background write
            saving_step = None
        if step_now is not None:
            error = None
            try:
                mngr.save(step_now, state, config=config_record,
                          data_iterator=batches if checkpointable_data else None, force=force)
                saving_step = step_now
            except CheckpointTimeout:
                raise
            except Exception as e:
                error = e
            if error is not None or finish:
                settle(step_now, error, step_now)
                saving_step = None

    step = start_step
    save_failed = False
    try:
        while step < tcfg.steps:
            try:
                batch = next(batches)
            except StopIteration:
                log(f"data exhausted after step {step}")
                break
            state, metrics = train_step(state, shard_batch(batch, mesh), g_dev)
            step += 1
            pending.append((step, metrics))
            if step == start_step + 1:  # keep compilation out of the tokens/s figures
                jax.block_until_ready(metrics)
                first_step_s = time.perf_counter() - t_int
                logger.write({"kind": "info", "step": step, "compile_and_first_step_s": first_step_s})
                t_int, int_start = time.perf_counter(), step
            if bar is not None:
                bar.update(1)
            if per_step_check and monitor.observe(step, float(metrics["nonfinite"]) == 0.0):
                flush(step)
                save(step, force=True, finish=True)  # the bad update was not applied: the last good state
                monitor.raise_stop(ckpt_dir / str(step))
            last = step == tcfg.steps
            if step % tcfg.log_every == 0 or last:
                flush(step)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and not last:
                t0 = time.perf_counter()
                run_eval(step)
                t_int += time.perf_counter() - t0  # keep eval time out of tokens/s
            if tcfg.save_every and step % tcfg.save_every == 0 and not last:
                save(step)
        flush(step)
        if step > start_step or val_data is not None:
            run_eval(step)
        save(step if step > start_step else None, force=True, finish=True)
    except (CheckpointSaveError, CheckpointTimeout):
        save_failed = True  # orbax's threads may wait in barriers for the other processes: not closed
        raise
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        if not save_failed:
            try:
                mngr.close()
            except Exception as e:  # already reported by save(); do not mask the error in flight
                log(f"warning: closing the checkpoint manager: {type(e).__name__}: {e}")

    plot_path = None
    if tcfg.plot and _is_main():
        try:
            plot_path = plot_history(workdir / "metrics.jsonl", workdir / "loss_curve.png",
                                     title=f"PLDR-LLM ({model_cfg.num_layers} layers, d_model {model_cfg.d_model})")
        except Exception as e:  # a plot must never fail a finished run
            log(f"warning: loss plot failed: {e}")
    paths = {"workdir": str(workdir), "checkpoints": str(ckpt_dir), "metrics": str(workdir / "metrics.jsonl"),
             "plot": str(plot_path) if plot_path else None, "tokenizer": tok_path,
             "g_lm": str(g_path) if g_path else None}
    return TrainResult(state=state, model_cfg=model_cfg, step_metrics=step_metrics, evals=evals, paths=paths,
                       wall_s=time.perf_counter() - t_start, start_step=start_step, end_step=step, g_lm=g_lm,
                       tokenizer=tokenizer, first_step_s=first_step_s,
                       resumed_from=resume_point.step if resume_point else None,
                       quarantined=resume_point.quarantined if resume_point else [],
                       notes=resume_point.notes if resume_point else [])
