"""Checkpoint cadence of the training loop: when the loop saves, and the collective outcome of a save.

`CheckpointCadence(run)` owns the run's `CheckpointManager`.  ``due(step, last)``: every
``save_every`` steps (the last step is saved by the loop's final ``save``).  A failed save (disk
full, permissions) may show on some processes only, and an asynchronous one only later: every
process reports what it saw and all stop together with `CheckpointSaveError`, or none does.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Mapping

import jax

from . import multihost
from .checkpoint import CheckpointManager, CheckpointTimeout
from .integrity import error_summary
from .resume import checkpoint_steps

__all__ = ["CheckpointCadence", "CheckpointSaveError"]


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the message names the newest complete one, left intact).
    Raised on every process together (the processes exchange their save outcomes first)."""

    raised_on_every_process = True


class CheckpointCadence:
    """The run's checkpoint manager and the saves of the loop (see the module docstring).
    failed: a save failed (orbax's threads may wait in barriers for the other processes, so the
    manager is then not closed)."""

    def __init__(self, run):
        tcfg = run.tcfg
        self.run = run
        self.mngr = CheckpointManager(run.ckpt_dir, max_to_keep=tcfg.keep_checkpoints or None,
                                      async_save=tcfg.async_checkpoint, timeout_s=tcfg.sync_timeout_s)
        self.saving_step = None  # the step of the newest save started (its asynchronous write may still be running)
        self.failed = False

    def due(self, step: int, last: bool) -> bool:
        every = self.run.tcfg.save_every
        return bool(every) and step % every == 0 and not last

    def save(self, step_now: int | None, force: bool = False, finish: bool = False) -> None:
        """Start a save of the run's state at `step_now` (None: only settle the previous one);
        finish: wait until it is written on every process."""
        run = self.run
        if self.saving_step is not None:
            self._settle(run.step if step_now is None else step_now, None, self.saving_step)  # the previous write
            self.saving_step = None
        if step_now is not None:
            error = None
            try:
                self.mngr.save(step_now, run.state, config=run.config_record,
                               data_iterator=run.batches if run.checkpointable_data else None, force=force)
                self.saving_step = step_now
            except CheckpointTimeout:
                raise
            except Exception as e:
                error = e
            if error is not None or finish:
                self._settle(step_now, error, step_now)
                self.saving_step = None

    def _settle(self, step_now, error: BaseException | None, failed_step) -> None:
        """Collective: wait until every process's pending save is written, or stop every process as
        soon as one reports a failure (one process's failed save can leave another's waiting for it).
        `error`: this process's failure so far (then nothing is waited for)."""
        mngr, ckpt_dir = self.mngr, self.run.ckpt_dir
        t_end = time.monotonic() + mngr.timeout_s
        while True:
            done = True
            if error is None:
                done, error = mngr.poll_pending_save(1.0)
            report = ({"error": error_summary(error), "disk_full": _is_disk_full(error)} if error is not None
                      else "done" if done else "writing")
            seen = multihost.all_gather_json("pldr_save", report, self.run.tcfg.sync_timeout_s)
            failed = {i: r for i, r in enumerate(seen) if isinstance(r, dict)}
            if failed:
                raise CheckpointSaveError(_save_failure_message(ckpt_dir, failed_step, step_now, failed)) from error
            if all(r == "done" for r in seen):
                return
            if time.monotonic() > t_end:
                writing = [i for i, r in enumerate(seen) if r == "writing"]
                raise CheckpointTimeout(f"the save of step {failed_step} in {ckpt_dir} was still being written on "
                                        f"process(es) {writing} after {mngr.timeout_s:.0f} s (a stalled file system?)")

    def close(self) -> None:
        """Close the manager (not after a failed save); a closing error is logged, never raised (it
        would mask the error in flight)."""
        if self.failed:
            return
        try:
            self.mngr.close()
        except Exception as e:  # already reported by save()
            self.run.log(f"warning: closing the checkpoint manager: {type(e).__name__}: {e}")


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
