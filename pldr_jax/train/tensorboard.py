"""TensorBoard event files of a training run (tensorboardX's `SummaryWriter`).

Every numeric field of every metrics.jsonl record becomes a scalar tagged ``<kind>/<field>``
(``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/mfu``, ``eval/val_loss``,
``dynamics/order_parameter``, ``lm_eval/<task>/<metric>`` ...) at the record's step; the run
config is written once as text (``run_config``, JSON).  Only process 0 writes (the loop passes
`enabled` accordingly).  Without tensorboardX (``pip install "pldr-jax[tensorboard]"``) the writer
warns once and does nothing: metrics.jsonl stays the record.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping

__all__ = ["TensorBoardWriter", "scalar_items"]


def scalar_items(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """(tag, value) of the finite numbers of `record` (nested dicts flattened with "/"), minus "step"
    and "kind"; booleans are left out."""
    out = []
    for k, v in record.items():
        if k in ("step", "kind") and not prefix:
            continue
        tag = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.extend(scalar_items(v, tag + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((tag, float(v)))
    return out


class TensorBoardWriter:
    """Writes metrics records and the run config into ``logdir`` (see the module docstring)."""

    def __init__(self, logdir: str | Path, enabled: bool = True, flush_secs: int = 30):
        self.logdir = Path(logdir)
        self._w = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            print("warning: tensorboardX is not installed: no TensorBoard events (pip install "
                  "\"pldr-jax[tensorboard]\"); metrics.jsonl has every metric", file=sys.stderr, flush=True)
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._w = SummaryWriter(str(self.logdir), flush_secs=flush_secs)

    @property
    def active(self) -> bool:
        return self._w is not None

    def write(self, record: Mapping[str, Any]) -> None:
        """Scalars ``<kind>/<field>`` of one metrics.jsonl record at its step."""
        if self._w is None or "step" not in record:
            return
        kind = record.get("kind", "train")
        for tag, v in scalar_items(record):
            self._w.add_scalar(f"{kind}/{tag}", v, int(record["step"]))

    def write_config(self, config: Mapping[str, Any], step: int = 0) -> None:
        """The run config as text (JSON in a code block, which TensorBoard's text plugin renders)."""
        if self._w is not None:
            text = json.dumps(config, indent=2, default=str)
            self._w.add_text("run_config", "    " + text.replace("\n", "\n    "), step)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None
