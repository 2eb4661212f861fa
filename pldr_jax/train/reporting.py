"""Reporting of a training run: metrics.jsonl rows, TensorBoard scalars, the progress bar, the loss plot.

`Reporter(run)` collects the step loop's metrics (after a ``resume`` row when the run resumed): ``step_done`` after every step (the first one, which
compiles, is timed apart: an ``info`` row), ``flush`` every ``log_every`` steps (one ``train`` row of
the interval's means, tokens/s, step time), ``eval_result`` (an ``eval`` row), ``exclude`` (time spent
outside training, e.g. evaluation, kept out of tokens/s).  Every row goes to each of its ``writers``
(objects with ``write(record)`` and ``close()``): `JsonlWriter` (``workdir/metrics.jsonl``) and,
with ``tensorboard``, `TensorBoardWriter` (if installed).  Only process 0 writes, shows a bar, plots.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

__all__ = ["MetricsWriter", "JsonlWriter", "TensorBoardWriter", "Reporter", "read_metrics", "plot_history",
           "plot_run"]


class MetricsWriter(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class _WarnOnce:
    """A writer whose failed writes (e.g. disk full) are reported once while training goes on:
    checkpoints decide whether the run stops, and only process 0 writes metrics, so raising here
    would split the processes (or mask the checkpoint error in flight)."""

    def __init__(self, path: Path):
        self.path = path
        self._warned = False

    def _warn(self, e: OSError) -> None:
        if not self._warned:
            self._warned = True
            print(f"warning: cannot write {self.path} ({e}); training continues, further metrics may be "
                  "missing", file=sys.stderr, flush=True)


class JsonlWriter(_WarnOnce):
    """Appends one JSON line per record."""

    def __init__(self, path: Path):
        super().__init__(path)
        # a run killed mid-write leaves a partial last line: start on a fresh line after it
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._f = open(path, "a")
        if torn:
            self._f.write("\n")

    def write(self, record: dict) -> None:
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as e:
            self._warn(e)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            self._warn(e)


class TensorBoardWriter(_WarnOnce):
    """The finite numbers of every record as TensorBoard scalars at the record's step."""

    def __init__(self, writer, directory: Path):
        super().__init__(directory)
        self._tb = writer

    @classmethod
    def open(cls, directory: Path) -> "TensorBoardWriter | None":
        """A writer into `directory` (tensorboardX, else torch's), None when neither is installed."""
        try:
            from tensorboardX import SummaryWriter  # type: ignore
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter  # type: ignore
            except ImportError:
                return None
        return cls(SummaryWriter(str(directory)), directory)

    def write(self, record: dict) -> None:
        try:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, record["step"])
        except OSError as e:
            self._warn(e)

    def close(self) -> None:
        try:
            self._tb.close()
        except OSError as e:
            self._warn(e)


class Reporter:
    """The metrics of one `train` call (see the module docstring).  step_metrics: one dict per step
    run; evals: the validation results; first_step_s: compile + first step."""

    def __init__(self, run):
        tcfg = run.tcfg
        self.run = run
        self.writers: list[MetricsWriter] = []
        if run.main:
            self.writers.append(JsonlWriter(run.workdir / "metrics.jsonl"))
            if tcfg.tensorboard:
                tb = TensorBoardWriter.open(run.workdir / "tensorboard")
                if tb is not None:
                    self.writers.append(tb)
        if run.resume_point is not None:
            point = run.resume_point
            self.write({"kind": "resume", "step": point.step, "quarantined": point.quarantined,
                        "notes": point.notes, "process_count": jax.process_count()})
        self.bar = None
        if tcfg.progress and run.main and run.start_step < tcfg.steps:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=tcfg.steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.tokens_per_step = tcfg.batch_size * tcfg.seq_len
        self.step_metrics: list[dict] = []
        self.evals: list[dict] = []
        self.first_step_s: float | None = None
        self._pending: list[tuple[int, Any]] = []
        self._warned_nonfinite = False
        self._t_int = time.perf_counter()  # start of the current logging interval
        self._int_start = run.start_step

    def write(self, record: dict) -> None:
        for w in self.writers:
            w.write(record)

    def step_done(self, step: int, metrics) -> None:
        """The (device) metrics of the step that reached `step`, read back at the next `flush`."""
        self._pending.append((step, metrics))
        if step == self.run.start_step + 1:  # keep compilation out of the tokens/s figures
            jax.block_until_ready(metrics)
            self.first_step_s = time.perf_counter() - self._t_int
            self.write({"kind": "info", "step": step, "compile_and_first_step_s": self.first_step_s})
            self._t_int, self._int_start = time.perf_counter(), step
        if self.bar is not None:
            self.bar.update(1)

    def exclude(self, seconds: float) -> None:
        """Keep `seconds` spent outside the train steps (evaluation, probes) out of tokens/s."""
        self._t_int += seconds

    def flush(self, step_now: int) -> dict | None:
        """One ``train`` row for the steps since the last flush (None when there are none)."""
        if not self._pending:
            return None
        run, monitor = self.run, self.run.monitor
        got = jax.device_get([m for _, m in self._pending])
        rows = [{"step": s_, **{k: float(v) for k, v in m.items()}} for (s_, _), m in zip(self._pending, got)]
        self.step_metrics.extend(rows)
        if not monitor.policy.per_step_check:
            for r in rows:
                monitor.observe(r["step"], r.get("nonfinite", 0.0) == 0.0)
        dt = time.perf_counter() - self._t_int
        n = step_now - self._int_start
        rec = {"kind": "train", "step": step_now}
        for k in rows[-1]:
            if k != "step":
                rec[k] = float(np.mean([r[k] for r in rows])) if k not in ("lr",) else rows[-1][k]
        ok = n > 0 and dt > 0  # n == 0: only the compiling first step since the last record
        rec["tokens_per_s"] = n * self.tokens_per_step / dt if ok else float("nan")
        rec["real_tokens_per_s"] = sum(r["tokens"] for r in rows[-n:]) / dt if ok else float("nan")
        rec["step_s"] = dt / n if ok else float("nan")
        rec["elapsed_s"] = time.perf_counter() - run.t_start
        rec["skipped_steps_total"] = monitor.skipped
        self.write(rec)
        if not math.isfinite(rec["loss"]) and not self._warned_nonfinite and run.tcfg.nonfinite == "off":
            self._warned_nonfinite = True
            run.log(f"warning: non-finite loss at step {step_now} (e.g. a DAG term overflowing float32 at this "
                    "initialisation -- see the reference README, oddity 5)")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        self._pending = []
        self._t_int = time.perf_counter()
        self._int_start = step_now
        return rec

    def eval_result(self, r: dict) -> None:
        """An ``eval`` row (validation loss, accuracy, perplexity), also shown."""
        self.evals.append(r)
        self.write(r)
        line = (f"step {r['step']}: val_loss {r['val_loss']:.4f}  val_acc {r['val_accuracy']:.4f}  "
                f"val_ppl {r['val_perplexity']:.2f}")
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.run.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for w in self.writers:
            w.close()


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


def plot_run(run) -> Path | None:
    """``workdir/loss_curve.png`` of a finished run (process 0, ``plot`` on; a failure is a warning)."""
    if not (run.tcfg.plot and run.main):
        return None
    cfg = run.model_cfg
    try:
        return plot_history(run.workdir / "metrics.jsonl", run.workdir / "loss_curve.png",
                            title=f"PLDR-LLM ({cfg.num_layers} layers, d_model {cfg.d_model})")
    except Exception as e:  # a plot must never fail a finished run
        run.log(f"warning: loss plot failed: {e}")
        return None
