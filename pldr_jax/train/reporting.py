"""Reporting of a training run: metrics.jsonl rows, TensorBoard scalars, the progress bar, the loss plot.

`Reporter(run)` collects the step loop's metrics (after a ``resume`` row when the run resumed): ``step_done`` after every step (the first one, which
compiles, is timed apart: an ``info`` row), ``flush`` every ``log_every`` steps (one ``train`` row of
the interval's means, tokens/s, step time, and the fields of each of ``row_fields``: callables
``f(steps) -> dict``, e.g. `operations.RunOperations.row_fields`: MFU, goodput, the step-time split),
``eval_result`` (an ``eval`` row), ``exclude`` (time spent outside training, e.g. evaluation, kept out
of tokens/s).  Every row goes to each of its ``writers`` (objects with ``write(record)`` and
``close()``): `JsonlWriter` (``workdir/metrics.jsonl``) and, with ``tensorboard``,
`tensorboard.TensorBoardWriter` (if tensorboardX is installed).  Only process 0 writes, shows a bar,
plots.
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

from .tensorboard import TensorBoardWriter

__all__ = ["MetricsWriter", "JsonlWriter", "TensorBoardWriter", "Reporter", "read_metrics", "plot_history",
           "plot_run", "run_summary"]


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
        self.row_fields: list = []
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
        for fields in self.row_fields:
            rec.update(fields(n))
        self.write(rec)
        if not math.isfinite(rec["loss"]) and not self._warned_nonfinite and run.tcfg.nonfinite == "off":
            self._warned_nonfinite = True
            run.log(f"warning: non-finite loss at step {step_now} (e.g. a DAG term overflowing float32 at this "
                    "initialisation -- see the reference README, oddity 5)")
        if self.bar is not None:
            extra = {k: f"{rec[k]:.0%}" for k in ("mfu", "goodput") if k in rec and math.isfinite(rec[k])}
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                 **extra)
        self._pending = []
        self._t_int = time.perf_counter()
        self._int_start = step_now
        return rec

    def eval_result(self, r: dict) -> None:
        """An ``eval`` row ({"kind": "eval", "step", "val_loss", ...: the validation metrics, each
        ``val_``-prefixed: loss / accuracy / perplexity of pretraining, a fine-tuning task's metrics}),
        also shown."""
        self.evals.append(r)
        self.write(r)
        line = f"step {r['step']}: " + "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("val_")
                                                  and k != "val_tokens" and isinstance(v, float))
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
    """Records of a metrics.jsonl file as one history: a ``resume`` record at step S drops the rows
    written before it for steps after S (a run that went on past its last checkpoint and was lost:
    those steps were rolled back), and later records of the same kind and step replace earlier ones."""
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
        if r.get("kind") == "resume":
            seen = {k: v for k, v in seen.items() if k[1] <= r["step"]}
        seen[(r.get("kind", "train"), r["step"])] = r
    return sorted(seen.values(), key=lambda r: (r["step"], r.get("kind", "train")))


def plot_history(metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = "",
                 metric: str | None = None, ylabel: str = "masked cross-entropy") -> Path | None:
    """Train and validation loss curves of a metrics.jsonl as a PNG (matplotlib Agg); with `metric`
    (e.g. "accuracy") also the eval rows' ``val_<metric>`` on a second axis."""
    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train"]
    va = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "eval" and "val_loss" in r]
    vm = [(r["step"], r[f"val_{metric}"]) for r in recs if r.get("kind") == "eval" and f"val_{metric}" in r]
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
    ax.set_ylabel(ylabel)
    ax.set_title(title or "PLDR-LLM pretraining")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if vm:
        ax2 = ax.twinx()
        ax2.plot(*zip(*vm), "s--", color="tab:green", label=f"validation {metric}", lw=1.2, ms=4)
        ax2.set_ylabel(metric)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_run(run, metric: str | None = None, title: str | None = None, ylabel: str = "masked cross-entropy"
             ) -> Path | None:
    """``workdir/loss_curve.png`` of a finished run (process 0, ``plot`` on; a failure is a warning);
    with ``dynamics_every`` also ``workdir/dynamics.png`` (`pldr_jax.analysis.dynamics.plot_dynamics`).
    metric, title, ylabel: as `plot_history` (title None: the model's size)."""
    if not (run.tcfg.plot and run.main):
        return None
    cfg = run.model_cfg
    try:
        if run.tcfg.dynamics_every:
            from ..analysis.dynamics import plot_dynamics
            plot_dynamics(read_metrics(run.workdir / "metrics.jsonl"), run.workdir / "dynamics.png",
                          title=f"PLDR-LLM training dynamics ({cfg.num_layers} layers, d_model {cfg.d_model})")
        return plot_history(run.workdir / "metrics.jsonl", run.workdir / "loss_curve.png",
                            title=title or f"PLDR-LLM ({cfg.num_layers} layers, d_model {cfg.d_model})",
                            metric=metric, ylabel=ylabel)
    except Exception as e:  # a plot must never fail a finished run
        run.log(f"warning: loss plot failed: {e}")
        return None


def _eval_brief(r: dict) -> str:
    """An eval row in a few words: loss and perplexity (pretraining), else loss and the task's metrics."""
    parts = [f"loss {r['val_loss']:.3f}"] if "val_loss" in r else []
    if "val_perplexity" in r:
        return " ".join(parts + [f"ppl {r['val_perplexity']:.1f}"])
    return " ".join(parts + [f"{k[4:]} {v:.3f}" for k, v in r.items()
                             if k.startswith("val_") and k not in ("val_loss", "val_tokens") and isinstance(v, float)])


def run_summary(res) -> str:
    """The lines printed at the end of a run (a `loop.TrainResult`): steps and time, train loss,
    the last validations, resume / quarantine notes, the run's files, a stop's resume command."""
    recs = read_metrics(res.paths["metrics"])
    tr = [r for r in recs if r.get("kind") == "train"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    lines = [f"trained steps {res.start_step} -> {res.end_step} in {res.wall_s:.1f} s"]
    if tr:
        tps = [r["tokens_per_s"] for r in tr[1:] if math.isfinite(r.get("tokens_per_s", float("nan")))]
        lines.append(f"train loss: {tr[0]['loss']:.3f} (step {tr[0]['step']}) -> {tr[-1]['loss']:.3f} "
                     f"(step {tr[-1]['step']}), min {min(r['loss'] for r in tr):.3f}"
                     + (f"; {sorted(tps)[len(tps) // 2]:.0f} tokens/s (median)" if tps else ""))
    if ev:
        lines.append("validation: " + ", ".join(f"step {r['step']}: {_eval_brief(r)}" for r in ev[-4:]))
    if res.resumed_from is not None:
        lines.append(f"resumed from checkpoint {res.resumed_from}")
    for q in res.quarantined:
        lines.append(f"quarantined: checkpoint {q['step']} (corrupt: {'; '.join(q['problems'])}) moved to "
                     f"{q['moved_to']}")
    for n in res.notes:
        lines.append(f"note: {n}")
    for k in ("checkpoints", "metrics", "plot", "tokenizer"):
        if res.paths.get(k):
            lines.append(f"{k + ':':13s}{res.paths[k]}")
    if getattr(res, "stopped", None):
        from .preemption import resume_command, stop_message
        lines.append(stop_message(res.stopped, res.end_step, str(Path(res.paths["checkpoints"]) / str(res.end_step)),
                                  resume_command(sys.argv[1:])))
    return "\n".join(lines)
