"""The step loop of a training run: one jitted step per batch, then, at the step they are due,
the metrics row, the periodic tasks (validation, ...), the checkpoint and the stop checks.

Per step, in this order: next batch -> train step -> `Reporter.step_done` -> the non-finite check
(with the "stop" policy: save the last good state, raise) -> every ``log_every`` steps
`Reporter.flush` -> each due periodic task (`evaluation.PeriodicTask`; its time kept out of
tokens/s) -> a due checkpoint (`saving.CheckpointCadence`) -> ``run.stop_checks`` (a message ends
the loop at this step).  After the loop: the last metrics row, the tasks' ``final``, the final
checkpoint (written on every process before returning); the reporter and the checkpoint manager
are closed whatever happens (the manager not after a failed save).
"""

from __future__ import annotations

import time
from typing import Sequence

from .checkpoint import CheckpointTimeout
from .saving import CheckpointCadence, CheckpointSaveError
from .sharding import shard_batch

__all__ = ["run_steps"]


def run_steps(run, reporter, saver: CheckpointCadence, periodic: Sequence = ()) -> None:
    """Train `run` (a `setup.TrainRun` with its state and batches) up to ``tcfg.steps`` or the end
    of the data; ``run.state`` / ``run.step`` are the last step's."""
    tcfg, monitor = run.tcfg, run.monitor
    per_step_check = monitor.policy.per_step_check
    try:
        while run.step < tcfg.steps:
            try:
                batch = next(run.batches)
            except StopIteration:
                run.log(f"data exhausted after step {run.step}")
                break
            run.state, metrics = run.steps.train_step(run.state, shard_batch(batch, run.mesh), run.g_dev)
            run.step += 1
            step = run.step
            reporter.step_done(step, metrics)
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
                    task.run(step)
                    reporter.exclude(time.perf_counter() - t0)
            if saver.due(step, last):
                saver.save(step)
            reason = next((r for r in (check(step) for check in run.stop_checks) if r), None)
            if reason:
                run.log(f"stopping after step {step}: {reason}")
                break
        reporter.flush(run.step)
        for task in periodic:
            task.final(run.step)
        saver.save(run.step if run.step > run.start_step else None, force=True, finish=True)
    except (CheckpointSaveError, CheckpointTimeout):
        saver.failed = True  # orbax's threads may wait in barriers for the other processes: not closed
        raise
    finally:
        reporter.close()
        saver.close()
