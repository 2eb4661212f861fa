"""Decoding: jitted batched generation with the KV-cache and the G-cache (`Sampler`, `generate`)."""

from .buckets import bucket_length, plan_lengths
from .cache import Cache, cache_logical_axes, cache_partition_specs, init_cache
from .compile_time import CompileWatch
from .generate import GenerateOutput, generate
from .options import DecodeOptions
from .output import StreamStep
from .plan import DecodePlan, plan
from .sampler import Sampler
from .sampling import Greedy, SamplingParams, make_sampler, sample_logits, validate_sampling
from .step import MODES, decode_step, mode_name, prefill
from .weights import decode_dtype, prepare_params

__all__ = ["Sampler", "DecodeOptions", "DecodePlan", "plan", "Cache", "init_cache", "cache_logical_axes", "cache_partition_specs", "generate",
           "GenerateOutput", "StreamStep", "MODES", "mode_name", "decode_dtype", "prepare_params", "plan_lengths",
           "bucket_length", "prefill", "decode_step", "CompileWatch",
           "Greedy", "SamplingParams", "make_sampler", "sample_logits", "validate_sampling"]
