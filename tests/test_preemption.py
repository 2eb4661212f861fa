"""Stopping a run on SIGTERM / SIGINT / --max-runtime (`pldr_jax.train.preemption`).

The process tests run real training processes (this file as a worker script: ``python
tests/test_preemption.py NPROC PID PORT WORKDIR OUT``), send SIGTERM to one of them mid-run and
check: every process stops at the same step with exit 0, a complete checkpoint of that step, the
stop message; resuming continues at exactly that step with the uninterrupted run's losses, bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pldr_jax.train.preemption import Preemption, parse_duration, resume_command, stop_message

try:
    from .process_faults import complete_checkpoint_steps, finish_processes, slow_steps_from_env, train_losses
    from .test_multiprocess import ArrayBatches, _free_port, micro_cfg
except ImportError:  # run as a worker script
    from process_faults import complete_checkpoint_steps, finish_processes, slow_steps_from_env, train_losses
    from test_multiprocess import ArrayBatches, _free_port, micro_cfg

HERE = Path(__file__).resolve()
STEPS = 16
GLOBAL_BATCH = 8
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def test_parse_duration():
    assert parse_duration("2h") == 7200.0
    assert parse_duration("90m") == 5400.0
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("45s") == 45.0
    assert parse_duration("3600") == 3600.0
    assert parse_duration(12.5) == 12.5
    assert parse_duration(None) is None
    for bad in ("2x", "h", "-5", "0", "1h junk"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_resume_command_adds_resume_and_drops_overwrite_and_deadline():
    cmd = resume_command(["train", "--preset", "small", "--overwrite", "--max-runtime", "2h", "--workdir", "runs/a b"])
    assert cmd == "pldr-jax train --preset small --workdir 'runs/a b' --resume"
    assert resume_command(["train", "--resume", "--max-runtime=90m"]) == "pldr-jax train --resume"
    assert "after step 7" in stop_message("SIGTERM", 7, "w/checkpoints/7", cmd)
    assert "--max-runtime" in stop_message("max-runtime", 7, "w/checkpoints/7")


def test_sigterm_and_sigint_set_a_stop_in_one_process():
    before = signal.getsignal(signal.SIGTERM)
    logged = []
    with Preemption(log=logged.append) as p:
        assert p.reached(1) is None
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before the next bytecode
        assert p.reached(2) == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM is ignored: the save is under way
        assert p.reached(3) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert len(logged) == 1 and "SIGTERM after step 2" in logged[0]
    with Preemption() as p:
        os.kill(os.getpid(), signal.SIGINT)
        assert p.reached(5) == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: at once
            os.kill(os.getpid(), signal.SIGINT)


def test_max_runtime_deadline():
    now = [100.0]
    with Preemption(max_runtime_s=30.0, clock=lambda: now[0]) as p:
        now[0] = 129.9
        assert p.reached(1) is None
        now[0] = 130.0
        assert p.reached(2) == "max-runtime"


# --------------------------------------------------------------------------- real processes
def _batches(lo, hi):
    """Deterministic global batches (rows [lo, hi) of each: this process's part), checkpointable."""
    return ArrayBatches(lo, hi, n=STEPS + 4)


def _worker(nproc: int, pid: int, port: int, workdir: str, out: str, straight: str | None = None) -> None:
    """Train in `workdir` (resuming when it holds checkpoints); then, with `straight`, an uninterrupted
    run there in the same processes (the compiled step is reused: no second compilation)."""
    from pldr_jax.train.cli import _summary
    from pldr_jax.train.loop import TrainConfig, init_distributed, train
    if nproc > 1:
        init_distributed(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid, initialization_timeout_s=120)
    slow_steps_from_env()
    part = GLOBAL_BATCH // nproc
    runs = {}
    for key, wd in (("", Path(workdir)), ("straight_", Path(straight) if straight else None)):
        if wd is None:
            continue
        resume = (wd / "checkpoints").is_dir() and any(p.name.isdigit() for p in (wd / "checkpoints").iterdir())
        tc = TrainConfig(workdir=str(wd), steps=STEPS, seq_len=12, batch_size=GLOBAL_BATCH, learning_rate=1e-2,
                         warmup_steps=1, log_every=1, eval_every=0, save_every=0, keep_checkpoints=2,
                         progress=False, plot=False, tensorboard=False, mesh=(1, nproc, 1), resume=resume)
        r = train(micro_cfg(), tc, train_data=_batches(pid * part, (pid + 1) * part), val_data=[],
                  compiler_options=FAST_COMPILE, log=lambda *a, **k: print(*a, flush=True))
        print(_summary(r), flush=True)
        runs.update({key + "losses": np.asarray(r.losses, np.float64), key + "start": r.start_step,
                     key + "end": r.end_step, key + "stopped": str(r.stopped)})
    if pid == 0:
        np.savez(out, **runs)
    if nproc > 1:
        import jax
        jax.distributed.shutdown()


def _launch(nproc, workdir, out, slow=None, straight=None):
    env = dict(os.environ, PYTHONHASHSEED="0", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    if slow:
        env["PLDR_SLOW_STEP"] = str(slow)
    port = _free_port()
    extra = [str(straight)] if straight else []
    return [subprocess.Popen([sys.executable, str(HERE), str(nproc), str(pid), str(port), str(workdir), str(out),
                              *extra],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for pid in range(nproc)]


def _logged_steps(metrics: Path) -> int:
    return max(train_losses(metrics), default=0) if metrics.exists() else 0


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_the_last_step_and_resume_is_exact(tmp_path, nproc):
    wd = tmp_path / "stopped"
    procs = _launch(nproc, wd, tmp_path / "stopped.npz", slow=0.25)
    t0 = time.monotonic()
    while _logged_steps(wd / "metrics.jsonl") < 3:
        assert all(p.poll() is None for p in procs) and time.monotonic() - t0 < 200, "no training progress"
        time.sleep(0.05)
    procs[-1].send_signal(signal.SIGTERM)  # one process (one preempted VM): all stop together
    logs = finish_processes(procs, timeout=300)
    got = np.load(tmp_path / "stopped.npz")
    stop = int(got["end"])
    assert str(got["stopped"]) == "SIGTERM" and 3 <= stop < STEPS, (stop, logs[0][-2000:])
    assert complete_checkpoint_steps(wd / "checkpoints")[-1] == stop
    assert f"stopped by SIGTERM after step {stop}" in logs[0] and "--resume" in logs[0]
    if nproc > 1:
        step_dir = wd / "checkpoints" / str(stop)
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in (step_dir / "data").iterdir()}

    # resume; then, in the same processes, the uninterrupted run to compare with
    finish_processes(_launch(nproc, wd, tmp_path / "resumed.npz", straight=tmp_path / "straight"))
    res = np.load(tmp_path / "resumed.npz")
    ref = res["straight_losses"]
    assert len(ref) == STEPS and str(res["straight_stopped"]) == "None"
    assert int(res["start"]) == stop and int(res["end"]) == STEPS and str(res["stopped"]) == "None"
    np.testing.assert_array_equal(got["losses"], ref[:stop])  # bitwise, before the stop ...
    np.testing.assert_array_equal(res["losses"], ref[stop:])  # ... and after it


def test_max_runtime_stops_with_a_checkpoint(tmp_path):
    from pldr_jax.train.loop import TrainConfig, train
    tc = TrainConfig(workdir=str(tmp_path / "w"), steps=STEPS, seq_len=12, batch_size=GLOBAL_BATCH,
                     learning_rate=1e-2, warmup_steps=1, log_every=1, eval_every=0, save_every=0, progress=False,
                     plot=False, tensorboard=False, max_runtime_s=1e-3)
    r = train(micro_cfg(), tc, train_data=_batches(0, GLOBAL_BATCH), val_data=[], compiler_options=FAST_COMPILE,
              log=lambda *a, **k: None)
    assert r.stopped == "max-runtime" and r.end_step == 1
    assert complete_checkpoint_steps(tmp_path / "w" / "checkpoints") == [1]
    recs = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "stop", "step": 1, "reason": "max-runtime"} in recs


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], *sys.argv[6:7])
