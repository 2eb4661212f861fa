"""Plots of deductive outputs (matplotlib, Agg canvas; no pyplot global state).

Each function returns the ``matplotlib.figure.Figure`` and, given ``path``, also saves a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["heatmap_grid", "plot_deductive_heatmaps", "plot_drift"]


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, dpi=100):
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=dpi)
    return fig


def heatmap_grid(x, title: str = "", path: str | os.PathLike | None = None, cmap: str = "viridis",
                 shared_scale: bool = False, max_heads: int | None = None, dpi: int = 100):
    """Heatmaps of ``x [layers, H, dk, dk]`` in a layers x heads grid (one colour bar per panel
    unless ``shared_scale``).  ``max_heads`` limits the columns for wide models."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"heatmap_grid needs [layers, H, dk, dk], got shape {x.shape}")
    Ly, H = x.shape[:2]
    H = min(H, max_heads) if max_heads else H
    fig = _figure((1.9 * H + 0.6, 1.7 * Ly + 0.6))
    axes = np.atleast_2d(fig.subplots(Ly, H, squeeze=False))
    finite = x[np.isfinite(x)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if shared_scale and finite.size else (None, None)
    im = None
    for l in range(Ly):
        for h in range(H):
            ax = axes[l, h]
            im = ax.imshow(x[l, h], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if l == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {l}", fontsize=8)
            if not shared_scale:
                fig.colorbar(im, ax=ax, shrink=0.7).ax.tick_params(labelsize=6)
    if shared_scale and im is not None:
        fig.colorbar(im, ax=axes, shrink=0.7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def plot_deductive_heatmaps(deductive: Mapping[str, np.ndarray], out_dir: str | os.PathLike | None = None,
                            keys: Sequence[str] = ("A_LM", "A_P", "G_LM"), row: int = 0, prefix: str = "",
                            **kw) -> dict:
    """Heatmaps per layer and head of each deductive output ``[layers, B, H, dk, dk]`` for batch
    row ``row``.  Returns {key: Figure}; with ``out_dir`` saves ``{prefix}{key}.png`` there."""
    figs = {}
    for k in keys:
        if k not in deductive:
            continue
        x = np.asarray(deductive[k])
        if x.ndim == 5:
            x = x[:, row]
        path = None if out_dir is None else Path(out_dir) / f"{prefix}{k}.png"
        figs[k] = heatmap_grid(x, title=f"{prefix}{k} (row {row})", path=path, **kw)
    return figs


def plot_drift(drift, path: str | os.PathLike | None = None, row: int = 0,
               title: str = "G_LM drift from the prompt-time value", ylabel: str = "RMSE to step 0",
               dpi: int = 100):
    """Drift over generated steps: ``drift [T, layers, B, H]`` (e.g. ``per_key["G_LM"]["drift_uncached"]``)
    or ``[T, layers]``.  One line per layer (mean over heads) with a min-max band over heads."""
    d = np.asarray(drift, dtype=np.float64)
    if d.ndim == 4:
        d = d[:, :, row]
    if d.ndim == 2:
        d = d[..., None]
    if d.ndim != 3:
        raise ValueError(f"plot_drift needs [T, layers, B, H], [T, layers, H] or [T, layers]; got {np.shape(drift)}")
    T, Ly, _ = d.shape
    fig = _figure((6.0, 3.6))
    ax = fig.subplots()
    steps = np.arange(T)
    for l in range(Ly):
        line, = ax.plot(steps, d[:, l].mean(axis=-1), marker="o", ms=3, label=f"layer {l}")
        ax.fill_between(steps, d[:, l].min(axis=-1), d[:, l].max(axis=-1), color=line.get_color(), alpha=0.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation step (band: min-max over heads)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi)
