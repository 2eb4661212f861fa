"""Training faults: non-finite steps and checkpoint-directory preflight.

Pure helpers that the loop / step wire in with a few lines (nothing here imports the loop):

* `FaultPolicy` -- what to do when a step's loss or gradients are not finite:
  ``"skip"`` (default): the update is not applied (params and optimiser state keep their old
  values, the batch is consumed), the step is counted and logged, training goes on -- until more
  than ``max_skipped`` steps were skipped, which then acts as ``"stop"``;
  ``"stop"``: the update is not applied either, the (last good) state is saved as a checkpoint,
  then `NonFiniteError` is raised;  ``"off"``: no check (the reference's behaviour).
* `apply_gradients_guarded` -- the jit-side half: one optimiser update, skipped (`lax.cond`) when
  the loss or the gradients are not finite; returns ``(state, ok)``.  `NonFiniteMonitor` is the
  host-side half (counting, logging, the stop decision).
* `peer_failure_message` -- a multi-process run whose collective failed because another process
  died or became unreachable (Gloo's "Connection reset by peer", the coordination service's "another
  task died"): one line naming the newest complete checkpoint and how to resume, instead of the
  library's traceback (`pldr_jax.cli` prints it and exits).  When the JAX runtime aborts the process
  first (a peer lost while this one waits in the coordination service), `peerwatch` prints that line.
* `quiet_background_save_errors` -- after a failed background save, orbax's writer threads report
  the error themselves (absl ERROR records with tracebacks) and tensorstore callbacks that outlive
  orbax's event loop print asyncio's "Event loop is closed" by the dozen; the run reports the
  failure in one line of its own (`CheckpointSaveError`), so these are kept to one line each / dropped.
* `preflight_checkpoint_dir` -- before training starts: the directory can be created, a probe
  file can be written + fsynced + deleted, and the disk has room for one more checkpoint
  (`estimate_checkpoint_bytes`); `CheckpointDirError` (a ValueError) otherwise.

Corrupted checkpoints are `integrity` (digests, telling corruption from other failures) and
`resume` (the collective choice of the checkpoint to resume from).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .integrity import _chain as _error_chain
from .peerwatch import lost_peer_message

__all__ = ["FaultPolicy", "NonFiniteError", "NonFiniteMonitor", "tree_all_finite", "apply_gradients_guarded",
           "CheckpointDirError", "estimate_checkpoint_bytes", "preflight_checkpoint_dir", "is_peer_failure",
           "peer_failure_message", "quiet_background_save_errors"]

NONFINITE_POLICIES = ("skip", "stop", "off")


# =========================================================================== non-finite steps
class NonFiniteError(FloatingPointError):
    """Training stopped on a non-finite loss / gradient (policy "stop", or too many skipped steps)."""


@dataclasses.dataclass(frozen=True)
class FaultPolicy:
    """nonfinite: "skip" | "stop" | "off" (see the module docstring).
    max_skipped: with "skip", stop (as "stop") once more than this many steps were skipped in this
      run; None = never stop.
    """
    nonfinite: str = "skip"
    max_skipped: int | None = None

    def __post_init__(self):
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"FaultPolicy.nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        m = self.max_skipped
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"FaultPolicy.max_skipped must be an int >= 0 or None, got {m!r}")

    @property
    def guard(self) -> bool:
        """Whether the jitted step must guard its update (static)."""
        return self.nonfinite != "off"

    @property
    def per_step_check(self) -> bool:
        """Whether the loop must look at every step's flag as soon as it is computed (needed to
        stop right at the first bad step; "skip" can read the flags in the periodic log flush)."""
        return self.nonfinite == "stop" or (self.nonfinite == "skip" and self.max_skipped is not None)


def tree_all_finite(*trees) -> jax.Array:
    """A bool scalar: every inexact leaf of every tree is finite (jit-friendly; ints are ignored)."""
    oks = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree_util.tree_leaves(t)
           if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(oks)) if oks else jnp.bool_(True)


def apply_gradients_guarded(state, grads, tx, loss=None, *, guard: bool = True, grad_norm=None):
    """`state.apply_gradients(grads, tx)` unless the loss or the gradients are non-finite, in which
    case params and opt_state keep their old values.  ``state.step`` (the batches consumed, what the
    loop and resume count) advances either way.

    Works inside `jax.jit`: one reduction over the gradients, then a `lax.cond` between the update and
    a no-op, so a donated state is still updated in place (a per-leaf `jnp.where` against the old
    state would keep both alive and cost ~7x the optimiser update on a 110M model).  An update that
    overflows the params shows up as a non-finite loss at the next step, which is then skipped.
    grad_norm: the gradients' global norm when the caller has it (it is non-finite exactly when a
    gradient is, or when the norm overflows float32): saves the extra pass over the gradients.
    Returns ``(new_state, ok)`` with `ok` a bool scalar (True = the update was applied).
    """
    if not guard:
        return state.apply_gradients(grads, tx), jnp.bool_(True)
    ok = tree_all_finite(grads) if grad_norm is None else jnp.isfinite(grad_norm)
    if loss is not None:
        ok = ok & jnp.all(jnp.isfinite(loss))
    new = jax.lax.cond(ok, lambda s, g: s.apply_gradients(g, tx), lambda s, g: s.replace(step=s.step + 1),
                       state, grads)
    return new, ok


class NonFiniteMonitor:
    """Host-side bookkeeping of guarded steps.

    ``observe(step, ok)`` with ``ok`` the step's flag (bool / 0-1 number / array) returns True when
    the loop must stop (save the state -- the last good parameters, since the bad update was not
    applied -- then call `raise_stop`).  Skipped steps are logged once each and counted in
    ``skipped`` / ``skipped_steps``.
    """

    def __init__(self, policy: FaultPolicy = FaultPolicy(), log: Callable[..., Any] = print):
        self.policy = policy
        self.log = log
        self.skipped = 0
        self.skipped_steps: list[int] = []
        self.stop_step: int | None = None

    def observe(self, step: int, ok) -> bool:
        if self.policy.nonfinite == "off":
            return False
        if bool(np.asarray(ok)):
            return False
        self.skipped += 1
        self.skipped_steps.append(int(step))
        if self.policy.nonfinite == "stop":
            self.log(f"error: non-finite loss or gradients at step {step}; the update was not applied "
                     "(policy 'stop')")
            self.stop_step = int(step)
            return True
        self.log(f"warning: non-finite loss or gradients at step {step}; update skipped "
                 f"({self.skipped} skipped so far, policy 'skip')")
        if self.policy.max_skipped is not None and self.skipped > self.policy.max_skipped:
            self.stop_step = int(step)
            return True
        return False

    def raise_stop(self, checkpoint: str | os.PathLike | None = None):
        where = f"; the last good state was saved as checkpoint {checkpoint}" if checkpoint is not None else ""
        why = ("policy 'stop'" if self.policy.nonfinite == "stop" else
               f"more than max_skipped={self.policy.max_skipped} steps skipped: {self.skipped_steps[-10:]}")
        raise NonFiniteError(
            f"training stopped: non-finite loss or gradients at step {self.stop_step} ({why}){where}. "
            "Lower the learning rate, enable clipping, check the data or the DAG coefficients; resume "
            "with resume=True (--resume) to continue past that batch")


# =========================================================================== a lost peer
#: Words of the errors a collective or a coordination-service call raises when another process died.
_PEER_FAILURE_MARKERS = ("Gloo", "gloo", "Connection reset by peer", "Connection closed by peer", "another task died",
                         "task died", "heartbeat", "Socket closed", "UNAVAILABLE")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` (or an error it came from) is a collective or coordination failure caused by
    another process of a multi-process run going away (a runtime error of JAX naming Gloo, a closed
    connection, a dead task or missed heartbeats)."""
    for e in _error_chain(exc):
        if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(m in str(e) for m in _PEER_FAILURE_MARKERS):
            return True
    return False


def peer_failure_message(exc: BaseException, ckpt_dir: str | os.PathLike) -> str:
    """One line for a run stopped by a lost peer: what failed, the newest complete checkpoint in
    `ckpt_dir` and how to go on (`peerwatch.lost_peer_message`, which also words the line printed when
    the JAX runtime aborts the process instead)."""
    cause = next((e for e in _error_chain(exc) if any(m in str(e) for m in _PEER_FAILURE_MARKERS)), exc)
    what = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return lost_peer_message(what, ckpt_dir)


# =========================================================================== library noise after a failed save
def _is_closed_loop_error(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _OneLineOrbaxErrors(logging.Filter):
    """absl records from orbax's background threads keep their message, lose their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in (record.pathname or ""):
            record.exc_info, record.exc_text = None, None
        return True


_QUIET_INSTALLED: list = []


def quiet_background_save_errors() -> None:
    """Process-wide, idempotent: asyncio "Event loop is closed" errors that tensorstore callbacks raise
    after orbax's writer loop ended are not printed (through `sys.excepthook` and
    `sys.unraisablehook`), and orbax's absl error records print without tracebacks.  For the
    ``pldr-jax train`` command, whose own message names the failed save."""
    if _QUIET_INSTALLED:
        return
    prev_hook, prev_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(exc_type, exc, tb):
        if not _is_closed_loop_error(exc):
            prev_hook(exc_type, exc, tb)

    def unraisablehook(info):
        if not _is_closed_loop_error(info.exc_value):
            prev_unraisable(info)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    logging.getLogger("absl").addFilter(_OneLineOrbaxErrors())
    _QUIET_INSTALLED.append(True)


# =========================================================================== checkpoint directory preflight
class CheckpointDirError(ValueError):
    """The checkpoint directory is unusable (not creatable, not writable, not enough free space)."""


def estimate_checkpoint_bytes(tree) -> int:
    """Bytes of the arrays of `tree` (arrays or `jax.ShapeDtypeStruct`s, e.g. an abstract
    TrainState): roughly one uncompressed checkpoint."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
        if shape is None or dtype is None:
            continue
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            total += 8 * math.prod(shape)
            continue
        total += math.prod(shape) * np.dtype(dtype).itemsize
    return int(total)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def preflight_checkpoint_dir(path: str | os.PathLike, required_bytes: int = 0, *, margin: float = 1.25,
                             probe_bytes: int = 4096) -> Path:
    """Check, before training, that `path` can hold checkpoints: it is (or can be created as) a
    directory, a probe file can be written, fsynced and deleted, and ``margin * required_bytes``
    (e.g. `estimate_checkpoint_bytes(abstract_state)`) are free.  Returns the absolute path;
    raises `CheckpointDirError` naming the path and what to do."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise CheckpointDirError(f"checkpoint directory {str(p)!r} exists and is not a directory; "
                                 "choose another workdir")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointDirError(f"cannot create checkpoint directory {str(p)!r}: {e.strerror or e} "
                                 f"(errno {e.errno}); choose a writable workdir") from None
    probe = p / f".pldr_write_probe.{os.getpid()}.{time.monotonic_ns()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = b"\0" * probe_bytes
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        try:
            probe.unlink()
        except OSError:
            pass
        hint = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}.get(e.errno, e.strerror or str(e))
        raise CheckpointDirError(f"checkpoint directory {str(p)!r} is not writable: {hint} (errno {e.errno}); "
                                 "free space, fix the permissions or choose another workdir") from None
    if required_bytes:
        need = int(required_bytes * margin)
        free = shutil.disk_usage(p).free
        if free < need:
            raise CheckpointDirError(
                f"not enough free disk space for checkpoints in {str(p)!r}: {_fmt_bytes(free)} free, one "
                f"checkpoint needs about {_fmt_bytes(required_bytes)} (x{margin} margin = {_fmt_bytes(need)}); "
                "free space, lower keep_checkpoints or choose another workdir")
    return p
