"""A decode request: the arguments of `generate` / `stream_generate` validated and turned into what
the device loop takes (padded token arrays, static specs, traced loop inputs, decode weights)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..backend import choices, uses_native_decode_attention
from ..config import PLDRConfig
from ..model import normalize_g_lm
from .buckets import plan_lengths
from .loop import LoopInputs, LoopSpec
from .sampling import SamplingParams, make_sampler
from .step import StepSpec

__all__ = ["DecodeRequest", "make_request", "normalize_prompts"]


def normalize_prompts(cfg: PLDRConfig, prompts) -> list[list[int]]:
    """prompts: list of id lists (ragged), a 2-D right-padded array, or one flat id list.

    Trailing 0s (pad) are stripped; an empty prompt, a 0 inside a prompt or an id outside
    [0, vocab_size) raises ValueError.
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        prompts = [arr.tolist()] if arr.ndim == 1 else arr.tolist()
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if all(_is_int(p) for p in prompts):
        prompts = [list(prompts)]
    rows = []
    for b, p in enumerate(prompts):
        if isinstance(p, (np.ndarray, jax.Array)):
            p = np.asarray(p).reshape(-1).tolist()
        if not isinstance(p, (list, tuple)) or not all(_is_int(t) for t in p):
            raise ValueError(f"prompt {b} must be a list of integer token ids, got {p!r:.80}")
        ids = [int(t) for t in p]
        while ids and ids[-1] == 0:
            ids.pop()
        if not ids:
            raise ValueError(f"prompt {b} is empty (after stripping trailing pad 0s); give at least one token")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {b} has ids outside [0, vocab_size={cfg.vocab_size}): {bad[:5]}")
        if 0 in ids:
            raise ValueError(f"prompt {b} contains the pad id 0 before its end; 0 marks padding")
        rows.append(ids)
    return rows


def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def _as_key(seed):
    """seed: an int, a typed PRNG key or a raw uint32 key (jax.random.PRNGKey)."""
    if isinstance(seed, jax.Array):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            return seed
        if seed.dtype == jnp.uint32:
            return jax.random.wrap_key_data(seed)
    return jax.random.key(_check_int("seed", seed, -(2 ** 63)))


def _check_int(name, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{name} must be an int {rng}, got {v!r}")
    return int(v)


@dataclasses.dataclass
class DecodeRequest:
    """A validated decode call.

    spec: the static loop spec.  params: decode weights (`prepare_params`).  tokens [B, P] int32
    right-padded prompts, lengths [B] int32.  g_all: None or the given G_LM [L, B|1, H, dk, dk].
    inputs: the traced loop inputs.  key: PRNG key.  max_len: cache/sequence buffer length S.
    n_out: output buffer length N.  max_new_tokens: as asked.
    """
    spec: LoopSpec
    params: Any
    tokens: np.ndarray
    lengths: np.ndarray
    g_all: Any
    inputs: LoopInputs
    key: Any
    max_len: int
    n_out: int
    max_new_tokens: int


def make_request(cfg, weights: Callable[[int], tuple], prompts, *, max_new_tokens, kv_cache, g_cache, temperature,
                 top_k, top_p, seed, eos_id, g_lm, shared_g, stop_at_max_seq_len, max_len, return_logits,
                 return_deductive, platform: str | None = None, sharded: bool = False) -> DecodeRequest:
    """Validate `generate`'s arguments (see there) and build the `DecodeRequest`; ValueError if invalid.

    weights: batch size -> (run_cfg, run_params), the decode weights for that many rows
    (`Sampler.weights`: prepared once per decode dtype, not per call).  platform: where it decodes
    (None = the default backend), for its KV-cache dtype (`pldr_jax.backend`)."""
    if not isinstance(cfg, PLDRConfig):
        raise ValueError(f"cfg must be a PLDRConfig, got {type(cfg).__name__}")
    max_new = _check_int("max_new_tokens", max_new_tokens, 1)
    sampler = make_sampler(temperature, top_k, top_p)
    if eos_id is not None:
        eos_id = _check_int("eos_id", eos_id, 0, cfg.vocab_size)
    rows = normalize_prompts(cfg, prompts)
    backend = choices(platform)
    B = len(rows)
    lens = np.array([len(r) for r in rows], np.int32)
    P, S, N = plan_lengths(cfg, int(lens.max()), max_new, max_len=max_len,
                           stop_at_max_seq_len=stop_at_max_seq_len)
    limit = np.minimum(max_new, S - lens).astype(np.int32)
    tokens = np.zeros((B, P), np.int32)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = r
    g_all = normalize_g_lm(cfg, g_lm)
    if g_all is not None:
        if g_all.shape[1] not in (1, B):
            raise ValueError(f"g_lm has batch axis {g_all.shape[1]}; expected 1 or the number of prompts ({B})")
        if shared_g:
            g_all = g_all[:, :1]
    run_cfg, run_params = weights(B)
    given = g_all is not None
    # with a given G the G-cache flag changes nothing (G is fixed anyway): one compilation for both
    # one shared KV slot per step (`decode.cache` "KV slots", where the backend wants it) if the buffer
    # holds the longest prompt + the most tokens any row decodes; else (CPU, or stop_at_max_seq_len
    # with unequal prompts) each row's own position
    shared_slot = (bool(kv_cache) and backend.decode_shared_kv_slot
                   and int(lens.max()) + int(limit.max()) <= S)
    # per-row slots on CPU: the cache write + attention as the native kernel where it builds (its
    # buffers in the compute dtype), else the jax.lax path (a 16-bit model's buffers wider there)
    native_kv = bool(kv_cache) and not shared_slot and uses_native_decode_attention(backend, run_cfg.dtype,
                                                                                     sharded=sharded)
    wide = None if native_kv else backend.kv_cache_dtype
    kv_dtype = wide if wide and jnp.dtype(run_cfg.dtype).itemsize < jnp.dtype(wide).itemsize else None
    step = StepSpec(cfg=run_cfg, kv_cache=bool(kv_cache), g_cache=bool(g_cache) or given, given_g=given,
                    kv_dtype=kv_dtype, shared_slot=shared_slot, merged_heads=backend.decode_merged_heads,
                    kv_chunk=backend.decode_kv_chunk if kv_cache else 0, native_kv=native_kv)
    spec = LoopSpec(step=step, shared_g=bool(shared_g), sampler_kind=sampler.kind,
                    collect_logits=bool(return_logits), collect_deductive=bool(return_deductive))
    t, k, p = (sampler.temperature, sampler.top_k, sampler.top_p) if isinstance(sampler, SamplingParams) else (1.0, 1, 1.0)
    inputs = LoopInputs(max_new=np.int32(max_new), limit=limit, eos_id=np.int32(-1 if eos_id is None else eos_id),
                        temperature=np.float32(t), top_k=np.int32(k), top_p=np.float32(p))
    return DecodeRequest(spec=spec, params=run_params, tokens=tokens, lengths=lens, g_all=g_all, inputs=inputs,
                         key=_as_key(seed), max_len=S, n_out=N, max_new_tokens=max_new)
