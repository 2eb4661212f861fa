"""TensorBoard event files of a training run (tensorboardX's `SummaryWriter`).

Every numeric field of every metrics.jsonl record becomes a scalar tagged ``<kind>/<field>``
(``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/mfu``, ``eval/val_loss``,
``dynamics/order_parameter``, ``lm_eval/<task>/<metric>`` ...) at the record's step; the run
config is written once as text (``run_config``, JSON).  Only process 0 writes (the training
loop's `reporting.Reporter` opens it there).  Without tensorboardX (``pip install
"pldr-jax[tensorboard]"``; torch's writer is used when that is installed instead) `open` gives
None: metrics.jsonl stays the record.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from pathlib import Path
from typing import Any, Mapping

__all__ = ["TensorBoardWriter", "scalar_items"]

def scalar_items(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """(tag, value) of the finite numbers of `record` (nested dicts flattened with "/"), minus "step"
    and "kind"; booleans are left out."""
    out = []
    for k, v in record.items():
        if k in ("step", "kind") and not prefix:
            continue
        tag = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.extend(scalar_items(v, tag + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((tag, float(v)))
    return out


class TensorBoardWriter:
    """Writes metrics records and the run config through a SummaryWriter (see the module docstring).

    `open(directory)` makes one (tensorboardX, else torch's; None when neither is installed).  A failed
    write or close (e.g. a full disk) is reported once and training goes on, as for metrics.jsonl:
    checkpoints decide whether a run stops, and only process 0 writes, so raising here would split the
    processes (or mask the checkpoint error in flight)."""

    def __init__(self, writer, directory: str | Path, threads=()):
        self._tb = writer
        self.path = Path(directory)
        self._warned = False
        self._threads = tuple(threads)     # the writer's event thread(s), started by its constructor

    @classmethod
    def open(cls, directory: str | Path, flush_secs: int = 30) -> "TensorBoardWriter | None":
        try:
            from tensorboardX import SummaryWriter  # type: ignore
            kw = {"flush_secs": flush_secs}
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter  # type: ignore
                kw = {"flush_secs": flush_secs}
            except ImportError:
                return None
        Path(directory).mkdir(parents=True, exist_ok=True)
        _quiet_writer_thread_errors()
        before = set(threading.enumerate())
        writer = SummaryWriter(str(directory), **kw)
        _guard_record_writer(writer)
        threads = [t for t in threading.enumerate()       # its event thread (a tensorboard module's class)
                   if t not in before and "tensorboard" in type(t).__module__.lower()]
        return cls(writer, directory, threads)

    def _warn(self, e: OSError) -> None:
        if not self._warned:
            self._warned = True
            print(f"warning: cannot write {self.path} ({e}); training continues, further metrics may be missing",
                  file=sys.stderr, flush=True)

    def _usable(self) -> bool:
        """Whether there is a writer whose event thread still runs.  One whose thread died (an OSError
        where `_GuardedRecordWriter` does not reach, e.g. torch's writer) is let go without close():
        its queue is no longer read, so a further record would block once the queue is full and
        close() would wait forever.  Per writer: another writer of the process is not affected."""
        if self._tb is not None and any(not t.is_alive() for t in self._threads):
            self._tb = None
            self._warned = True  # the thread's failure was the warning
        return self._tb is not None

    def write(self, record: Mapping[str, Any]) -> None:
        """Scalars ``<kind>/<field>`` of one metrics.jsonl record at its step."""
        if not self._usable() or "step" not in record:
            return
        kind = record.get("kind", "train")
        try:
            for tag, v in scalar_items(record):
                self._tb.add_scalar(f"{kind}/{tag}", v, int(record["step"]))
        except OSError as e:
            self._warn(e)

    def write_config(self, config: Mapping[str, Any], step: int = 0) -> None:
        """The run config as text (JSON in a code block, which TensorBoard's text plugin renders)."""
        if not self._usable():
            return
        text = json.dumps(config, indent=2, default=str)
        try:
            self._tb.add_text("run_config", "    " + text.replace("\n", "\n    "), step)
        except OSError as e:
            self._warn(e)

    def close(self) -> None:
        if self._usable():
            try:
                self._tb.close()
            except OSError as e:
                self._warn(e)
            self._tb = None


class _GuardedRecordWriter:
    """tensorboardX's record writer (the file under its event-writer thread) with OSErrors (a full
    disk) turned into one warning and dropped records: the thread then keeps draining its bounded
    queue, so neither a later record nor close() can wait for a thread that died."""

    def __init__(self, inner):
        self._inner = inner
        self._failed = False

    def _guard(self, name, *args):
        if self._failed:
            return None
        try:
            return getattr(self._inner, name)(*args)
        except OSError as e:
            self._failed = True
            import warnings
            warnings.warn(f"TensorBoard events not written: {e}", RuntimeWarning, stacklevel=1)
            return None

    def write(self, data):
        return self._guard("write", data)

    def flush(self):
        return self._guard("flush")

    def close(self):
        return self._guard("close")


def _guard_record_writer(writer) -> None:
    """Wrap a tensorboardX SummaryWriter's record writer in `_GuardedRecordWriter` (no-op for a writer
    without that structure, e.g. torch's: the thread hook below then covers it)."""
    try:
        events = writer._get_file_writer().event_writer._ev_writer
        inner = events._py_recordio_writer
    except AttributeError:
        return
    if not isinstance(inner, _GuardedRecordWriter):
        events._py_recordio_writer = _GuardedRecordWriter(inner)


def _quiet_writer_thread_errors() -> None:
    """An OSError in a TensorBoard writer's background event thread (a full disk, where
    `_GuardedRecordWriter` does not reach) becomes one warning, not a thread traceback: the run's own
    error (e.g. the failed checkpoint save) is the message; the writer is let go (`_usable`)."""
    import traceback
    import warnings
    prev = threading.excepthook
    if getattr(prev, "_pldr_tensorboard", False):
        return

    def hook(args):
        if issubclass(args.exc_type, OSError) and "tensorboard" in "".join(
                f.filename for f in traceback.extract_tb(args.exc_traceback)).lower():
            warnings.warn(f"TensorBoard events not written: {args.exc_value}", RuntimeWarning, stacklevel=1)
            return
        prev(args)

    hook._pldr_tensorboard = True
    threading.excepthook = hook
