"""`--profile-steps A:B`: a `jax.profiler` trace of training steps A..B (inclusive, 1-based
optimiser steps), written under ``workdir/profile`` in the layout TensorBoard's profile plugin
(xprof) opens: ``plugins/profile/<run>/<host>.xplane.pb``.

The trace starts before step A is dispatched and stops once step B's results are ready (the loop
calls `before_step` / `after_step`), so it holds those steps' device work and nothing after.  Every
process traces its own host.  The time spent starting and stopping the profiler is reported as
the "profile" phase of the step-time split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["parse_profile_steps", "StepProfiler"]


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
    """(A, B) of "A:B" (or "A" = A:A); None -> None.  ValueError on anything else."""
    if text is None or text == "":
        return None
    parts = str(text).split(":")
    try:
        a, b = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        a, b = 0, -1
    if not 1 <= a <= b:
        raise ValueError(f"--profile-steps expects A:B with 1 <= A <= B (optimiser steps), got {text!r}")
    return a, b


class StepProfiler:
    """Start / stop a `jax.profiler` trace around steps [first, last]."""

    def __init__(self, steps: tuple[int, int] | None, logdir: str | Path, log=None):
        self.steps = steps
        self.logdir = Path(logdir)
        self.active = False
        self.done = False
        self._log = log or (lambda *a, **k: None)

    def before_step(self, step: int) -> None:
        """Call before dispatching optimiser step `step` (1-based)."""
        if self.steps is None or self.active or self.done:
            return
        if self.steps[0] <= step <= self.steps[1]:
            import jax
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after_step(self, step: int, outputs: Any = None) -> None:
        """Call after dispatching step `step` with its outputs (waited for before the trace stops)."""
        if self.active and step >= self.steps[1]:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        if not self.active:
            return
        import jax
        if outputs is not None:
            jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.active, self.done = False, True
        self._log(f"profile of steps {self.steps[0]}:{self.steps[1]} written to {self.logdir} "
                  f"(tensorboard --logdir {self.logdir}, Profile tab)")

    def trace_files(self) -> list[Path]:
        return sorted(self.logdir.glob("plugins/profile/*/*.xplane.pb"))
