"""The step loop of a training run: one jitted step per batch, then, at the step they are due,
the metrics row, the periodic tasks (validation, ...), the checkpoint and the stop checks.

Per step, in this order: next batch -> train step -> `Reporter.step_done` -> the non-finite check
(with the "stop" policy: save the last good state, raise) -> every ``log_every`` steps
`Reporter.flush` -> each due periodic task (`evaluation.PeriodicTask`; its time kept out of
tokens/s) -> a due checkpoint (`saving.CheckpointCadence`) -> ``run.stop_checks`` (a message ends
the loop at this step).  After the loop: the last metrics row, the tasks' ``final``, the final
checkpoint (written on every process before returning); the reporter and the checkpoint manager
are closed whatever happens (the manager not after a failed save).

With `ops` (`operations.RunOperations`): the wait for each batch, the checkpoints and the periodic
tasks are timed as phases of the step-time split, the profiler brackets its steps, and a stop request
(SIGTERM / SIGINT / --max-runtime, ``ops.stop_reason``) ends the loop with the final checkpoint only:
no final tasks (a preempted host has seconds, not minutes).
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

from .checkpoint import CheckpointTimeout
from .saving import CheckpointCadence, CheckpointSaveError
from .sharding import shard_batch

__all__ = ["run_steps"]


def _task_phase(phase, task):
    """The step-time phase of a periodic task: its ``phase`` attribute ("eval" if absent; None: the
    task times its parts itself)."""
    name = getattr(task, "phase", "eval")
    return phase(name) if name else contextlib.nullcontext()


def run_steps(run, reporter, saver: CheckpointCadence, periodic: Sequence = (), ops=None) -> None:
    """Train `run` (a `setup.TrainRun` with its state and batches) up to ``tcfg.steps`` or the end
    of the data; ``run.state`` / ``run.step`` are the last step's; ``run.stopped`` the reason of a
    stop request (None: none)."""
    tcfg, monitor = run.tcfg, run.monitor
    per_step_check = monitor.policy.per_step_check
    phase = ops.phase if ops is not None else (lambda name: contextlib.nullcontext())
    try:
        while run.step < tcfg.steps:
            try:
                with phase("data_wait"):
                    batch = next(run.batches)
            except StopIteration:
                run.log(f"data exhausted after step {run.step}")
                break
            if ops is not None:
                if run.step == run.start_step:
                    ops.set_probe_batch(batch["inputs"])
                ops.before_step(run.step + 1)
            run.state, metrics = run.steps.train_step(run.state, shard_batch(batch, run.mesh), run.g_dev)
            run.step += 1
            step = run.step
            if ops is not None:
                ops.after_step(step, metrics)
            reporter.step_done(step, metrics)
            if ops is not None and step == run.start_step + 1:
                ops.compiled(reporter.first_step_s)
            if per_step_check and monitor.observe(step, float(metrics["nonfinite"]) == 0.0):
                reporter.flush(step)
                saver.save(step, force=True, finish=True)  # the bad update was not applied: the last good state
                monitor.raise_stop(run.ckpt_dir / str(step))
            last = step == tcfg.steps
            if step % tcfg.log_every == 0 or last:
                reporter.flush(step)
            for task in periodic:
                if task.due(step, last):
                    t0 = time.perf_counter()
                    with _task_phase(phase, task):
                        task.run(step)
                    reporter.exclude(time.perf_counter() - t0)
            stopped = ops.stop_reason(step) if ops is not None else None  # every step, on every process
            if stopped:
                run.stopped = stopped
                break
            if saver.due(step, last):
                with phase("checkpoint"):
                    saver.save(step)
            reason = next((r for r in (check(step) for check in run.stop_checks) if r), None)
            if reason:
                run.log(f"stopping after step {step}: {reason}")
                break
        reporter.flush(run.step)
        if run.stopped is None:
            for task in periodic:
                with _task_phase(phase, task):
                    task.final(run.step)
        with phase("checkpoint"):
            saver.save(run.step if run.step > run.start_step else None, force=True, finish=True)
        if run.stopped is not None:
            reporter.write({"kind": "stop", "step": run.step, "reason": run.stopped})
    except (CheckpointSaveError, CheckpointTimeout):
        saver.failed = True  # orbax's threads may wait in barriers for the other processes: not closed
        raise
    finally:
        if ops is not None:
            ops.close()
        reporter.close()
        saver.close()
