"""Stopping a run on SIGTERM / SIGINT / --max-runtime (`pldr_jax.train.preemption`)."""

from __future__ import annotations

import os
import signal

import pytest

from pldr_jax.train.preemption import Preemption, parse_duration, resume_command, stop_message


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
