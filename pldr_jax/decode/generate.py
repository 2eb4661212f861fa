"""Jitted batched generation with the KV-cache and the G-cache (the paper's inference path).

Flow of `generate` (two compiled functions, each specialised only on static shapes and flags):

1. ``_prefill`` runs the right-padded prompts ``[B, P]`` once.  Each row's metric tensor A sums
   over that row's own tokens only (padding masked out of A and out of the attention keys), so a row
   decoded in a batch gives the tokens it gives alone.  It fills the cache (`cache.Cache`): rotated
   k/v in a fixed buffer of S positions, the prompt-time A and the G-cache (A_LM, G_LM), and
   returns the logits of each row's last prompt token.
2. ``_decode`` samples the first new token from those logits, then runs one ``lax.while_loop``
   (early exit once every row is done) whose body is one model step plus one sampling step.  The
   output buffer ``[B, N]`` is static; the number of new tokens is a traced scalar, so changing
   ``max_new_tokens``, the prompt contents or the sampling values within a length bucket does not
   recompile.  Row b's t-th new token sits at position ``lengths[b] + t`` (RoPE positions equal the
   prompt-alone case).

The reference's four modes (`MODES`; MODEL.md "Caches at inference"):

* ``kv_g`` (KV-cache + G-cache): only the new token runs; G_LM is the cached prompt G.
* ``kv`` (KV-cache only): only the new token runs; G is re-derived each step from the cached
  prompt-time A (A -> A_LM -> A_P -> G_LM; the same numbers, more work).
* ``g`` (G-cache only): the whole sequence is re-run each step in the fixed buffer (positions
  beyond the current length are padding), with the prompt's G in every layer.
* ``none``: the whole sequence is re-run and A, G are recomputed from it each step (pad-aware A),
  so G drifts from the prompt's: the tokens may differ from the cached modes (as in the reference).

With a given G (predefined-G configs, or ``g_lm=``) G is that tensor in every step of every mode,
and the metric learner never runs.

Dtype policy (`decode_dtype`): XLA:CPU's bfloat16 matrix-vector products are slow, so a
bfloat16 config decodes in float32 when the batch is below ``bf16_min_batch`` (default 8);
bfloat16 weights are then up-cast once, before the loop (`prepare_params`).  From batch 8 on, a
bfloat16 config decodes in bfloat16 (the deductive path, softmax and logits stay float32).  Pass
``bf16_min_batch=0`` (or 1) to force the configured dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import time
import warnings
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig
from ..model import attend_and_mix, deduce, embed, metric_A, normalize_g_lm, project_qkv
from ..ops.attention import causal_padding_mask
from ..ops.layers import linear
from ..params import fuse_projections, unstack_layers
from .cache import Cache
from .sampling import Greedy, Sampler, make_sampler, sample_logits

__all__ = ["generate", "GenerateOutput", "MODES", "mode_name", "decode_dtype", "prepare_params",
           "plan_lengths", "bucket_length", "prefill", "decode_step"]

#: mode name -> (kv_cache, g_cache)
MODES: dict[str, tuple[bool, bool]] = {"kv_g": (True, True), "kv": (True, False), "g": (False, True),
                                       "none": (False, False)}

MIN_BUCKET = 16
_MATMUL_LAYER_KEYS = ("wq", "wk", "wv", "wqkv", "dense", "ffn")


def mode_name(kv_cache: bool, g_cache: bool) -> str:
    return {v: k for k, v in MODES.items()}[(bool(kv_cache), bool(g_cache))]


# --------------------------------------------------------------------------- lengths and buckets
def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    m = max(int(n), int(minimum), 1)
    return 1 << (m - 1).bit_length()


def plan_lengths(cfg: PLDRConfig, max_prompt: int, max_new_tokens: int, *, max_len: int | None = None,
                 stop_at_max_seq_len: bool = False) -> tuple[int, int, int]:
    """(P, S, N): padded prompt length, cache/sequence buffer length, output buffer length.

    P = bucket(longest prompt), N = bucket(max_new_tokens), S = bucket(P + N), all capped at
    max_seq_len (or S = `max_len` when given).  Buckets are powers of two (>= 16), so nearby prompt
    lengths and token counts share one compilation.
    """
    if max_prompt > cfg.max_seq_len:
        raise ValueError(f"a prompt has {max_prompt} tokens, more than the model's max_seq_len="
                         f"{cfg.max_seq_len}")
    if not stop_at_max_seq_len and max_prompt + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"the longest prompt ({max_prompt} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{max_prompt + max_new_tokens} exceeds the model's max_seq_len={cfg.max_seq_len}; lower "
            f"max_new_tokens to <= {cfg.max_seq_len - max_prompt} or pass stop_at_max_seq_len=True to stop "
            f"each row when it reaches max_seq_len")
    P = min(bucket_length(max_prompt), cfg.max_seq_len)
    N = bucket_length(max_new_tokens)
    if max_len is None:
        S = min(bucket_length(P + N), cfg.max_seq_len)
    else:
        if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        S = int(max_len)
        if S > cfg.max_seq_len:
            raise ValueError(f"max_len={S} exceeds the model's max_seq_len={cfg.max_seq_len}")
        if S < max_prompt + (1 if stop_at_max_seq_len else max_new_tokens):
            raise ValueError(f"max_len={S} cannot hold the longest prompt ({max_prompt} tokens) + "
                             f"max_new_tokens ({max_new_tokens})")
        P = min(P, S)
    return P, S, N


# --------------------------------------------------------------------------- dtype policy
def decode_dtype(cfg: PLDRConfig, batch: int, bf16_min_batch: int = 8) -> str:
    """Compute dtype used to decode `batch` rows: a 16-bit config runs in float32 below
    `bf16_min_batch` rows (XLA:CPU's 16-bit matrix-vector path is slow), else cfg.dtype."""
    if cfg.dtype in ("bfloat16", "float16") and batch < bf16_min_batch:
        return "float32"
    return cfg.dtype


def _transpose_linear(p: dict) -> dict:
    """{"kernel" [in, out], "bias"} -> {"kernel_t" [out, in], "bias"} (see `ops.layers.linear`)."""
    if "kernel" not in p:
        return p
    q = dict(p)
    q["kernel_t"] = jnp.asarray(q.pop("kernel")).T
    return q


def _transpose_layer(lp: dict) -> dict:
    lp = dict(lp)
    for name in ("wq", "wk", "wv", "wqkv", "dense"):
        if name in lp:
            lp[name] = _transpose_linear(lp[name])
    lp["ffn"] = {k: _transpose_linear(v) for k, v in lp["ffn"].items()}
    return lp


def prepare_params(cfg: PLDRConfig, params: dict, batch: int, *, bf16_min_batch: int = 8, fuse: bool = True,
                   transpose: bool = True):
    """(run_cfg, run_params) for decoding `batch` rows.

    Per-layer weight arrays (`unstack_layers`: no weight-slice copies inside the decode loop), the
    q/k/v projections and the FFN's w1/w2 fused into one matrix each (`fuse`), kernels stored
    transposed as [out, in] (`transpose`: XLA:CPU's matrix-vector product is ~1.3-1.6x faster so), cast to the decode
    dtype (`decode_dtype`; the deductive-path weights stay as stored).  The result is a decode
    layout (`forward` accepts it too).  A no-op, no copy, when already prepared: call it once and
    pass the result to `generate` to keep the conversion out of every call.
    """
    run = decode_dtype(cfg, batch, bf16_min_batch)
    run_cfg = cfg if run == cfg.dtype else cfg.replace(dtype=run)
    params = unstack_layers(params)
    dt = jnp.dtype(run)

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt:
            return jnp.asarray(x).astype(dt)
        return x

    if dt == jnp.float32:      # up-cast everything (16-bit storage -> float32 compute)
        layers = tuple(jax.tree_util.tree_map(cast, lp) for lp in params["layers"])
    else:                      # 16-bit compute: only the big matrices
        layers = tuple({k: (jax.tree_util.tree_map(cast, v) if k in _MATMUL_LAYER_KEYS else v)
                        for k, v in lp.items()} for lp in params["layers"])
    if fuse:
        layers = tuple(fuse_projections(lp) for lp in layers)
    final = jax.tree_util.tree_map(cast, params["final"])
    if transpose:
        layers = tuple(_transpose_layer(lp) for lp in layers)
        final = _transpose_linear(final)
    out = dict(params, layers=layers, embed=jax.tree_util.tree_map(cast, params["embed"]), final=final)
    if dt == jnp.float32:
        out["embed_norm"] = jax.tree_util.tree_map(cast, params["embed_norm"])
    return run_cfg, out


# --------------------------------------------------------------------------- static spec
@dataclasses.dataclass(frozen=True)
class _Spec:
    cfg: PLDRConfig            # run config (decode dtype applied)
    kv_cache: bool
    g_cache: bool
    given_g: bool              # G_LM is given (predefined-G config or g_lm=)
    shared_g: bool
    kind: tuple                # sampler kind (static part of the sampler)
    collect_logits: bool = False
    collect_deductive: bool = False

    @property
    def fixed_g(self) -> bool:
        """G_LM stays the prompt's (or the given one) after prefill."""
        return self.given_g or self.g_cache


# --------------------------------------------------------------------------- model pieces
def _layers(params):
    layers = params["layers"]
    if not isinstance(layers, (tuple, list)):
        raise ValueError("decoding needs per-layer weights: pass params through unstack_layers / prepare_params")
    return layers


def _pad_to(x, S):
    return jnp.pad(x, ((0, 0), (0, S - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def prefill(cfg: PLDRConfig, params, tokens, lengths, g_all, max_len: int):
    """Run right-padded prompts tokens [B, P] (lengths [B]) once; the same for every mode.

    Each row's A sums over its own tokens only; padding is masked out of A and of the keys.
    g_all: None (derive G) or a given G_LM [L, B|1, H, dk, dk].  Returns (cache with k/v in
    buffers of max_len positions, logits [B, V] float32 of each row's last prompt token, the prompt's
    deductive outputs {"A", "A_LM", "G_LM"} stacked [L, B, H, dk, dk] (only "G_LM" with a given G)).
    """
    B, P = tokens.shape
    bidx = jnp.arange(B)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    valid = pos < lengths[:, None]
    mask = causal_padding_mask(valid, P)
    x = embed(cfg, params, tokens)
    ks, vs, deds = [], [], []
    for i, lp in enumerate(_layers(params)):
        q, k, v = project_qkv(cfg, lp, x, pos)
        if g_all is not None:
            ded = {"G_LM": g_all[i]}
        else:
            ded = deduce(lp, metric_A(cfg, lp, q, valid))
            ded = {n: ded[n] for n in ("A", "A_LM", "G_LM")}
        x = attend_and_mix(cfg, lp, x, q, k, v, ded["G_LM"], mask)
        ks.append(_pad_to(k, max_len))
        vs.append(_pad_to(v, max_len))
        deds.append(ded)
    logits = linear(params["final"], x[bidx, lengths - 1]).astype(jnp.float32)
    per = lambda name: tuple(d[name] for d in deds) if name in deds[0] else None
    cache = Cache(k=tuple(ks), v=tuple(vs), A=per("A"), A_LM=per("A_LM"), G_LM=per("G_LM"),
                  tokens=_pad_to(tokens.astype(jnp.int32), max_len), lengths=lengths.astype(jnp.int32))
    stacked = {n: jnp.stack([d[n] for d in deds]) for n in deds[0]}
    return cache, logits, stacked


def _kv_step(spec: _Spec, params, cache: Cache, token, active):
    """One new token per row with the KV-cache: token [B] at position lengths[b]."""
    cfg = spec.cfg
    B, S = cache.tokens.shape
    bidx = jnp.arange(B)
    pos = jnp.minimum(cache.lengths, S - 1)
    x = embed(cfg, params, token[:, None])
    mask = (jnp.arange(S)[None, :] <= pos[:, None])[:, None, None, :]          # [B, 1, 1, S]
    ks, vs, deds = [], [], []
    for i, lp in enumerate(_layers(params)):
        q, k, v = project_qkv(cfg, lp, x, pos[:, None])
        kb = cache.k[i].at[bidx, pos].set(k[:, 0])
        vb = cache.v[i].at[bidx, pos].set(v[:, 0])
        if spec.fixed_g:
            ded = {"G_LM": cache.G_LM[i]}
            if cache.A_LM is not None:
                ded["A_LM"] = cache.A_LM[i]
        else:                       # KV-only: re-derive G from the cached prompt-time A
            ded = deduce(lp, cache.A[i])
        x = attend_and_mix(cfg, lp, x, q, kb, vb, ded["G_LM"], mask)
        ks.append(kb)
        vs.append(vb)
        deds.append(ded)
    logits = linear(params["final"], x[:, 0]).astype(jnp.float32)
    cache = cache.replace(k=tuple(ks), v=tuple(vs), tokens=cache.tokens.at[bidx, pos].set(token),
                          lengths=jnp.where(active, pos + 1, cache.lengths))
    return logits, cache, deds


def _full_step(spec: _Spec, params, cache: Cache, token, active):
    """No KV-cache: append token [B] and re-run the whole buffer [B, S] (beyond length = padding)."""
    cfg = spec.cfg
    B, S = cache.tokens.shape
    bidx = jnp.arange(B)
    pos = jnp.minimum(cache.lengths, S - 1)
    tokens = cache.tokens.at[bidx, pos].set(token)
    new_len = jnp.where(active, pos + 1, cache.lengths)
    last = new_len - 1
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    valid = positions < new_len[:, None]
    mask = causal_padding_mask(valid, S)
    x = embed(cfg, params, tokens)
    layers = _layers(params)
    deds = []
    for i, lp in enumerate(layers):
        q, k, v = project_qkv(cfg, lp, x, positions)
        if spec.fixed_g:
            ded = {"G_LM": cache.G_LM[i]}
            if cache.A_LM is not None:
                ded["A_LM"] = cache.A_LM[i]
        else:                       # no cache at all: A and G from the whole current sequence
            ded = deduce(lp, metric_A(cfg, lp, q, valid))
        if i < len(layers) - 1:
            x = attend_and_mix(cfg, lp, x, q, k, v, ded["G_LM"], mask)
        else:                       # the last layer only needs the last position's output
            x = attend_and_mix(cfg, lp, x[bidx, last][:, None], q[bidx, last][:, None], k, v, ded["G_LM"],
                               mask[bidx, :, last][:, :, None])
        deds.append(ded)
    logits = linear(params["final"], x[:, 0]).astype(jnp.float32)
    return logits, cache.replace(tokens=tokens, lengths=new_len), deds


def decode_step(spec: _Spec, params, cache: Cache, token, active):
    """One model step of the mode in `spec`: (logits [B, V] float32, new cache, per-layer deductive)."""
    return (_kv_step if spec.kv_cache else _full_step)(spec, params, cache, token, active)


# --------------------------------------------------------------------------- loop state
@flax.struct.dataclass
class _Dyn:
    """Traced per-call values (changing them never recompiles)."""
    max_new: jax.Array        # int32 scalar
    limit: jax.Array          # [B] int32: new tokens allowed per row
    eos_id: jax.Array         # int32 scalar, -1 = no EOS stop
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


@flax.struct.dataclass
class _State:
    t: jax.Array              # next step index
    token: jax.Array          # [B] last sampled token
    out: jax.Array            # [B, N] new tokens (0 after a row stops)
    done: jax.Array           # [B] bool
    count: jax.Array          # [B] new tokens per row
    cache: Cache
    key: jax.Array
    logits_buf: Any = None    # [N, B, V] (collect_logits)
    ded_buf: Any = None       # {"A_LM"|"G_LM": [N, L, B, H, dk, dk]} (collect_deductive)


def _ded_to_buf_entry(deds, names, B):
    return {n: jnp.stack([jnp.broadcast_to(d[n], (B,) + d[n].shape[1:]) for d in deds]) for n in names}


def _record(spec: _Spec, st: _State, dyn: _Dyn, logits, deds) -> _State:
    """Sample step st.t from logits [B, V] and book-keep EOS / limits."""
    t = st.t
    tok = sample_logits(logits, jax.random.fold_in(st.key, t), dyn.temperature, dyn.top_k, dyn.top_p,
                        kind=spec.kind)
    active = ~st.done
    tok = jnp.where(active, tok, 0)
    count = st.count + active.astype(jnp.int32)
    done = st.done | (active & (tok == dyn.eos_id)) | (count >= dyn.limit)
    upd = dict(t=t + 1, token=tok, out=st.out.at[:, t].set(tok), done=done, count=count)
    if spec.collect_logits:
        upd["logits_buf"] = st.logits_buf.at[t].set(logits)
    if spec.collect_deductive:
        B = tok.shape[0]
        entry = _ded_to_buf_entry(deds, st.ded_buf.keys(), B)
        upd["ded_buf"] = {n: st.ded_buf[n].at[t].set(entry[n]) for n in st.ded_buf}
    return st.replace(**upd)


def _ded_names(spec: _Spec):
    return ("G_LM",) if spec.given_g else ("A_LM", "G_LM")


def _start(spec: _Spec, cache: Cache, logits0, ded0, key, dyn: _Dyn, n_out: int) -> _State:
    B = cache.tokens.shape[0]
    if spec.shared_g and not spec.given_g:    # the authors' cache_first_G: row 0's G for every row
        first = lambda t: None if t is None else tuple(a[:1] for a in t)
        cache = cache.replace(A=first(cache.A), A_LM=first(cache.A_LM), G_LM=first(cache.G_LM))
    st = _State(t=jnp.int32(0), token=jnp.zeros((B,), jnp.int32), out=jnp.zeros((B, n_out), jnp.int32),
                done=dyn.limit <= 0, count=jnp.zeros((B,), jnp.int32), cache=cache, key=key)
    if spec.collect_logits:
        st = st.replace(logits_buf=jnp.zeros((n_out,) + logits0.shape, jnp.float32))
    deds0 = None
    if spec.collect_deductive:
        L, H, dk = spec.cfg.num_layers, spec.cfg.num_heads, spec.cfg.head_dim
        names = _ded_names(spec)
        st = st.replace(ded_buf={n: jnp.zeros((n_out, L, B, H, dk, dk), jnp.float32) for n in names})
        deds0 = [{n: ded0[n][i] for n in names} for i in range(L)]
    return _record(spec, st, dyn, logits0, deds0)


def _advance(spec: _Spec, params, st: _State, dyn: _Dyn) -> _State:
    logits, cache, deds = decode_step(spec, params, st.cache, st.token, ~st.done)
    return _record(spec, st.replace(cache=cache), dyn, logits, deds)


def _keep_going(st: _State, dyn: _Dyn):
    return (st.t < dyn.max_new) & ~jnp.all(st.done)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def _prefill_jit(cfg, params, tokens, lengths, g_all, *, max_len):
    return prefill(cfg, params, tokens, lengths, g_all, max_len)


@functools.partial(jax.jit, static_argnames=("spec", "n_out"), donate_argnames=("cache",))
def _decode_jit(spec, params, cache, logits0, ded0, key, dyn, *, n_out):
    st = _start(spec, cache, logits0, ded0, key, dyn, n_out)
    return jax.lax.while_loop(lambda s: _keep_going(s, dyn), lambda s: _advance(spec, params, s, dyn), st)


def compiled_count() -> int:
    """Number of compiled variants of the decoder's jitted functions (prefill + decode loop)."""
    return _prefill_jit._cache_size() + _decode_jit._cache_size()


# --------------------------------------------------------------------------- host side
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
      given G only "G_LM").
    timings: {"prefill_s", "decode_s"} wall times (prefill includes its dispatch and, on the first
      call of a shape, its compilation).
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
    prompt_deductive: dict | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str = "float32"


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
class _Setup:
    spec: _Spec
    params: Any
    tokens: np.ndarray
    lengths: np.ndarray
    g_all: Any
    dyn: _Dyn
    key: Any
    P: int
    S: int
    N: int
    max_new: int


def _setup(cfg, params, prompts, *, max_new_tokens, kv_cache, g_cache, temperature, top_k, top_p, seed,
           eos_id, g_lm, shared_g, stop_at_max_seq_len, max_len, return_logits, return_deductive,
           bf16_min_batch) -> _Setup:
    if not isinstance(cfg, PLDRConfig):
        raise ValueError(f"cfg must be a PLDRConfig, got {type(cfg).__name__}")
    max_new = _check_int("max_new_tokens", max_new_tokens, 1)
    sampler = make_sampler(temperature, top_k, top_p)
    if eos_id is not None:
        eos_id = _check_int("eos_id", eos_id, 0, cfg.vocab_size)
    rows = normalize_prompts(cfg, prompts)
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
    run_cfg, run_params = prepare_params(cfg, params, B, bf16_min_batch=bf16_min_batch)
    given = g_all is not None
    # with a given G the G-cache flag changes nothing (G is fixed anyway): one compilation for both
    spec = _Spec(cfg=run_cfg, kv_cache=bool(kv_cache), g_cache=bool(g_cache) or given, given_g=given,
                 shared_g=bool(shared_g), kind=sampler.kind, collect_logits=bool(return_logits),
                 collect_deductive=bool(return_deductive))
    t, k, p = (sampler.temperature, sampler.top_k, sampler.top_p) if isinstance(sampler, Sampler) else (1.0, 1, 1.0)
    dyn = _Dyn(max_new=np.int32(max_new), limit=limit, eos_id=np.int32(-1 if eos_id is None else eos_id),
               temperature=np.float32(t), top_k=np.int32(k), top_p=np.float32(p))
    key = _as_key(seed)
    return _Setup(spec=spec, params=run_params, tokens=tokens, lengths=lens, g_all=g_all, dyn=dyn, key=key,
                  P=P, S=S, N=N, max_new=max_new)


def generate(cfg: PLDRConfig, params: dict, prompts, *, max_new_tokens: int, kv_cache: bool = True,
             g_cache: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed=0,
             eos_id: int | None = 3, g_lm=None, shared_g: bool = False, stop_at_max_seq_len: bool = False,
             max_len: int | None = None, return_logits: bool = False, return_deductive: bool = False,
             bf16_min_batch: int = 8) -> GenerateOutput:
    """Generate up to `max_new_tokens` new tokens for each prompt.

    prompts: list of token-id lists (ragged; right-padded internally to a length bucket).
    kv_cache / g_cache: the reference's four modes (`MODES`).  temperature, top_k, top_p: sampling,
    applied in the reference's order (temperature, top-p, top-k); top_k=1 is greedy.  seed: int or a
    PRNG key (reproducible sampling).  eos_id: a row stops after producing it (None: no EOS stop).
    g_lm: a G_LM override [num_layers, (1|B,) H, dk, dk] used in every step (predefined-G configs
    default to their own G).  shared_g: after prefill every row uses the first row's G (the authors'
    ``cache_first_G``; prefill itself uses each row's own G).  stop_at_max_seq_len: stop a row when it
    reaches max_seq_len instead of raising ValueError when prompt + max_new_tokens does not fit.
    max_len: cache/sequence buffer length (default: a bucket of prompt + new tokens).
    return_logits / return_deductive: also return per-step logits / deductive outputs.
    bf16_min_batch: see `decode_dtype`.

    params: stacked or per-layer; pass `prepare_params(cfg, params, batch)[1]` to avoid re-slicing or
    casting the weights on every call.
    """
    s = _setup(cfg, params, prompts, max_new_tokens=max_new_tokens, kv_cache=kv_cache, g_cache=g_cache,
               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, g_lm=g_lm,
               shared_g=shared_g, stop_at_max_seq_len=stop_at_max_seq_len, max_len=max_len,
               return_logits=return_logits, return_deductive=return_deductive, bf16_min_batch=bf16_min_batch)
    t0 = time.perf_counter()
    cache, logits0, ded0 = _prefill_jit(s.spec.cfg, s.params, s.tokens, s.lengths, s.g_all, max_len=s.S)
    logits0.block_until_ready()
    t1 = time.perf_counter()
    if not s.spec.kv_cache:
        cache = cache.replace(k=None, v=None)
    with warnings.catch_warnings():   # shared_g shrinks the G-cache: those donated buffers go unused
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        st = _decode_jit(s.spec, s.params, cache, logits0, ded0 if return_deductive else None, s.key, s.dyn,
                         n_out=s.N)
    out = np.asarray(st.out)
    t2 = time.perf_counter()
    count = np.asarray(st.count)
    steps = int(st.t)
    B = out.shape[0]
    logits = None
    if return_logits:
        logits = np.transpose(np.asarray(st.logits_buf[:steps]), (1, 0, 2))
    ded = None
    if return_deductive:
        ded = {n: np.asarray(v[:steps]) for n, v in st.ded_buf.items()}
    return GenerateOutput(
        tokens=[out[b, :count[b]].tolist() for b in range(B)], ids=out, num_generated=count,
        prompt_lengths=s.lengths, mode=mode_name(kv_cache, g_cache), steps=steps, logits=logits,
        deductive=ded, cache=st.cache, prompt_deductive=dict(ded0),
        timings={"prefill_s": t1 - t0, "decode_s": t2 - t1}, compute_dtype=s.spec.cfg.dtype)
