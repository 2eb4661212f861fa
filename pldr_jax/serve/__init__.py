"""Serving: continuous batching over decode slots (`Engine`) and an OpenAI-compatible HTTP server
(`pldr_jax.serve.app`, `pldr-jax serve`)."""

from .engine import Engine, EngineStopped, Output, QueueFull, Request

__all__ = ["Engine", "Request", "Output", "QueueFull", "EngineStopped"]
