"""Token selection: greedy, temperature, top-p (nucleus) and top-k, stackable in the reference's order.

The reference (`generate_text` of the authors' PyTorch code) processes the last-position logits as

1. temperature: ``logits / temperature``;
2. top-p: sort descending, ``cum = cumsum(softmax(sorted))``, keep the logits ``>= sorted[i]`` where
   ``i = max(count(cum <= p) - 1, 0)`` (so the kept set never crosses p, and holds at least one token);
3. top-k on the result: keep the logits ``>= `` the k-th largest (ties kept);
4. removed logits become ``-1e10``, then one categorical draw.

`sample_logits` does exactly that with a single sort (the k-th largest of the top-p-filtered logits is
read from the same sorted row), so temperature, top_k and top_p can be traced values: changing them
does not recompile.  ``top_k == 1`` is greedy (argmax), as in the reference where top-1 masking
followed by a categorical draw is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

__all__ = ["Greedy", "SamplingParams", "make_sampler", "validate_sampling", "sample_logits", "filter_logits",
           "greedy_tokens", "NEG_LOGIT"]

#: The value removed logits get (the reference's -1e10).
NEG_LOGIT = -1e10


# --------------------------------------------------------------------------- validation
def validate_sampling(temperature=1.0, top_k=0, top_p=1.0) -> tuple[float, int, float]:
    """Check sampling parameters; return them as (float, int, float).

    Raises ValueError naming the argument and its allowed range: temperature > 0 and finite,
    top_k an int >= 0 (0 = off, 1 = greedy), top_p in (0, 1] (1 = off).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(float(temperature)) or float(temperature) <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or int(top_k) < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter, 1 = greedy), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not math.isfinite(float(top_p)) \
            or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p!r}")
    return float(temperature), int(top_k), float(top_p)


# --------------------------------------------------------------------------- sampler objects
@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax decoding (what ``top_k=1`` means).  No randomness, no parameters."""

    @property
    def kind(self) -> tuple:
        return ("greedy",)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Stochastic decoding: temperature, then top-p, then top-k (the reference's order).

    Validated on construction (ValueError naming the field).  ``kind`` is the static part a jitted
    decoder specialises on (whether a sort is needed); the values themselves are traced.
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = validate_sampling(self.temperature, self.top_k, self.top_p)
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_k", k)
        object.__setattr__(self, "top_p", p)

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def kind(self) -> tuple:
        return ("sample", self.filtered)


def make_sampler(temperature=1.0, top_k=0, top_p=1.0) -> Greedy | SamplingParams:
    """Validated sampling parameters: ``Greedy()`` when top_k == 1, else ``SamplingParams(...)``."""
    t, k, p = validate_sampling(temperature, top_k, top_p)
    return Greedy() if k == 1 else SamplingParams(t, k, p)


# --------------------------------------------------------------------------- the math
def filter_logits(logits: jax.Array, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """Temperature, top-p then top-k filtering of logits [..., V] (float32 out).

    temperature, top_k and top_p may be Python numbers or traced scalars (top_k 0 = off, top_p 1 =
    off).  Removed entries are set to -1e10.
    """
    x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    V = x.shape[-1]
    srt = -jnp.sort(-x, axis=-1)                                              # descending
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    top_p = jnp.asarray(top_p, jnp.float32)
    i_p = jnp.maximum(jnp.sum(cum <= top_p, axis=-1, keepdims=True) - 1, 0)
    min_p = jnp.where(top_p < 1.0, jnp.take_along_axis(srt, i_p, axis=-1), -jnp.inf)
    top_k = jnp.asarray(top_k, jnp.int32)
    i_k = jnp.broadcast_to(jnp.clip(top_k, 1, V) - 1, min_p.shape)
    kth = jnp.take_along_axis(srt, i_k, axis=-1)
    kth = jnp.where(kth >= min_p, kth, NEG_LOGIT)      # k-th largest *after* the top-p filter
    min_k = jnp.where(top_k > 0, kth, -jnp.inf)
    thr = jnp.maximum(min_p, min_k)
    return jnp.where(x < thr, jnp.float32(NEG_LOGIT), x)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """argmax of logits [B, V] -> int32 [B] (the first index of the row maximum, as `jnp.argmax`).

    Written as a max, then the smallest index holding it: two plain reductions instead of one
    (value, index) reduction, which XLA:CPU runs as a scalar loop (~4 ms per step for 32 x 32000
    float32 logits, 5 % of a batch-32 decode step).  The max propagates NaN, so a row with NaN
    gives argmax's answer too (the first NaN) without a separate NaN pass: two passes over the
    logits in all (a NaN-masked max plus an any-NaN pass took 1.4 vs 0.7 ms per call at 32 x 32000,
    experiments/README.md "Decode step against its matmul floor").  Floating logits are compared in
    their own dtype (a 16-bit value converts to float32 exactly and in order: the same index, without
    a float32 copy of the logits)."""
    x = logits if jnp.issubdtype(logits.dtype, jnp.floating) else logits.astype(jnp.float32)
    V = x.shape[-1]
    m = jnp.max(x, axis=-1, keepdims=True)
    hit = (x == m) | (jnp.isnan(x) & jnp.isnan(m))
    return jnp.min(jnp.where(hit, jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1), V), axis=-1)


def _is_static(v) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def sample_logits(logits: jax.Array, key: jax.Array, temperature=1.0, top_k=0, top_p=1.0, *,
                  kind: tuple | None = None) -> jax.Array:
    """Pick one token per row of logits [B, V] -> int32 [B].

    With Python numbers the parameters are validated and the cheapest path is chosen statically
    (top_k == 1: argmax; no filter: plain categorical).  With traced values pass ``kind`` (a
    sampler's ``.kind``) to choose the path; without it the general filtered path is used.
    """
    if kind is None:
        if all(_is_static(v) for v in (temperature, top_k, top_p)):
            kind = make_sampler(temperature, top_k, top_p).kind
        else:
            kind = ("sample", True)
    if kind[0] == "greedy":
        return greedy_tokens(logits)
    if kind[1]:
        x = filter_logits(logits, temperature, top_k, top_p)
    else:
        x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
