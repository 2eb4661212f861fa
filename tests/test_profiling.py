"""`--profile-steps A:B`: jax.profiler traces of chosen steps (`pldr_jax.train.profiling`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pldr_jax.train.profiling import StepProfiler, parse_profile_steps


def test_parse_profile_steps():
    assert parse_profile_steps("3:5") == (3, 5)
    assert parse_profile_steps("4") == (4, 4)
    assert parse_profile_steps(None) is None
    for bad in ("5:3", "0:2", "a:b", "1:2:3"):
        with pytest.raises(ValueError):
            parse_profile_steps(bad)


def test_trace_of_the_chosen_steps_is_written(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    prof = StepProfiler((2, 3), tmp_path / "profile")
    for step in range(1, 6):
        prof.before_step(step)
        assert prof.active == (2 <= step <= 3)
        x = f(x)
        prof.after_step(step, x)
    assert prof.done and not prof.active
    files = prof.trace_files()
    assert len(files) == 1 and files[0].stat().st_size > 0
