"""Batch sizes for evaluation: the default taken from a training run, and ``"auto"`` measured.

* `run_batch_size(model, max_seq_len)`: for a ``pldr-jax train`` run, the rows of ``max_seq_len`` tokens
  that hold as many tokens as one training micro-batch per device (``batch_size / grad_accum /
  devices x seq_len``): the training step held those tokens with activations for the backward pass
  and the optimiser state, so a forward-only scoring pass of the same size fits.  None for other
  checkpoints.
* `auto_batch_size(...)`: the largest batch whose scoring pass (the jitted forward the evaluator
  runs, at the longest bucket, ``max_seq_len``) fits a memory budget, measured from XLA's memory
  analysis of the compiled pass (``argument + output + temp`` bytes; nothing is run, so nothing
  can run out of memory).  The budget: ``memory_budget_bytes`` if given, else 90% of the
  accelerator's memory limit (``device.memory_stats()["bytes_limit"]``), else on CPU half of the
  host's available memory.  Peak bytes grow linearly with the batch (parameters + per-row
  activations), so two compilations (B = 1, 2) give the estimate and a third checks it (halving
  until it fits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig

__all__ = ["run_batch_size", "memory_budget_bytes", "scoring_peak_bytes", "auto_batch_size", "parse_batch_size"]

DEFAULT_BATCH_SIZE = 8


def _run_record(model) -> dict | None:
    """``run_config.json`` of the ``pldr-jax train`` run that ``model`` (workdir, checkpoints/ or a
    step folder) belongs to, or None."""
    if model is None or (isinstance(model, str) and model.startswith("preset:")):
        return None
    p = Path(model)
    if not p.is_dir():
        return None
    for cand in (p, p.parent, p.parent.parent):
        f = cand / "run_config.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
    return None


def run_batch_size(model, max_seq_len: int | None = None) -> int | None:
    """Rows of ``max_seq_len`` tokens (default: the run's model's) holding one training micro-batch
    per device of the run ``model`` belongs to (at least 1); None when ``model`` is not a training run."""
    rec = _run_record(model)
    train = (rec or {}).get("train") or {}
    max_seq_len = max_seq_len or ((rec or {}).get("model") or {}).get("max_seq_len")
    if "batch_size" not in train or not max_seq_len:
        return None
    devices = int(np.prod(list((rec.get("mesh") or {}).values()) or [1]))
    micro = int(train["batch_size"]) // max(1, int(train.get("grad_accum", 1) or 1)) // max(1, devices)
    tokens = max(1, micro) * int(train.get("seq_len") or max_seq_len)
    return max(1, tokens // int(max_seq_len))


def memory_budget_bytes(fraction_device: float = 0.9, fraction_host: float = 0.5) -> int:
    """The default memory budget of `auto_batch_size` (see the module docstring)."""
    dev = jax.devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(fraction_device * stats["bytes_limit"])
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(fraction_host * avail)


def scoring_peak_bytes(cfg: PLDRConfig, params, batch: int, *, mode: str = "full", g_lm=None) -> int:
    """Peak bytes (arguments + outputs + temporaries) of the compiled scoring pass for ``batch`` rows
    of ``cfg.max_seq_len`` tokens (the pass `pldr_jax.eval.multiple_choice.loglikelihood_tokens`
    runs: packed rows where the mode shares contexts, `shared_context`, else `score_units`' rows)."""
    from .multiple_choice import _score_full, _score_packed
    from .shared_context import shareable
    # the largest pass of that batch: full-length rows with every position scored (pos, targets [B, L])
    x = jax.ShapeDtypeStruct((int(batch), cfg.max_seq_len), jnp.int32)
    g = None if g_lm is None else jnp.asarray(g_lm, jnp.float32)
    if shareable(mode, g is not None or not cfg.learned_g):
        lowered = _score_packed.lower(cfg, params, x, x, x, x, x, g)
    else:
        lowered = _score_full.lower(cfg, params, x, x, x, g)
    m = lowered.compile().memory_analysis()
    if m is None:
        raise ValueError("this backend gives no memory analysis of compiled code; pass a number as batch_size")
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - getattr(m, "alias_size_in_bytes", 0))


def auto_batch_size(cfg: PLDRConfig, params, *, mode: str = "full", g_lm=None, budget_bytes: int | None = None,
                    max_batch_size: int = 512) -> int:
    """The largest batch (<= max_batch_size) whose scoring pass fits ``budget_bytes`` (default
    `memory_budget_bytes`).  ValueError when not even one row fits."""
    budget = memory_budget_bytes() if budget_bytes is None else int(budget_bytes)
    cap = max(1, int(max_batch_size))

    def peak(b):
        return scoring_peak_bytes(cfg, params, b, mode=mode, g_lm=g_lm)

    p1 = peak(1)
    if p1 > budget:
        raise ValueError(f"batch_size auto: one row of {cfg.max_seq_len} tokens needs {p1 / 2**30:.2f} GiB, more "
                         f"than the memory budget of {budget / 2**30:.2f} GiB")
    if cap == 1:
        return 1
    per_row = max(1, peak(2) - p1)
    b = int(min(cap, 1 + (budget - p1) // per_row))
    while b > 1 and peak(b) > budget:
        b //= 2
    return max(1, b)


def parse_batch_size(value) -> int | str:
    """lm-eval's batch_size: an int, a numeric string, or ``"auto"`` / ``"auto:N"`` (-> "auto"; the
    measurement covers every length bucket at once, so re-tuning N times would change nothing).
    ValueError for anything else."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"batch_size must be >= 1, got {value}")
        return int(value)
    s = str(value).strip().lower()
    if s == "auto" or s.startswith("auto:"):
        return "auto"
    try:
        n = int(s)
    except ValueError:
        raise ValueError(f"batch_size must be a positive int, 'auto' or 'auto:N', got {value!r}") from None
    return parse_batch_size(n)
