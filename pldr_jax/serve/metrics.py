"""Prometheus metrics of a server (`prometheus_client`, one registry per app): requests, errors by
HTTP status, queue depth, live slots, time to first token, time per output token, generated tokens
and their rate over the last `RATE_WINDOW_S` seconds, and the engine's generate steps, blocks
(device calls) and admission prefills so far."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics", "RATE_WINDOW_S"]

RATE_WINDOW_S = 10.0
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """The metrics of one engine; `observe` is called with every engine `Output` of a request."""

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pldr_serve_requests", "completion requests received", registry=r)
        self.errors = Counter("pldr_serve_errors", "requests refused, by HTTP status", ["code"], registry=r)
        self.finished = Counter("pldr_serve_finished", "engine requests finished, by reason", ["reason"],
                                registry=r)
        self.tokens = Counter("pldr_serve_generated_tokens", "tokens generated", registry=r)
        Gauge("pldr_serve_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("pldr_serve_live_slots", "slots decoding a request", registry=r).set_function(lambda: engine.live_slots)
        Gauge("pldr_serve_slots", "decode slots", registry=r).set(engine.slots)
        for name, what in (("steps", "generate steps run"), ("blocks", "generate blocks (device calls)"),
                           ("admissions", "admission prefills (requests admitted together)")):
            Gauge(f"pldr_serve_engine_{name}", f"{what} since the start", registry=r).set_function(
                lambda name=name: getattr(engine, name))
        Gauge("pldr_serve_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(self.rate)
        self.ttft = Histogram("pldr_serve_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("pldr_serve_time_per_output_token_seconds", "after the first token, per token",
                              registry=r, buckets=_LATENCY_BUCKETS)
        self._times: deque = deque()
        self._lock = threading.Lock()

    def observe(self, r, out) -> None:
        n = len(out.tokens)
        if n:
            self.tokens.inc(n)
            now = time.monotonic()
            with self._lock:
                self._times.append((now, n))
        if out.tokens and len(r.tokens) == n and r.first_token_time is not None:
            self.ttft.observe(r.first_token_time - r.arrival)
        if out.finished:
            self.finished.labels(reason=out.finish_reason).inc()
            if len(r.tokens) > 1 and r.finish_time is not None:
                self.tpot.observe((r.finish_time - r.first_token_time) / (len(r.tokens) - 1))

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._times and self._times[0][0] < now - RATE_WINDOW_S:
                self._times.popleft()
            return sum(n for _, n in self._times) / RATE_WINDOW_S

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
