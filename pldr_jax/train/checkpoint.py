"""Orbax checkpoints of a training run: state, data-iterator state and config, saved together.

Layout (one orbax `CheckpointManager` directory)::

    <dir>/<step>/state/    TrainState (params, opt_state, step, rng) -- sharded arrays, tensorstore
    <dir>/<step>/data/     data-iterator state, one JSON file per process (grain's handler)
    <dir>/<step>/config/   {"model": PLDRConfig.to_dict(), "train": TrainConfig dict, ...} (JSON)

Saves are asynchronous by default (the arrays are copied off the devices, then written in a
background thread while training continues); `max_to_keep` keeps the newest N steps.  Restoring
takes an abstract TrainState whose leaves carry target shardings (`sharding.abstract_train_state`),
so a checkpoint written on one mesh restores onto any other (different device count or axes).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..config import PLDRConfig
from .integrity import jsonable_digest, tree_digest
from .multihost import DEFAULT_TIMEOUT_S

__all__ = ["CheckpointManager", "CheckpointTimeout", "read_config", "latest_step", "load_params"]


class CheckpointTimeout(TimeoutError):
    """A checkpoint save (or the wait for one) did not finish in time."""


def _grain_args():
    try:
        import grain
        return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore
    except (ImportError, AttributeError):  # pragma: no cover - grain is a dependency
        return None, None


class CheckpointManager:
    """Thin wrapper of `orbax.checkpoint.CheckpointManager` for TrainStates.

    directory: checkpoint root (created).  max_to_keep: newest checkpoints kept (None = all).
    save_interval_steps: `save(step, ..., force=False)` only saves on multiples of it.
    async_save: write in a background thread (call `wait_until_finished` / `close` at the end).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.directory = Path(directory).absolute()
        self.timeout_s = float(timeout_s)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save, create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        self._waiter = None  # (thread, result box) of `poll_pending_save`
        self._failed_write: BaseException | None = None  # this process's failed background write, once seen
        self._watch_background_writes()

    # ------------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, *, config: Mapping[str, Any] | None = None, data_iterator: Any = None,
             force: bool = False, digest: bool = True) -> bool:
        """Save `state` (a TrainState or any pytree of arrays) as checkpoint `step`, with the JSON
        `config` and the data iterator's state (a grain `DatasetIterator`, or any object with
        `get_state()` / `set_state()` of a JSON-serialisable dict), one file per process.
        Returns True when a save started.

        With `digest` (default), the config also records `integrity.tree_digest(state)` under
        "digest" (computed on the devices, collective: every process calls `save`), which resuming
        checks against the restored arrays."""
        if not (force or self._mngr.should_save(int(step))):
            return False
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if digest:
            config = {**(config or {}), "digest": jsonable_digest(tree_digest(state))}
        if config is not None:
            items["config"] = ocp.args.JsonSave(_jsonable(config))
        if data_iterator is not None:
            items["data"] = self._data_save_args(data_iterator)
        def start():
            self._mngr.check_for_errors()  # a failed asynchronous save reports here, not at the end of the run
            return bool(self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force))
        return self._timed(f"save of step {step}", start)

    def _timed(self, what: str, fn):
        """fn() in a helper thread, waited for at most `timeout_s` (orbax's waits have no timeout: a
        background save that failed on another process can leave this one waiting forever)."""
        out: dict = {}

        def run():
            try:
                out["value"] = fn()
            except BaseException as e:  # re-raised in the caller's thread
                out["error"] = e
        t = threading.Thread(target=run, name=f"pldr-checkpoint-{what}", daemon=True)
        t.start()
        t.join(self.timeout_s)
        if t.is_alive():
            raise CheckpointTimeout(f"checkpoint {what} in {self.directory} did not finish within {self.timeout_s:.0f} s "
                                    "(a save that failed on another process, or a stalled file system)")
        if "error" in out:
            raise out["error"]
        return out.get("value")

    @staticmethod
    def _data_save_args(it):
        save_cls, _ = _grain_args()
        return save_cls(_as_grain_checkpointable(it))

    # ------------------------------------------------------------------ restore
    def restore(self, abstract_state: Any, step: int | None = None, *, data_iterator: Any = None) -> tuple[Any, dict]:
        """Restore checkpoint `step` (default: latest) onto `abstract_state`'s shapes and shardings
        (e.g. `sharding.abstract_train_state(cfg, tx, mesh)`, any mesh).  With `data_iterator`,
        its position is restored in place too.  Returns (state, config dict or {})."""
        step = self._resolve(step)
        names = self.item_names(step)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if "config" in names:
            items["config"] = ocp.args.JsonRestore()
        if data_iterator is not None:
            if "data" not in names:
                raise ValueError(f"checkpoint {step} in {self.directory} has no data-iterator state")
            _, restore_cls = _grain_args()
            items["data"] = restore_cls(_as_grain_checkpointable(data_iterator))
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return out["state"], dict(out["config"]) if "config" in items and out["config"] is not None else {}

    def restore_config(self, step: int | None = None) -> dict:
        """Only the JSON config of checkpoint `step` (default: latest)."""
        step = self._resolve(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out["config"])

    def restore_raw_state(self, step: int | None = None) -> Any:
        """The saved state as a plain pytree of arrays on the default device (nested dicts; no
        target needed) -- for inference / conversion, not for resuming."""
        step = self._resolve(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return out["state"]

    def item_names(self, step: int) -> set[str]:
        d = self.directory / str(step)
        return {p.name for p in d.iterdir() if p.is_dir()} if d.is_dir() else set()

    def _resolve(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                                    f"(available: {self.all_steps()})")
        return int(step)

    def _watch_background_writes(self) -> None:
        """Record this process's background-write failure the moment orbax's write thread ends with it.

        orbax surfaces that error only through `wait_until_finished`, whose finalisation first waits in a
        cross-process barrier; when the other processes' writes succeeded they wait in a different barrier
        (for this process's commit), so a one-sided failure (e.g. only the primary's metadata write hit a
        full disk) would stall every process until orbax's own timeouts.  The write thread's target is
        wrapped to keep its error (orbax clears it when it is raised once).  This reads orbax's private
        `_async_manager` (orbax 0.11-0.12); with another layout nothing is wrapped and the failure shows,
        later, at `wait_until_finished`."""
        manager = getattr(getattr(self._mngr, "_checkpointer", None), "_async_manager", None)
        write = getattr(manager, "_thread_func", None)
        if write is None or not hasattr(manager, "_exception"):
            return

        def recording_write(*args, **kwargs):
            write(*args, **kwargs)  # catches everything, leaves the error in manager._exception
            if manager._exception is not None and not getattr(manager, "_cancel_requested", False):
                self._failed_write = manager._exception
        manager._thread_func = recording_write

    def poll_pending_save(self, wait_s: float) -> tuple[bool, BaseException | None]:
        """(finished, error) of the pending asynchronous save after waiting at most `wait_s` seconds:
        (False, None) while it is still being written; (True, None) once written (or when none was
        pending); (True, error) when it failed -- as soon as this process's write failed, even while
        orbax still waits for the other processes.  Never blocks longer than `wait_s`, so processes can
        tell each other about a failure while another one's save still waits for them."""
        if self._failed_write is not None:
            self._waiter = None  # orbax's finalisation may stay blocked in its barrier: not waited for
            return True, self._failed_write
        if self._waiter is None:
            box: dict = {}

            def wait():
                try:
                    self._mngr.wait_until_finished()
                    self._mngr.check_for_errors()
                except BaseException as e:
                    box["error"] = e
            thread = threading.Thread(target=wait, name="pldr-checkpoint-wait", daemon=True)
            thread.start()
            self._waiter = (thread, box)
        thread, box = self._waiter
        t_end = time.monotonic() + max(0.0, wait_s)
        while thread.is_alive() and self._failed_write is None and time.monotonic() < t_end:
            thread.join(min(0.05, max(0.0, t_end - time.monotonic())))
        if self._failed_write is not None:
            self._waiter = None
            return True, self._failed_write
        if thread.is_alive():
            return False, None
        self._waiter = None
        return True, box.get("error")

    # ------------------------------------------------------------------ lifecycle
    def wait_until_finished(self) -> None:
        """Block until the pending asynchronous save is written (raises its error, or
        `CheckpointTimeout` after `timeout_s`).  A write already seen failing on this process raises at
        once (orbax's finalisation of it may be waiting for the other processes)."""
        if self._failed_write is not None:
            raise self._failed_write
        self._timed("wait for the pending save", self._mngr.wait_until_finished)
        self._mngr.check_for_errors()

    def close(self) -> None:
        """Finish the pending save (raising its error) and close orbax's manager; after an error or a
        timeout orbax is left unclosed (its own close would wait on the stuck save forever)."""
        self.wait_until_finished()
        self._timed("close", self._mngr.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _JsonStateAdapter:
    """Any iterator with JSON-dict get_state()/set_state() in the shape grain's checkpoint handler
    takes for non-grain iterators (state as bytes), so that every process writes its own
    ``process_<i>-of-<n>.json`` (orbax's JsonSave would write the primary process's only)."""

    def __init__(self, it):
        self._it = it

    def get_state(self) -> bytes:
        return json.dumps(_jsonable(self._it.get_state())).encode()

    def set_state(self, state: bytes) -> None:
        self._it.set_state(json.loads(state.decode() if isinstance(state, (bytes, bytearray)) else state))

    def start_prefetch(self) -> None:
        pass


def _as_grain_checkpointable(it):
    import grain
    if isinstance(it, grain.DatasetIterator):
        return it
    if not (hasattr(it, "get_state") and hasattr(it, "set_state")):
        raise TypeError(f"data iterator {type(it).__name__} has no get_state()/set_state()")
    return _JsonStateAdapter(it)


def _jsonable(x):
    """Round-trip through json (tuples -> lists, numpy scalars -> Python); raises on the rest."""
    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
    return json.loads(json.dumps(x, default=default))


def latest_step(directory: str | os.PathLike) -> int | None:
    """Latest checkpoint step in `directory` (None if none)."""
    if not Path(directory).is_dir():
        return None
    with CheckpointManager(directory, async_save=False, max_to_keep=None) as m:
        return m.latest_step()


def read_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON config stored with checkpoint `step` (default latest) of `directory`."""
    with CheckpointManager(directory, async_save=False, max_to_keep=None) as m:
        return m.restore_config(step)


def load_params(directory: str | os.PathLike, step: int | None = None, mesh=None) -> tuple[PLDRConfig, dict, dict]:
    """(model config, params, full config dict) of a checkpoint written by `train`, for inference.

    Only the params are restored (`pldr_jax.io.orbax_params.restore_params`: no optimiser state is
    built or read, and the stored training config is not parsed, so checkpoints of other
    TrainConfig versions load), onto `mesh` with the params' sharding rules (default: the first
    local device); params come back in the stacked layout.
    """
    from ..io.orbax_params import restore_params
    shardings = None
    if mesh is not None:
        from .sharding import param_shardings
        conf = read_config(directory, step)
        shardings = param_shardings(PLDRConfig.from_dict(conf["model"]), mesh)
    return restore_params(directory, step, shardings=shardings)
