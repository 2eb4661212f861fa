"""Decoding: jitted batched generation with the KV-cache and the G-cache (see `generate`)."""

from .buckets import bucket_length, plan_lengths
from .cache import Cache, cache_logical_axes, cache_partition_specs, init_cache
from .generate import GenerateOutput, generate
from .sampling import Greedy, Sampler, make_sampler, sample_logits, validate_sampling
from .step import MODES, decode_step, mode_name, prefill
from .weights import decode_dtype, prepare_params

__all__ = ["Cache", "init_cache", "cache_logical_axes", "cache_partition_specs", "generate",
           "GenerateOutput", "MODES", "mode_name", "decode_dtype", "prepare_params", "plan_lengths",
           "bucket_length", "prefill", "decode_step",
           "Greedy", "Sampler", "make_sampler", "sample_logits", "validate_sampling"]
