"""Training dynamics of the deductive outputs: G_LM watched on a fixed probe batch while training.

The paper's invariance claim (the G_LM inferred once from a prompt can stand in for the G_LM the
deep net would recompute later) is a property the training reaches.  `DynamicsProbe` measures it
every N steps on the same probe rows, with the metrics of `pldr_jax.analysis.invariance`:

* cached G_LM: the deductive outputs of the first ``prompt_len`` tokens of each probe row (what a
  G-cache decoder keeps); recomputed G_LM: the same rows with their next tokens appended (what the
  uncached model derives after reading more text).  Both are one forward pass with pad-aware A over
  the same right-padded buffer (one compiled function).
* ``order_parameter``: ``order_parameter(recomputed, ref=cached)`` = rmse / |mean(cached)| (0 =
  invariant) per matrix; the median over layers, rows and heads (a matrix whose mean is near 0 makes
  its own ratio explode: ``order_parameter_mean`` and ``_max`` show those);
* ``det_decimals``: decimal places to which the determinants of cached and recomputed G_LM agree
  (`matching_decimals`, as `compare_runs` reports them), the worst matrix and the median.  A
  determinant far below 1 agrees "to 15 decimals" whatever the matrices (both round to 0), so
  ``logdet_decimals`` gives the same count on log|det| (sign-blind; 15 = equal to float64 rounding),
  and ``logdet`` the mean log|det| of the cached G_LM, to tell the two cases apart;
* ``g_drift``: rmse of the cached G_LM from the previous probe's (mean over matrices; NaN at the
  first probe): how much training still moves G_LM.

Cost: two forward passes over ``rows x (prompt_len + extra)`` tokens per probe plus float64
determinants of ``2 x layers x rows x heads`` small matrices on the host (measured in
experiments/README.md, "Training dynamics").  Learned-G models only: a predefined G_LM is a
constant.  `plot_dynamics` draws loss, order parameter, drift and decimals from metrics.jsonl.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig
from ..model import forward
from .invariance import determinant, matching_decimals, order_parameter, rmse, slogdet

__all__ = ["DynamicsProbe", "probe_tokens", "plot_dynamics", "DYNAMICS_FIELDS"]

#: the fields of a metrics.jsonl "dynamics" record (besides kind and step)
DYNAMICS_FIELDS = ("order_parameter", "order_parameter_mean", "order_parameter_max", "det_decimals_min",
                   "det_decimals_median",
                   "logdet_decimals_min", "logdet_decimals_median", "logdet", "g_drift", "probe_s")


def probe_tokens(batch_tokens: np.ndarray, rows: int, prompt_len: int, extra: int) -> np.ndarray:
    """The probe buffer: the first `rows` rows of a token batch [B, >= prompt_len + extra], cut to
    prompt_len + extra tokens.  Rows with padding inside that window are refused (the cached prefix
    must be real text)."""
    t = np.asarray(batch_tokens)
    need = prompt_len + extra
    if t.ndim != 2 or t.shape[0] < rows or t.shape[1] < need:
        raise ValueError(f"the probe needs a token batch of at least {rows} rows x {need} tokens, got {t.shape}; "
                         "lower --dynamics-rows or the probe lengths")
    out = t[:rows, :need].astype(np.int32)
    if np.any(out == 0):
        raise ValueError("the probe rows contain padding (id 0) within the first prompt_len + extra tokens: use "
                         "packed data (--data-mode pack) or shorter probe lengths")
    return out


@functools.partial(jax.jit, static_argnums=0)
def _g_pair(cfg: PLDRConfig, params, tokens, prompt_len):
    """(cached G_LM, recomputed G_LM) [layers, rows, H, dk, dk] of `tokens` [rows, L]."""
    L = tokens.shape[1]
    prefix = jnp.where(jnp.arange(L)[None, :] < prompt_len, tokens, 0)
    both = jnp.concatenate([prefix, tokens], axis=0)
    g = forward(cfg, params, both, None, pad_aware_A=True).deductive["G_LM"]
    n = tokens.shape[0]
    return g[:, :n], g[:, n:]


class DynamicsProbe:
    """Deductive-output dynamics on fixed probe tokens (see the module docstring).

    tokens: [rows, prompt_len + extra] int32, the same on every process (the caller broadcasts).
    `__call__(params, step)` returns the metrics record {"kind": "dynamics", "step", ...}.
    """

    def __init__(self, cfg: PLDRConfig, tokens: np.ndarray, prompt_len: int):
        if not cfg.learned_g:
            raise ValueError("training dynamics need a learned-G model: a predefined G_LM is a constant "
                             "(turn --dynamics-every off for this model)")
        tokens = np.asarray(tokens, np.int32)
        if not 0 < prompt_len < tokens.shape[1]:
            raise ValueError(f"prompt_len must be in [1, {tokens.shape[1]}), got {prompt_len}")
        self.cfg = cfg.replace(dtype="float32") if cfg.dtype != "float32" else cfg
        self.tokens = tokens
        self.prompt_len = int(prompt_len)
        self._previous: np.ndarray | None = None

    def measure(self, params) -> tuple[np.ndarray, np.ndarray]:
        """(cached, recomputed) G_LM as host float32 arrays [layers, rows, H, dk, dk]."""
        from jax.experimental import multihost_utils
        c, r = _g_pair(self.cfg, params, jnp.asarray(self.tokens), self.prompt_len)
        if jax.process_count() > 1:
            c, r = multihost_utils.process_allgather((c, r), tiled=True)
        return np.asarray(c), np.asarray(r)

    def __call__(self, params, step: int) -> dict[str, Any]:
        import time
        t0 = time.perf_counter()
        cached, recomputed = self.measure(params)
        op = order_parameter(recomputed, cached)
        dec = matching_decimals(determinant(cached), determinant(recomputed))
        (_, ld_c), (_, ld_r) = slogdet(cached), slogdet(recomputed)
        ldec = matching_decimals(ld_c, ld_r)
        drift = float(np.mean(rmse(cached, self._previous))) if self._previous is not None else float("nan")
        self._previous = cached
        finite = op[np.isfinite(op)]
        return {"kind": "dynamics", "step": int(step),
                "order_parameter": float(np.median(finite)) if finite.size else float("nan"),
                "order_parameter_mean": float(np.mean(finite)) if finite.size else float("nan"),
                "order_parameter_max": float(np.max(finite)) if finite.size else float("nan"),
                "det_decimals_min": int(np.min(dec)), "det_decimals_median": float(np.median(dec)),
                "logdet_decimals_min": int(np.min(ldec)), "logdet_decimals_median": float(np.median(ldec)),
                "logdet": float(np.mean(ld_c[np.isfinite(ld_c)])) if np.isfinite(ld_c).any() else float("nan"),
                "g_drift": drift, "probe_s": time.perf_counter() - t0}


def plot_dynamics(records: Sequence[dict], out_path: str | os.PathLike, title: str = "") -> Path | None:
    """Loss, order parameter, G_LM drift and determinant decimals over steps (4 panels, PNG) from the
    records of a metrics.jsonl (`pldr_jax.train.read_metrics`); None when none is "dynamics"."""
    recs = list(records)
    dyn = [r for r in recs if r.get("kind") == "dynamics"]
    if not dyn:
        return None
    tr = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and "loss" in r]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), dpi=110, sharex=True)
    steps = [r["step"] for r in dyn]
    panels = [(axes[0, 0], tr, "train loss", False),
              (axes[0, 1], list(zip(steps, [r["order_parameter"] for r in dyn])), "order parameter of G_LM "
               "(rmse / |mean|, recomputed vs cached; median)", True),
              (axes[1, 0], list(zip(steps, [r["g_drift"] for r in dyn])), "G_LM drift (rmse from previous probe)",
               True),
              (axes[1, 1], list(zip(steps, [r.get("logdet_decimals_median", np.nan) for r in dyn])),
               "decimals of agreement, cached vs recomputed G_LM (median)", False)]
    for ax, pts, label, logy in panels:
        pts = [(s, v) for s, v in pts if v is not None and np.isfinite(v) and (not logy or v > 0)]
        if pts:
            ax.plot(*zip(*pts), lw=1.3)
        ax.set_title(label, fontsize=9)
        if logy and pts:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1, 1].lines[0].set_label("log|det|") if axes[1, 1].lines else None
    axes[1, 1].plot(steps, [r["det_decimals_median"] for r in dyn], lw=1.0, ls="--", label="det")
    axes[1, 1].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(title or "PLDR-LLM training dynamics", fontsize=10)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out)
    plt.close(fig)
    return out
