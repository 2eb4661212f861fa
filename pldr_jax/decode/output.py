"""What decoding returns: `GenerateOutput` (a whole call) and `StreamStep` (one streamed step)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from .cache import Cache

__all__ = ["GenerateOutput", "StreamStep", "LayerStack"]


class LayerStack(Mapping):
    """A read-only {name: [L, ...]} mapping over per-layer arrays {name: (layer 0, layer 1, ...)},
    each name stacked when it is first read (then kept): the prompt's deductive outputs of a call
    that did not stack them in the prefill (`step.prefill` ``stack_deductive``), read from the
    final cache, which holds them per layer."""

    def __init__(self, per_layer: Mapping[str, tuple]):
        self._per_layer = dict(per_layer)
        self._stacked: dict = {}

    def __getitem__(self, name: str):
        if name not in self._stacked:
            self._stacked[name] = jnp.stack(self._per_layer[name])
        return self._stacked[name]

    def __iter__(self):
        return iter(self._per_layer)

    def __len__(self) -> int:
        return len(self._per_layer)


@dataclasses.dataclass
class GenerateOutput:
    """Result of `generate`.

    tokens: one list per prompt of its new token ids (ending with eos_id if it was produced).
    ids: [B, N] int32 new tokens, 0 after a row stopped (N = output buffer length >= max_new_tokens).
    num_generated: [B] new tokens per row.
    prompt_lengths: [B].
    mode: "kv_g" | "kv" | "g" | "none".
    steps: loop steps run (= max over rows of num_generated).
    logits: [B, steps, V] float32 per-step logits of each model call (return_logits=True), else None.
    deductive: per-step {"A_LM", "G_LM"} [steps, L, B, H, dk, dk] (return_deductive=True), else None.
    cache: the final Cache (prompt-time A / A_LM / G_LM, k/v, tokens fed so far, lengths).
    prompt_deductive: the prompt's {"A", "A_LM", "G_LM"} [L, B, H, dk, dk] (each row's own; with a
      given G only "G_LM"); a mapping, stacked from the final cache when first read (`LayerStack`)
      unless the prefill stacked them (return_deductive or shared_g).
    timings: {"prefill_s", "decode_s", "compile_s"} wall times; prefill_s and decode_s include, on
      the first call of a shape, its compilation; compile_s is the part of the call spent tracing,
      lowering and compiling (or reading the persistent compilation cache), 0.0 when nothing compiled.
    compute_dtype: the dtype the decode ran in (see `decode_dtype`).
    """
    tokens: list
    ids: np.ndarray
    num_generated: np.ndarray
    prompt_lengths: np.ndarray
    mode: str
    steps: int
    logits: np.ndarray | None = None
    deductive: dict | None = None
    cache: Cache | None = None
    prompt_deductive: Mapping | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class StreamStep:
    """One decoding step.

    step: index of the new token (0 = sampled from the prompt's logits).
    tokens: [B] int the new token of each row (0 where a row had already stopped).
    active: [B] bool, True where tokens[b] is a real new token of row b.
    done: [B] bool, True where row b has stopped after this step (EOS or its length limit).
    """
    step: int
    tokens: np.ndarray
    active: np.ndarray
    done: np.ndarray

    def __iter__(self):  # allows `for step, tokens, active, done in ...`
        return iter((self.step, self.tokens, self.active, self.done))
