"""Throughput of a training run: tokens/s per device, model FLOPs utilisation (MFU), the step-time
split (waiting for data, computing, checkpointing, evaluating) and goodput.

* FLOPs per step: the analytic matmul count of `pldr_jax.aot.model_flops` (projections, FFN,
  attention, A = q^T q, the metric learner and PLGA, the output head; backward = 2x forward).  XLA's
  `cost_analysis()` of the compiled CPU step counts 1.06-1.09x that (element-wise work, softmax,
  the optimiser): tests/test_throughput.py checks the agreement.
* Peak per device: the published dense bf16 figure of the chip (`pldr_jax.targets.CHIPS`: TPU v4, v5e,
  v5p, v6e; A100, H100, H200), found from ``device.device_kind``; on CPU (or an unknown chip) a
  measured matmul rate at the model's compute dtype (`measured_matmul_flops`, once per process).
* `PhaseClock` splits wall time into phases; "compute" is what no phase claimed.  MFU and tokens/s
  use the step time (wall minus evaluation, checkpointing, probes, compilation); goodput is the
  compute time of the steps over the whole wall time of the run so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Iterator

__all__ = ["PeakFlops", "device_peak", "chip_of_device", "measured_matmul_flops", "train_step_flops", "PhaseClock",
           "throughput_record", "STEP_PHASES"]

#: phases that are part of a training step's time (MFU / tokens/s count them); the others
#: (evaluation, checkpointing, probes, compilation, profiling) are reported apart.
STEP_PHASES = ("data_wait",)


@dataclasses.dataclass(frozen=True)
class PeakFlops:
    """Peak FLOP/s of one device and where the figure comes from."""
    flops_per_s: float
    source: str


def chip_of_device(device):
    """The `targets.ChipSpec` of a JAX device (by its device_kind), or None for CPUs and unknown chips."""
    from ..targets import chip_of_device as of_kind
    return None if device.platform == "cpu" else of_kind(device)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 7) -> float:
    """FLOP/s of an n x n x n matmul of `dtype` on the default device, the best of `repeats` timed
    runs after a warm-up (measured once per process and dtype)."""
    import jax
    import jax.numpy as jnp
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dt))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def device_peak(device=None, dtype: str = "float32") -> PeakFlops:
    """Peak FLOP/s of `device` (default: the first device): the chip table, else (CPU, unknown
    accelerators) the measured `dtype` matmul rate."""
    import jax
    device = device if device is not None else jax.devices()[0]
    chip = chip_of_device(device)
    if chip is not None:
        return PeakFlops(chip.peak_bf16_flops, f"{chip.name} dense bf16 peak ({chip.source})")
    rate = measured_matmul_flops(str(dtype))
    return PeakFlops(rate, f"measured {dtype} 1024^3 matmul on {device.platform} ({device.device_kind})")


def train_step_flops(cfg, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one optimiser step over `batch_size` x `seq_len` tokens, all devices (the MFU
    numerator: no rematerialisation counted)."""
    from ..aot import model_flops
    return float(model_flops(cfg, batch_size, seq_len, "train"))


class PhaseClock:
    """Wall time split into named phases since the last `interval()`; the rest is "compute".

    ``with clock.phase("data_wait"): batch = next(it)``; `add(name, seconds)` moves time already spent
    into a phase (e.g. the compilation inside the first step).  Totals since construction are kept
    for goodput."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.t_start = clock()
        self._t_interval = self.t_start
        self._phases: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.compute_total = 0.0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self.add(name, self._clock() - t0)

    def add(self, name: str, seconds: float) -> None:
        self._phases[name] = self._phases.get(name, 0.0) + seconds
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def interval(self) -> dict:
        """{"wall_s", "compute_s", "step_s" (compute + data wait), <phase>_s ...} of the interval since the
        last call, and "goodput" (compute time of all intervals / wall time since construction)."""
        now = self._clock()
        wall = now - self._t_interval
        phases = self._phases
        compute = max(wall - sum(phases.values()), 0.0)
        self.compute_total += compute
        out = {"wall_s": wall, "compute_s": compute,
               "step_s": compute + sum(phases.get(p, 0.0) for p in STEP_PHASES)}
        out.update({f"{k}_s": v for k, v in phases.items()})
        run = now - self.t_start
        out["goodput"] = self.compute_total / run if run > 0 else float("nan")
        self._phases = {}
        self._t_interval = now
        return out


def throughput_record(steps: int, interval: dict, *, tokens_per_step: int, flops_per_step: float,
                      peak: PeakFlops, num_devices: int) -> dict:
    """metrics.jsonl fields of `steps` optimiser steps timed by `PhaseClock.interval()`:
    tokens_per_s_per_device, model_flops_per_s_per_device, mfu, goodput, and the seconds of each
    phase in the interval (data_wait_s, checkpoint_s, eval_s, dynamics_s, ..., compute_s)."""
    nan = float("nan")
    step_time = interval["step_s"]
    ok = steps > 0 and step_time > 0
    flops_per_s = flops_per_step * steps / step_time / num_devices if ok else nan
    rec = {"tokens_per_s_per_device": tokens_per_step * steps / step_time / num_devices if ok else nan,
           "model_flops_per_s_per_device": flops_per_s,
           "mfu": flops_per_s / peak.flops_per_s if ok else nan,
           "goodput": interval["goodput"]}
    rec.update({k: v for k, v in interval.items() if k.endswith("_s") and k not in ("wall_s", "step_s")})
    rec.setdefault("data_wait_s", 0.0)
    return rec
