"""Compile-time accounting: how much of a call was tracing, lowering and XLA compilation.

`CompileWatch` is a context manager that listens to JAX's monitoring events while it is open
(``/jax/core/compile/*`` durations and the persistent compilation cache's hit events), so a caller
can report compile time apart from run time (the CLI prints both; `GenerateOutput.timings` carries
``compile_s``).  On a persistent-cache hit the backend-compile event measures the cache read only.
"""

from __future__ import annotations

import threading
import time

from jax import monitoring

__all__ = ["CompileWatch"]

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"


class CompileWatch:
    """Accumulates compile durations (seconds) seen while open.

    Attributes: ``trace_s``, ``lower_s``, ``backend_s`` (XLA compile or persistent-cache read),
    ``compiles`` (backend compile events), ``cache_hits`` / ``cache_misses`` (persistent cache).
    ``seconds``: the wall time covered by those stages, each stage's interval ending when its event
    arrives -- their union, not their sum: a function compiled while another is traced (a constant
    table made by a compiled function during tracing) has its stages inside the outer trace's,
    and a sum would count them twice (it could exceed the call's wall time).  The per-stage sums
    then overlap.  Listeners are process-wide: calls running in other threads at the same time are
    counted too.
    """

    def __init__(self) -> None:
        self.trace_s = self.lower_s = self.backend_s = 0.0
        self.compiles = self.cache_hits = self.cache_misses = 0
        self._spans: list[tuple[float, float]] = []      # (start, end) perf_counter seconds
        self._lock = threading.Lock()

    @property
    def seconds(self) -> float:
        """Seconds of wall time inside some compile stage (the union of the stages' intervals)."""
        with self._lock:
            spans = sorted(self._spans)
        total, reach = 0.0, float("-inf")
        for start, end in spans:
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    def _on_duration(self, event: str, duration: float, **_kw) -> None:
        end = time.perf_counter()
        with self._lock:
            if event in (_TRACE, _LOWER, _BACKEND):
                self._spans.append((end - duration, end))
            if event == _TRACE:
                self.trace_s += duration
            elif event == _LOWER:
                self.lower_s += duration
            elif event == _BACKEND:
                self.backend_s += duration
                self.compiles += 1

    def _on_event(self, event: str, **_kw) -> None:
        with self._lock:
            if event == _HIT:
                self.cache_hits += 1
            elif event == _MISS:
                self.cache_misses += 1

    def __enter__(self) -> "CompileWatch":
        monitoring.register_event_duration_secs_listener(self._on_duration)
        monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        monitoring.unregister_event_duration_listener(self._on_duration)
        monitoring.unregister_event_listener(self._on_event)
