"""Stopping a training run cleanly: SIGTERM / SIGINT (a preempted VM, Ctrl-C) and a runtime limit.

`Preemption` answers one question after every completed step: "stop here?" -- the same answer on
every process at the same step, so the loop can write a checkpoint of that step with all processes
together, wait for the write and exit 0.

* One process (no `jax.distributed` client): SIGTERM and SIGINT set a flag (a second SIGINT
  interrupts at once, as Ctrl-C twice usually does; a second SIGTERM is ignored: the save is under
  way); the loop stops after the step it is on.
* Several processes: JAX's preemption notifier owns SIGTERM (``jax_enable_preemption_service``;
  it catches the signal on any one process and the coordination service agrees on a step:
  `jax.experimental.multihost_utils.reached_preemption_sync_point`, the mechanism orbax's
  preemption-aware saving uses).  SIGINT and the runtime limit are turned into that same notice
  (the process sends itself SIGTERM), so every cause goes through the one protocol and the processes
  stop at the same step.

``max_runtime_s`` (``--max-runtime 2h``): the same stop once that many seconds have passed since
`install`.  `parse_duration` reads "2h", "90m", "1h30m", "45s" or plain seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import threading
import time
from typing import Callable, Sequence

__all__ = ["Preemption", "parse_duration", "resume_command", "stop_message"]

_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*([dhms])", re.I)
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds of "2h", "90m", "1h30m", "45s", "1.5h" or a plain number of seconds (None -> None)."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip()
        try:
            seconds = float(s)
        except ValueError:
            parts = _DURATION.findall(s)
            if not parts or _DURATION.sub("", s).strip():
                raise ValueError(f"cannot read the duration {text!r}: write e.g. 2h, 90m, 1h30m, 45s or seconds")
            seconds = sum(float(n) * _UNIT_S[u.lower()] for n, u in parts)
    if not seconds > 0:
        raise ValueError(f"a duration must be > 0 seconds, got {text!r}")
    return seconds


def _distributed():
    """JAX's distributed client state, or None in a single-process run."""
    from jax._src import distributed
    return distributed.global_state if distributed.global_state.client is not None else None


class Preemption:
    """Stop requests of a training run (see the module docstring).

    Use as a context manager around the step loop (handlers are installed only in the main thread,
    and the previous ones restored on exit); call `reached(step)` after every completed step, with
    the optimiser step just finished: it returns the reason ("SIGTERM", "SIGINT", "max-runtime")
    when the loop should stop at that step, else None.  `clock` is for tests.
    """

    def __init__(self, max_runtime_s: float | None = None, *, log: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_runtime_s = max_runtime_s
        self._log = log or (lambda s: None)
        self._clock = clock
        self._deadline: float | None = None
        self._reason: str | None = None  # the first cause seen by this process
        self._logged = False
        self._notified = False  # multi-process: this process has posted its preemption notice
        self._previous: dict[int, object] = {}
        self._dist = None

    # ------------------------------------------------------------------ handlers
    def install(self) -> "Preemption":
        self._dist = _distributed()
        if self._dist is not None and self._dist.preemption_sync_manager is None:
            raise RuntimeError("a multi-process run stops on SIGTERM through JAX's preemption service, which is off: "
                               "enable it (jax.config.update('jax_enable_preemption_service', True) before "
                               "jax.distributed.initialize)")
        self._deadline = None if self.max_runtime_s is None else self._clock() + float(self.max_runtime_s)
        if threading.current_thread() is threading.main_thread():
            sigs = [signal.SIGINT] if self._dist is not None else [signal.SIGTERM, signal.SIGINT]
            for sig in sigs:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "Preemption":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._reason is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: stop now
                self.uninstall()
                raise KeyboardInterrupt
            return
        self._reason = name  # logged by `reached` (printing inside a handler can re-enter a write in progress)
        if self._dist is not None:
            self._notify_all()

    def _notify_all(self) -> None:
        """Multi-process: post the preemption notice through JAX's SIGTERM notifier (it polls once a
        second and starts the coordination service's sync protocol on every process)."""
        if not self._notified:
            self._notified = True
            os.kill(os.getpid(), signal.SIGTERM)

    # ------------------------------------------------------------------ the question
    def reached(self, step: int) -> str | None:
        """The reason to stop after `step` (the same on every process), or None."""
        if self._deadline is not None and self._reason is None and self._clock() >= self._deadline:
            self._reason = "max-runtime"
            if self._dist is not None:
                self._notify_all()
        if self._reason is not None and not self._logged:
            self._logged = True
            self._log(f"{self._reason} after step {step}: stopping with a checkpoint"
                      + (" (Ctrl-C again interrupts at once)" if self._reason == "SIGINT" else ""))
        if self._dist is None:
            return self._reason
        from jax.experimental import multihost_utils
        if multihost_utils.reached_preemption_sync_point(int(step)):
            return self._reason or "SIGTERM"  # the notice came from another process (or a SIGTERM here)
        return None

    @property
    def requested(self) -> str | None:
        """This process's own stop request so far (None: none seen here)."""
        return self._reason


def resume_command(argv: Sequence[str], program: str = "pldr-jax") -> str:
    """The command line that continues a stopped run: `argv` (the arguments after the program name)
    with --resume added and --overwrite / --max-runtime VALUE removed."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--overwrite" or a.startswith("--max-runtime="):
            continue
        if a == "--max-runtime":
            skip = True
            continue
        out.append(a)
    if "--resume" not in out:
        out.append("--resume")
    return shlex.join([program, *out])


def stop_message(reason: str, step: int, checkpoint: str, resume: str | None = None) -> str:
    """The one line printed when a run stops on a request: what, where it stopped, how to go on."""
    cause = "the --max-runtime limit" if reason == "max-runtime" else reason
    line = f"stopped by {cause} after step {step}; checkpoint {checkpoint} written"
    return line + (f"; resume with: {resume}" if resume else "")
