"""Tidy tables of invariance results: rows (list of dicts) -> CSV and markdown.

``trace_rows`` gives one row per (tensor, step, layer, row, head) -- the full data, for CSV.
``summary_rows`` gives one row per (tensor, layer), aggregated over steps, rows and heads -- the
short table for markdown.  Floats are written with 17 significant digits in CSV (float64
round-trips exactly, so "equal to 15 decimals" can be checked from the file).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .invariance import InvarianceResult

__all__ = ["trace_rows", "summary_rows", "comparison_rows", "to_csv", "write_csv", "to_markdown",
           "write_markdown"]

_PER_MATRIX = [("rmse", "rmse"), ("order_param", "order_param"), ("det_cached", "det_ref"),
               ("det_uncached", "det_other"), ("det_decimals", "det_decimals"),
               ("logdet_cached", "logdet_ref"), ("logdet_uncached", "logdet_other"),
               ("rank_cached", "rank_ref"), ("rank_uncached", "rank_other"), ("dag_cached", "dag_ref"),
               ("dag_uncached", "dag_other"), ("mean_cached", "mean_ref"), ("mean_uncached", "mean_other"),
               ("drift_uncached", "drift_uncached"), ("order_param_uncached", "order_param_uncached")]


def _py(v):
    if isinstance(v, np.generic):
        return v.item()
    return v


def trace_rows(result: InvarianceResult) -> list[dict]:
    """One row per (tensor, step, layer, row, head) with every per-matrix metric (cached = ref)."""
    rows = []
    for key, m in result.per_key.items():
        T, Ly, B, H = m["rmse"].shape
        cols = [(name, m[src]) for name, src in _PER_MATRIX]
        for t in range(T):
            for l in range(Ly):
                for b in range(B):
                    for h in range(H):
                        r = {"tensor": key, "step": t, "layer": l, "row": b, "head": h}
                        for name, arr in cols:
                            r[name] = _py(arr[t, l, b, h])
                        rows.append(r)
    return rows


def summary_rows(result: InvarianceResult) -> list[dict]:
    """One row per (tensor, layer): worst case over steps, rows and heads.

    Columns: max_rmse, max_order_param, min_det_decimals (decimals to which cached and uncached
    determinants agree, worst matrix), rank range of both modes, max G drift, spread across heads
    (``tensor_head_spread``, mean over steps and rows), log|det| spread across heads (std over
    heads, mean over steps/rows), DAG per layer (cached at step 0, uncached at the last step).
    """
    rows = []
    for key, m in result.per_key.items():
        Ly = m["rmse"].shape[1]
        for l in range(Ly):
            sl = (slice(None), l)
            rows.append({
                "tensor": key, "layer": l,
                "max_rmse": float(np.max(m["rmse"][sl])),
                "max_order_param": float(np.nanmax(m["order_param"][sl])),
                "min_det_decimals": int(np.min(m["det_decimals"][sl])),
                "rank_cached": _range(m["rank_ref"][sl]), "rank_uncached": _range(m["rank_other"][sl]),
                "max_drift_uncached": float(np.max(m["drift_uncached"][sl])),
                "head_spread_cached": float(np.mean(result.spread[key]["cached"][sl])),
                "head_spread_uncached": float(np.mean(result.spread[key]["uncached"][sl])),
                "logdet_head_std_cached": float(np.mean(np.std(m["logdet_ref"][sl], axis=-1))),
                "logdet_head_std_uncached": float(np.mean(np.std(m["logdet_other"][sl], axis=-1))),
                "dag_cached": float(result.dag_layer[key]["cached"][0, l]),
                "dag_uncached_last": float(result.dag_layer[key]["uncached"][-1, l]),
            })
    return rows


def comparison_rows(cmp: Mapping[str, Mapping[str, np.ndarray]], index_names: Sequence[str] = ("layer", "row", "head")
                    ) -> list[dict]:
    """Rows from ``compare_runs`` output ({key: {metric: array [...]}}): one row per tensor and index."""
    rows = []
    for key, m in cmp.items():
        shape = next(iter(m.values())).shape
        names = list(index_names)[-len(shape):] if len(shape) <= len(index_names) else \
            [f"i{j}" for j in range(len(shape))]
        for idx in np.ndindex(*shape):
            r = {"tensor": key, **{n: int(i) for n, i in zip(names, idx)}}
            for metric, arr in m.items():
                r[metric] = _py(arr[idx])
            rows.append(r)
    return rows


def _range(a) -> str:
    lo, hi = int(np.min(a)), int(np.max(a))
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _columns(rows: Sequence[Mapping]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _fmt_csv(v) -> str:
    v = _py(v)
    if isinstance(v, float):
        return repr(v) if not math.isfinite(v) else format(v, ".17g")
    return "" if v is None else str(v)


def to_csv(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """CSV text (header + rows); floats with 17 significant digits."""
    columns = list(columns or _columns(rows))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt_csv(r.get(c)) for c in columns])
    return buf.getvalue()


def write_csv(rows: Sequence[Mapping], path: str | os.PathLike, columns: Sequence[str] | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(to_csv(rows, columns))
    return p


def to_markdown(rows: Sequence[Mapping], columns: Sequence[str] | None = None, floatfmt: str = ".6g",
                formats: Mapping[str, str] | None = None) -> str:
    """A GitHub markdown table.  ``formats`` overrides ``floatfmt`` per column (e.g.
    ``{"det_cached": ".15e"}``)."""
    columns = list(columns or _columns(rows))
    formats = dict(formats or {})

    def fmt(c, v):
        v = _py(v)
        if isinstance(v, float):
            return format(v, formats.get(c, floatfmt))
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[Mapping], path: str | os.PathLike, title: str | None = None,
                   notes: Iterable[str] = (), **kw) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {title}\n\n" if title else "") + "".join(f"{n}\n\n" for n in notes) + to_markdown(rows, **kw)
    p.write_text(text)
    return p
