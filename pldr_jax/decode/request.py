"""A decode request: the arguments of `generate` / `stream_generate` validated and turned into what
the device loop takes (padded token arrays, the `plan.DecodePlan`, traced loop inputs, decode
weights)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..backend import BackendChoices
from ..config import PLDRConfig
from ..model import normalize_g_lm
from .loop import LoopInputs, LoopSpec
from .options import DecodeOptions, decode_options
from .plan import DecodePlan, plan
from .sampling import SamplingParams, make_sampler

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

    plan: its `plan.DecodePlan` (static specs and lengths).  spec: plan.spec.  params: decode
    weights (`prepare_params`).  tokens [B, P] int32 right-padded prompts, lengths [B] int32.  g_all:
    None or the given G_LM [L, B|1, H, dk, dk].  inputs: the traced loop inputs.  key: PRNG key.
    max_len: cache/sequence buffer length S.  n_out: output buffer length N.  max_new_tokens: as
    asked.  options: the `DecodeOptions`.
    """
    plan: DecodePlan
    params: Any
    tokens: np.ndarray
    lengths: np.ndarray
    g_all: Any
    inputs: LoopInputs
    key: Any
    max_new_tokens: int
    options: DecodeOptions

    @property
    def spec(self) -> LoopSpec:
        return self.plan.spec

    @property
    def max_len(self) -> int:
        return self.plan.max_len

    @property
    def n_out(self) -> int:
        return self.plan.n_out


def make_request(cfg, weights: Callable[[int], tuple], prompts, *, max_new_tokens, options: DecodeOptions | None = None,
                 backend: BackendChoices | None = None, sharded: bool = False, **overrides) -> DecodeRequest:
    """Validate a decode call (`DecodeOptions`, with `overrides` of its fields) and build the
    `DecodeRequest`; ValueError if invalid.

    weights: batch size -> (run_cfg, run_params), the decode weights for that many rows
    (`Sampler.weights`: prepared once per decode dtype, not per call).  backend: the resolved
    `pldr_jax.backend.BackendChoices` (None: `choices()`).  sharded: over a mesh of several devices."""
    if not isinstance(cfg, PLDRConfig):
        raise ValueError(f"cfg must be a PLDRConfig, got {type(cfg).__name__}")
    opts = decode_options(options, overrides)
    max_new = _check_int("max_new_tokens", max_new_tokens, 1)
    sampler = make_sampler(opts.temperature, opts.top_k, opts.top_p)
    eos_id = opts.eos_id
    if eos_id is not None:
        eos_id = _check_int("eos_id", eos_id, 0, cfg.vocab_size)
    rows = normalize_prompts(cfg, prompts)
    B = len(rows)
    lens = np.array([len(r) for r in rows], np.int32)
    g_all = normalize_g_lm(cfg, opts.g_lm)
    if g_all is not None:
        if g_all.shape[1] not in (1, B):
            raise ValueError(f"g_lm has batch axis {g_all.shape[1]}; expected 1 or the number of prompts ({B})")
        if opts.shared_g:
            g_all = g_all[:, :1]
    p = plan(cfg, B, lens, max_new, opts, backend, sharded=sharded)
    tokens = np.zeros((B, p.prompt_len), np.int32)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = r
    run_cfg, run_params = weights(B)
    if run_cfg != p.cfg:
        raise ValueError(f"the decode weights are for compute dtype {run_cfg.dtype}, the plan for {p.cfg.dtype}: "
                         f"prepare them with the same backend choices (bf16_min_batch)")
    t, k, tp = (sampler.temperature, sampler.top_k, sampler.top_p) if isinstance(sampler, SamplingParams) else (1.0, 1, 1.0)
    inputs = LoopInputs(max_new=np.int32(max_new), limit=p.limit, eos_id=np.int32(-1 if eos_id is None else eos_id),
                        temperature=np.float32(t), top_k=np.int32(k), top_p=np.float32(tp))
    return DecodeRequest(plan=p, params=run_params, tokens=tokens, lengths=lens, g_all=g_all, inputs=inputs,
                         key=_as_key(opts.seed), max_new_tokens=max_new, options=opts)
