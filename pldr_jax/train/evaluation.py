"""Evaluation while training: validation loss / accuracy / perplexity on the in-memory parameters.

`ValidationEval(run, reporter)` is one of the step loop's periodic tasks: objects with
``due(step, last) -> bool``, ``run(step)`` (its time is kept out of tokens/s) and ``final(step)``
(after the last step).  Other periodic work (benchmark tasks, probes of the deductive outputs) fits
the same three methods.
"""

from __future__ import annotations

from typing import Protocol

import jax

from .sharding import shard_batch
from .step import reduce_eval

__all__ = ["PeriodicTask", "ValidationEval", "evaluate"]


class PeriodicTask(Protocol):
    def due(self, step: int, last: bool) -> bool: ...

    def run(self, step: int) -> None: ...

    def final(self, step: int) -> None: ...


def evaluate(eval_step, params, val_source, mesh, g_lm=None, max_batches: int | None = None) -> dict:
    """Validation loss / accuracy / perplexity over `val_source` (first `max_batches` batches)."""
    sums = []
    it = val_source.iterator(0) if hasattr(val_source, "iterator") else iter(val_source)
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        sums.append(eval_step(params, shard_batch(batch, mesh), g_lm))
    return reduce_eval(jax.device_get(sums))


class ValidationEval:
    """Every ``eval_every`` steps (and after the last step) the run's validation data (first
    ``eval_batches`` batches), reported as an ``eval`` row; nothing without validation data."""

    def __init__(self, run, reporter):
        self._run = run
        self.reporter = reporter

    def due(self, step: int, last: bool) -> bool:
        every = self._run.tcfg.eval_every
        return bool(every) and step % every == 0 and not last

    def run(self, step: int) -> None:
        run = self._run
        if run.val_data is None:
            return
        r = evaluate(run.steps.eval_step, run.state.params, run.val_data, run.mesh, run.g_dev,
                     run.tcfg.eval_batches)
        self.reporter.eval_result({"kind": "eval", "step": step, **r})

    def final(self, step: int) -> None:
        self.run(step)
