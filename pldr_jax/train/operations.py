"""What a run does beside its steps, in one object the training loop calls: stop requests
(`preemption`), the step-time split, tokens/s and MFU (`throughput`), profiler traces
(`profiling`), the deductive-output probe (`pldr_jax.analysis.dynamics`) and lm-eval tasks
(`task_eval`; both run by `OperationsTasks`, one of the step loop's periodic tasks).

The step loop's calls (`steploop.run_steps`), in order::

    with ops:                                   # signal handlers, the deadline clock
        with ops.phase("data_wait"): batch = next(batches)
        ops.set_probe_batch(batch["inputs"])    # first batch only
        ops.before_step(step + 1)               # profiler start
        state, metrics = train_step(...)
        ops.after_step(step, metrics)           # profiler stop
        ops.compiled(first_step_s)              # first step only
        ... the metrics row: Reporter.row_fields -> ops.row_fields(steps) (tokens/s/device, MFU, goodput,
            the phases, tokens per source of a data mixture)
        ... periodic tasks, each in its phase (OperationsTasks: the probe, lm-eval)
        ops.stop_reason(step)                   # the same on every process: final checkpoint, stop
        with ops.phase("checkpoint"): save(...)

Every process runs the probe and lm-eval (their forward passes over sharded parameters are
collective); process 0 writes the records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from . import multihost
from .preemption import Preemption
from .profiling import StepProfiler
from .throughput import PhaseClock, device_peak, throughput_record, train_step_flops

__all__ = ["RunOperations", "OperationsTasks"]


class RunOperations:
    """See the module docstring.  tcfg: the `TrainConfig` (max_runtime_s, profile_steps, dynamics_*,
    eval_tasks*, seq_len, batch_size, sync_timeout_s); mesh: the training mesh (devices counted for
    the per-device figures); batches: the training iterator (set before the loop; a data mixture's
    per-source token counts are read from it)."""

    def __init__(self, model_cfg, tcfg, workdir: str | Path, *, mesh=None, tokenizer=None, g_lm=None,
                 log: Callable[..., None] | None = None, is_main: bool | None = None, batches=None):
        self.cfg, self.tcfg = model_cfg, tcfg
        self.workdir = Path(workdir)
        self.log = log or (lambda *a, **k: None)
        self.is_main = jax.process_index() == 0 if is_main is None else is_main
        devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
        self.num_devices = len(devices)
        self.tokens_per_step = tcfg.batch_size * tcfg.seq_len
        self.flops_per_step = train_step_flops(model_cfg, tcfg.batch_size, tcfg.seq_len)
        self.peak = device_peak(devices[0], model_cfg.dtype)
        self.clock = PhaseClock()
        self.preemption = Preemption(tcfg.max_runtime_s, log=self.log)
        self.profiler = StepProfiler(tcfg.profile_steps, self.workdir / "profile", log=self.log)
        self.batches = batches
        self._probe = None
        self._probe_pending = bool(tcfg.dynamics_every)
        self._tasks = None
        if tcfg.eval_tasks:
            if tokenizer is None:
                raise ValueError("--eval-tasks needs the run's tokenizer (give tokenizer= or let the run load / "
                                 "train one): lm-eval tasks are text")
            from .task_eval import TaskEvaluator
            self._tasks = TaskEvaluator(tcfg.eval_tasks, tokenizer, limit=tcfg.eval_tasks_limit,
                                        batch_size=max(tcfg.batch_size // jax.process_count(), 1), g_lm=g_lm)

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "RunOperations":
        self.preemption.install()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.preemption.uninstall()
        self.profiler.stop()

    # ------------------------------------------------------------------ timing
    def phase(self, name: str):
        """Context manager: time spent inside is phase `name` (data_wait, checkpoint, eval, ...)."""
        return self.clock.phase(name)

    def compiled(self, seconds: float) -> None:
        """The first step's time (compilation included) is not productive step time."""
        self.clock.add("compile", seconds)

    def row_fields(self, steps: int) -> dict:
        """Fields for the metrics row of the last `steps` steps: `throughput_record`'s and, for a data
        mixture, ``tokens_by_source`` (all processes' counts: a collective, on every process)."""
        rec = throughput_record(steps, self.clock.interval(), tokens_per_step=self.tokens_per_step,
                                flops_per_step=self.flops_per_step, peak=self.peak, num_devices=self.num_devices)
        counts = getattr(self.batches, "source_tokens", None)
        if counts is not None:
            per = multihost.all_gather_json("pldr_source_tokens", counts, self.tcfg.sync_timeout_s)
            rec["tokens_by_source"] = {k: sum(p[k] for p in per) for k in per[0]}
        return rec

    def run_summary(self) -> dict:
        """What the figures are based on (for run_config.json / the TensorBoard text)."""
        return {"model_flops_per_step": self.flops_per_step, "peak_flops_per_device": self.peak.flops_per_s,
                "peak_source": self.peak.source, "devices": self.num_devices}

    # ------------------------------------------------------------------ per step
    def before_step(self, step: int) -> None:
        self.profiler.before_step(step)

    def after_step(self, step: int, outputs: Any = None) -> None:
        if self.profiler.active:
            with self.clock.phase("profile"):
                self.profiler.after_step(step, outputs)

    def stop_reason(self, step: int) -> str | None:
        """Why to stop after `step` (the same on every process), or None."""
        return self.preemption.reached(step)

    # ------------------------------------------------------------------ records
    def set_probe_batch(self, inputs: np.ndarray) -> None:
        """The probe rows, from the first batch (process 0's rows, broadcast so all processes agree)."""
        if not self._probe_pending:
            return
        from ..analysis.dynamics import DynamicsProbe, probe_tokens
        tc = self.tcfg
        x = np.asarray(inputs)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            x = np.asarray(multihost_utils.broadcast_one_to_all(x))
        prompt = tc.dynamics_prompt_len or tc.seq_len // 2
        self._probe = DynamicsProbe(self.cfg, probe_tokens(x, tc.dynamics_rows, prompt, tc.seq_len - prompt), prompt)
        self._probe_pending = False

    def due(self, step: int, last: bool) -> bool:
        tc = self.tcfg
        return bool((self._probe is not None and (step % tc.dynamics_every == 0 or last))
                    or (self._tasks is not None and ((tc.eval_tasks_every and step % tc.eval_tasks_every == 0)
                                                     or last)))

    def periodic(self, step: int, params, last: bool = False) -> list[dict]:
        """The records due after `step`: the dynamics probe every dynamics_every steps, lm-eval tasks
        every eval_tasks_every steps (0: at the end); each timed as its own phase."""
        tc, out = self.tcfg, []
        if self._probe is not None and (step % tc.dynamics_every == 0 or last):
            with self.clock.phase("dynamics"):
                out.append(self._probe(params, step))
        if self._tasks is not None and ((tc.eval_tasks_every and step % tc.eval_tasks_every == 0) or last):
            with self.clock.phase("lm_eval"):
                out.append(self._tasks(self.cfg, params, step))
        return out


class OperationsTasks:
    """The probe and lm-eval tasks as one periodic task of the step loop (`evaluation.PeriodicTask`):
    due at their steps and at the last step, records written through the reporter.  phase: None
    (the step loop adds no phase around it: `RunOperations.periodic` times each part itself)."""

    phase = None

    def __init__(self, ops: RunOperations, run, reporter):
        self.ops, self._run, self.reporter = ops, run, reporter
        self._done: int | None = None

    def due(self, step: int, last: bool) -> bool:
        return self.ops.due(step, last)

    def run(self, step: int) -> None:
        self._done = step
        last = step == self._run.tcfg.steps
        for r in self.ops.periodic(step, self._run.state.params, last):
            self.reporter.write(r)

    def final(self, step: int) -> None:
        if self._done != step and step > self._run.start_step:
            for r in self.ops.periodic(step, self._run.state.params, True):
                self.reporter.write(r)
