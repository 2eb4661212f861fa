"""Throughput, MFU and the step-time split (`pldr_jax.train.throughput`)."""

from __future__ import annotations

import types

import pytest

from pldr_jax.train.throughput import (PeakFlops, PhaseClock, chip_of_device, device_peak, measured_matmul_flops,
                                       throughput_record, train_step_flops)


def test_analytic_flops_agree_with_xla_cost_analysis():
    """The analytic matmul count vs XLA's count of the compiled CPU train step (unrolled layers, so
    no loop body is counted once): XLA adds element-wise work, softmax and the optimiser, measured
    1.06-1.09x on these models."""
    import jax
    import jax.numpy as jnp
    import pldr_jax
    from pldr_jax.train.config import TrainConfig
    from pldr_jax.train.sharding import abstract_train_state, make_mesh
    from pldr_jax.train.step import make_train_step
    B, L = 4, 32
    for cfg in (pldr_jax.PLDRConfig(num_layers=2, d_model=64, num_heads=4, dff=128, vocab_size=256, max_seq_len=64,
                                    A_dff=16, num_reslayerA=1, num_denseA=2),
                pldr_jax.PLDRConfig(num_layers=2, d_model=128, num_heads=4, dff=256, vocab_size=512, max_seq_len=64,
                                    A_dff=32, num_reslayerA=2, num_denseA=2)):
        tc = TrainConfig(batch_size=B, seq_len=L, unroll_layers=True, remat=False)
        tx, schedule = tc.optimizer()
        mesh = make_mesh(1, 1, 1)
        step = make_train_step(cfg, tx, schedule, opts=tc.step_options(), mesh=mesh)
        batch = {k: jax.ShapeDtypeStruct((B, L), jnp.int32) for k in ("inputs", "targets")}
        cost = step.lower(abstract_train_state(cfg, tx, mesh), batch, None).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        ratio = cost["flops"] / train_step_flops(cfg, B, L)
        assert 1.0 <= ratio <= 1.15, ratio


def test_chip_table_by_device_kind():
    dev = lambda kind, platform="tpu": types.SimpleNamespace(device_kind=kind, platform=platform)
    assert chip_of_device(dev("TPU v5 lite")).name == "v5e"
    assert chip_of_device(dev("TPU v6 lite")).name == "v6e"
    assert chip_of_device(dev("TPU v5")).name == "v5p"
    assert chip_of_device(dev("TPU v4")).name == "v4"
    assert chip_of_device(dev("NVIDIA H100 80GB HBM3", "gpu")).peak_bf16_flops == 989e12
    assert chip_of_device(dev("NVIDIA A100-SXM4-40GB", "gpu")).peak_bf16_flops == 312e12
    assert chip_of_device(dev("cpu", "cpu")) is None
    assert chip_of_device(dev("TPU v9 future")) is None


def test_cpu_peak_is_a_measured_matmul_rate_once_per_process():
    r1 = measured_matmul_flops("float32")
    assert 1e8 < r1 < 1e14
    assert measured_matmul_flops("float32") == r1  # cached
    peak = device_peak()
    assert peak.flops_per_s == r1 and "measured float32" in peak.source


def test_phase_clock_and_record():
    now = [0.0]
    clock = PhaseClock(clock=lambda: now[0])
    now[0] = 1.0
    clock.add("compile", 1.0)  # the first step: compilation only
    clock.interval()
    with clock.phase("data_wait"):
        now[0] = 1.5
    with clock.phase("checkpoint"):
        now[0] = 2.5
    now[0] = 5.0  # 2.5 s of compute
    iv = clock.interval()
    assert iv["wall_s"] == 4.0 and iv["compute_s"] == 2.5 and iv["data_wait_s"] == 0.5
    assert iv["checkpoint_s"] == 1.0 and iv["step_s"] == 3.0
    assert iv["goodput"] == pytest.approx(2.5 / 5.0)
    rec = throughput_record(10, iv, tokens_per_step=600, flops_per_step=3e9, peak=PeakFlops(4e10, "test"),
                            num_devices=2)
    assert rec["tokens_per_s_per_device"] == pytest.approx(600 * 10 / 3.0 / 2)
    assert rec["mfu"] == pytest.approx(3e9 * 10 / 3.0 / 2 / 4e10)
    assert rec["data_wait_s"] == 0.5 and rec["goodput"] == pytest.approx(0.5)
    assert rec["compute_s"] == 2.5 and rec["checkpoint_s"] == 1.0 and "step_s" not in rec
