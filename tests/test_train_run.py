"""The training run's parts (`pldr_jax.train.setup` / `steploop` / ...) and its backend choices as a
value: `TrainConfig.backend_options` (CLI ``--backend-option``) resolved once per run and part of
the compiled steps' cache key, so a changed option or ``PLDR_JAX_KERNELS`` never reuses a step
compiled for other choices."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import pldr_jax
from pldr_jax import backend
from pldr_jax.train import TrainConfig, make_mesh
from pldr_jax.train.setup import compiled_steps, resolve_backend

FAST_COMPILE = {"xla_backend_optimization_level": 0}
CFG = pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=64, max_seq_len=16, A_dff=8,
                          num_reslayerA=1, num_denseA=1)


def test_backend_options_validated_hashable_and_serialisable():
    tc = TrainConfig(backend_options={"kernels": "xla", "attention_block": "8", "decode_transposed": "float32"})
    assert tc.backend_options == (("attention_block", 8), ("decode_transposed", ("float32",)), ("kernels", "xla"))
    hash(tc)
    assert TrainConfig.from_dict(json.loads(json.dumps(tc.to_dict()))) == tc
    assert TrainConfig(backend_options=[("kernels", "xla")]).backend_options == (("kernels", "xla"),)
    with pytest.raises(ValueError, match="unknown backend option.*'kernel'.*valid options"):
        TrainConfig(backend_options={"kernel": "xla"})
    with pytest.raises(ValueError, match="kernels must be one of"):
        TrainConfig(backend_options={"kernels": "fast"})
    with pytest.raises(ValueError, match="attention_block='many'"):
        TrainConfig(backend_options={"attention_block": "many"})


def test_cli_backend_option_flag():
    import argparse

    from pldr_jax.train import cli
    sub = argparse.ArgumentParser().add_subparsers()
    p = cli.add_parser(sub)
    args = p.parse_args(["--preset", "tiny", "--backend-option", "kernels=xla", "--backend-option",
                         "unroll_layers=false"])
    tc = cli.train_config(args, cli.RECIPES["cpu"], cli.model_config(args))
    assert dict(tc.backend_options) == {"kernels": "xla", "unroll_layers": False}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli.train_config(p.parse_args(["--backend-option", "kernels"]), cli.RECIPES["cpu"], CFG)


def _step_hlo(steps, tc, mesh):
    from pldr_jax.train.sharding import abstract_train_state
    state = abstract_train_state(CFG, steps.tx, mesh)
    batch = {k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), np.int32) for k in ("inputs", "targets")}
    return steps.train_step.lower(state, batch).as_text()


def test_step_cache_follows_backend_options_and_env(monkeypatch):
    """The CPU kernels' backward pass orders its matmuls with an optimization barrier; the "xla"
    kernels have none.  Switching either way -- by option or by the environment variable -- gives
    a step compiled for the new choices, and asking again gives the cached one."""
    monkeypatch.delenv(backend.KERNELS_ENV, raising=False)
    mesh = make_mesh(-1, 1, 1, devices=jax.devices()[:1])
    tc = TrainConfig(batch_size=2, seq_len=8, warmup_steps=1, steps=2)
    cpu = compiled_steps(CFG, tc, mesh, resolve_backend(tc, mesh), FAST_COMPILE)
    assert resolve_backend(tc, mesh).kernels == "cpu"
    assert "optimization_barrier" in _step_hlo(cpu, tc, mesh)

    tc_xla = tc.replace(backend_options={"kernels": "xla"})
    xla = compiled_steps(CFG, tc_xla, mesh, resolve_backend(tc_xla, mesh), FAST_COMPILE)
    assert xla is not cpu and "optimization_barrier" not in _step_hlo(xla, tc_xla, mesh)

    monkeypatch.setenv(backend.KERNELS_ENV, "xla")
    env_xla = compiled_steps(CFG, tc, mesh, resolve_backend(tc, mesh), FAST_COMPILE)
    assert env_xla is not cpu and "optimization_barrier" not in _step_hlo(env_xla, tc, mesh)
    assert env_xla is xla  # the same resolved choices: the same compiled step

    monkeypatch.delenv(backend.KERNELS_ENV)
    assert compiled_steps(CFG, tc, mesh, resolve_backend(tc, mesh), FAST_COMPILE) is cpu


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.integers(1, 64, (2, 8), dtype=np.int32),
             "targets": rng.integers(1, 64, (2, 8), dtype=np.int32)} for _ in range(n)]


def _tc(workdir, **kw):
    return TrainConfig(workdir=str(workdir), batch_size=2, seq_len=8, warmup_steps=1, log_every=5, eval_every=0,
                       save_every=0, progress=False, plot=False, tensorboard=False, mesh=(1, 1, 1), **kw)


def test_accelerator_choices_through_train_give_the_cpu_path_losses(tmp_path, monkeypatch):
    """The whole train step with the accelerator choices (plain dot_general, lax.scan over layers,
    full remat, attention in query blocks, the head + loss in chunks), set as backend options of a
    run on CPU: the CPU path's losses over 3 steps."""
    from pldr_jax.train.loop import train
    monkeypatch.delenv(backend.KERNELS_ENV, raising=False)
    cfg = CFG.replace(num_layers=2)
    accel = {"kernels": "xla", "unroll_layers": False, "remat": "full", "attention_block": 4,
             "head_chunk_bytes": 1024}  # [2, 8, 64] float32 logits = 4 KiB: 4 chunks
    kw = dict(train_data=_batches(3), devices=jax.devices()[:1], compiler_options=FAST_COMPILE,
              log=lambda *a, **k: None)
    cpu = train(cfg, _tc(tmp_path / "cpu", steps=3), **kw)
    acc = train(cfg, _tc(tmp_path / "acc", steps=3, backend_options=accel), **kw)
    assert json.loads((tmp_path / "acc" / "run_config.json").read_text())["train"]["backend_options"] == \
        [[k, v] for k, v in sorted(accel.items())]
    assert len(cpu.losses) == len(acc.losses) == 3
    np.testing.assert_allclose(acc.losses, cpu.losses, rtol=1e-5)


def test_a_stop_check_ends_the_run_at_that_step_with_its_checkpoint(tmp_path, monkeypatch):
    """`TrainRun.stop_checks` (where a preemption signal or deadline is asked after every step):
    the first message ends the loop, and the run finishes as at its last step -- the metrics row
    and a checkpoint of the step it stopped at."""
    import pldr_jax.train.loop as loop
    from pldr_jax.train.reporting import read_metrics
    from pldr_jax.train.resume import checkpoint_steps
    orig = loop.setup_run

    def setup_with_stop(*a, **k):
        run = orig(*a, **k)
        run.stop_checks.append(lambda step: "asked to stop" if step == 3 else None)
        return run
    monkeypatch.setattr(loop, "setup_run", setup_with_stop)
    said = []
    r = loop.train(CFG, _tc(tmp_path / "run", steps=10), train_data=_batches(10), devices=jax.devices()[:1], compiler_options=FAST_COMPILE,
                   log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert r.end_step == 3 and len(r.losses) == 3
    assert checkpoint_steps(tmp_path / "run" / "checkpoints") == [3]
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"] == [3]
    assert any("stopping after step 3: asked to stop" in s for s in said)


def test_a_failing_tensorboard_write_warns_once_and_never_raises(tmp_path, capsys):
    """A full disk under the TensorBoard files must not replace the run's own error (a failed
    checkpoint save) nor stop process 0 alone: like metrics.jsonl, one warning, training goes on."""
    from pldr_jax.train.reporting import TensorBoardWriter

    class FullDisk:
        def add_scalar(self, *a):
            raise OSError(28, "No space left on device")

        close = add_scalar

    w = TensorBoardWriter(FullDisk(), tmp_path / "tensorboard")
    w.write({"kind": "train", "step": 1, "loss": 2.0})
    w.write({"kind": "train", "step": 2, "loss": 1.0})
    w.close()
    err = capsys.readouterr().err
    assert err.count("warning: cannot write") == 1 and "No space left on device" in err
