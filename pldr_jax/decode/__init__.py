"""Decoding: jitted batched generation with the KV-cache and the G-cache (see `generate`)."""

from .cache import Cache, cache_logical_axes, cache_partition_specs, init_cache
from .generate import (MODES, GenerateOutput, decode_dtype, generate, mode_name, plan_lengths,
                       prepare_params)
from .sampling import Greedy, Sampler, make_sampler, sample_logits, validate_sampling

__all__ = ["Cache", "init_cache", "cache_logical_axes", "cache_partition_specs", "generate",
           "GenerateOutput", "MODES", "mode_name", "decode_dtype", "prepare_params", "plan_lengths",
           "Greedy", "Sampler", "make_sampler", "sample_logits", "validate_sampling"]
