"""`DecodeOptions`: how to decode (cache modes, sampling, stops, what to return), as one value.

`generate`, `stream_generate`, `generate_text`, `stream_text`, `Sampler` and `make_request` take a
`DecodeOptions` (``options=``) and, for convenience, the same fields as keyword arguments, which
replace the options' fields (``generate(cfg, params, prompts, max_new_tokens=8, top_k=1)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

__all__ = ["DecodeOptions", "decode_options"]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """kv_cache / g_cache: the reference's four modes (`step.MODES`).  temperature, top_k, top_p:
    sampling, applied in the reference's order (temperature, top-p, top-k); top_k=1 is greedy.
    seed: int or a PRNG key (reproducible sampling).  eos_id: a row stops after producing it (None:
    no EOS stop).  g_lm: a G_LM override [num_layers, (1|B,) H, dk, dk] used in every step
    (predefined-G configs default to their own G).  shared_g: after prefill every row uses the
    first row's G (the authors' ``cache_first_G``; prefill itself uses each row's own G).
    stop_at_max_seq_len: stop a row when it reaches max_seq_len instead of raising ValueError when
    prompt + max_new_tokens does not fit.  max_len: cache/sequence buffer length (default: a bucket
    of prompt + new tokens).  return_logits / return_deductive: also return per-step logits /
    deductive outputs (`generate` only)."""
    kv_cache: bool = True
    g_cache: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Any = 0
    eos_id: int | None = 3
    g_lm: Any = None
    shared_g: bool = False
    stop_at_max_seq_len: bool = False
    max_len: int | None = None
    return_logits: bool = False
    return_deductive: bool = False


_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeOptions))


def decode_options(options: DecodeOptions | None = None, overrides: Mapping[str, Any] | None = None) -> DecodeOptions:
    """`options` (None: the defaults) with `overrides` ({field: value}, a call's keyword arguments)
    replacing fields; ValueError naming the valid fields for an unknown one."""
    if options is None:
        options = DecodeOptions()
    elif not isinstance(options, DecodeOptions):
        raise ValueError(f"options must be a pldr_jax.decode.DecodeOptions, got {type(options).__name__}")
    if not overrides:
        return options
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown decoding argument(s) {unknown}; DecodeOptions fields: {', '.join(_FIELDS)}")
    return dataclasses.replace(options, **overrides)
