"""TensorBoard event files (`pldr_jax.train.tensorboard`), read back with TensorBoard's own reader."""

from __future__ import annotations

import pytest

from pldr_jax.train.tensorboard import TensorBoardWriter, scalar_items


def _accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_records_and_config_read_back(tmp_path):
    w = TensorBoardWriter.open(tmp_path / "tb")
    w.write_config({"model": {"d_model": 32}, "train": {"steps": 3}})
    for s in (1, 2, 3):
        w.write({"kind": "train", "step": s, "loss": 5.0 - s, "lr": 1e-3 * s, "grad_norm": 0.5, "mfu": 0.1,
                 "nan_field": float("nan"), "flag": True})
    w.write({"kind": "eval", "step": 3, "val_loss": 2.5})
    w.write({"kind": "lm_eval", "step": 3, "arc": {"acc": 0.25}})
    w.close()
    acc = _accumulator(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/mfu", "eval/val_loss", "lm_eval/arc/acc"} <= tags
    assert "train/nan_field" not in tags and "train/flag" not in tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert acc.Scalars("train/lr")[-1].value == pytest.approx(3e-3)
    texts = acc.Tags()["tensors"]
    assert any("run_config" in t for t in texts)


def test_a_failing_write_warns_once_and_never_raises(tmp_path, capsys):
    class FullDisk:
        def add_scalar(self, *a):
            raise OSError(28, "No space left on device")

        add_text = close = add_scalar

    w = TensorBoardWriter(FullDisk(), tmp_path / "tb")
    w.write_config({"a": 1})
    w.write({"kind": "train", "step": 1, "loss": 2.0})
    w.close()
    err = capsys.readouterr().err
    assert err.count("warning: cannot write") == 1 and "No space left on device" in err
    assert scalar_items({"step": 1, "kind": "x", "a": 1, "b": {"c": 2.0}}) == [("a", 1.0), ("b/c", 2.0)]


def _full(*a, **k):
    raise OSError(28, "No space left on device")


def test_a_full_disk_under_the_writer_thread_never_blocks_the_run(tmp_path, monkeypatch):
    """tensorboardX writes from a thread through a bounded queue; when the disk is full under it (the
    record file's write raises OSError), the run's further records and close() must not wait (a dead
    thread's queue would block training forever): one warning, records dropped.  Another writer of
    the same process (a later run, a notebook) keeps writing."""
    import threading

    record_writer = pytest.importorskip("tensorboardX.record_writer")
    w = TensorBoardWriter.open(tmp_path / "tb")
    monkeypatch.setattr(record_writer.RecordWriter, "write", _full)
    monkeypatch.setattr(record_writer.RecordWriter, "flush", _full)
    done = threading.Event()

    def train():
        for step in range(1, 200):  # far more records than the writer's queue holds
            w.write({"kind": "train", "step": step, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5})
        w.close()
        done.set()
    with pytest.warns(RuntimeWarning, match="TensorBoard events not written") as rec:
        t = threading.Thread(target=train, daemon=True)
        t.start()
        assert done.wait(30), "writing metrics blocked after the disk under TensorBoard's writer filled"
    assert len([r for r in rec if "TensorBoard" in str(r.message)]) == 1
    monkeypatch.undo()
    other = TensorBoardWriter.open(tmp_path / "tb2")
    other.write({"kind": "train", "step": 1, "loss": 1.5})
    other.close()
    assert [(e.step, e.value) for e in _accumulator(tmp_path / "tb2").Scalars("train/loss")] == [(1, 1.5)]


def test_a_writer_whose_event_thread_died_is_let_go_alone(tmp_path, capsys):
    """Where the guard does not reach (torch's writer), a dead event thread means a queue nobody reads:
    that writer's records and close() are skipped (no wait), and only that writer's."""
    import threading

    class Blocking:
        def __init__(self):
            self.calls = 0

        def add_scalar(self, *a):
            self.calls += 1

        def close(self):
            raise AssertionError("close() of a writer whose thread died would wait forever")

    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    alive_ev = threading.Event()
    alive = threading.Thread(target=alive_ev.wait, daemon=True)
    alive.start()
    a, b = Blocking(), Blocking()
    wa, wb = TensorBoardWriter(a, tmp_path / "a", [dead]), TensorBoardWriter(b, tmp_path / "b", [alive])
    for w in (wa, wb):
        w.write({"kind": "train", "step": 1, "loss": 2.0})
    wa.close()
    assert (a.calls, b.calls) == (0, 1)
    b.close = lambda: None
    wb.close()
    alive_ev.set()


def test_open_tracks_the_writers_own_event_thread(tmp_path):
    """`open` keeps the thread tensorboardX's writer started (not other threads of the process), and
    the writer is let go once that thread is gone."""
    pytest.importorskip("tensorboardX")
    w = TensorBoardWriter.open(tmp_path / "tb")
    assert w._threads and all("tensorboard" in type(t).__module__.lower() and t.is_alive() for t in w._threads)
    w.close()
