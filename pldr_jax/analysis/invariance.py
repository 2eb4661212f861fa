"""Invariance analysis of the deductive outputs (A, A_LM, A_P, G_LM).

The paper's claim: the deductive outputs of a PLDR-LLM are invariant "up to a small perturbation",
so the G_LM inferred once from the prompt (the G-cache) can replace the deep net that derives it,
and "deductive outputs have same RMSE and determinant values up to 15 decimal places after
caching".  This module measures that:

* pure metrics on arrays ``[..., dk, dk]`` (any leading axes, typically
  ``[layers, B, H, dk, dk]``): ``rmse``, ``slogdet`` / ``determinant``, ``numerical_rank``,
  ``head_spread``, ``order_parameter``, ``dag_values`` / ``dag_per_layer``, ``matching_decimals``;
* ``compare_runs(ref, other)``: all of them per layer, row and head for two runs;
* ``deductive_trace``: the deductive outputs along a greedy generation in cached and uncached
  modes, and ``analyze_trace`` turning a trace into per-step, per-layer, per-head arrays.

All metrics are computed on the host in float64 NumPy from the float32 model outputs: the
comparison "to 15 decimals" is then a property of the float32 tensors, not of float32 rounding in
the metric itself (determinants via ``numpy.linalg.slogdet`` in float64; a determinant that does
not fit a float64 is still exact in its ``(sign, log|det|)`` form).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig
from ..model import DEDUCTIVE_KEYS, forward

__all__ = ["rmse", "order_parameter", "slogdet", "determinant", "numerical_rank", "head_spread",
           "tensor_head_spread", "dag_values", "dag_per_layer", "matching_decimals", "compare_runs",
           "DeductiveTrace", "deductive_trace", "decoder_tokens", "InvarianceResult", "analyze_trace",
           "pad_prompts"]

_MAT = (-2, -1)


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------- pure metrics
def rmse(a, b) -> np.ndarray:
    """Root-mean-square difference over the last two (matrix) axes, float64 ``[...]``."""
    a, b = _f64(a), _f64(b)
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"rmse: matrix shapes differ: {a.shape} vs {b.shape}")
    return np.sqrt(np.mean(np.square(a - b), axis=_MAT))


def order_parameter(x, ref=None) -> np.ndarray:
    """RMSE / |mean| per matrix, float64 ``[...]``.

    With ``ref``: ``rmse(x, ref) / |mean(ref)|`` -- the deviation of a run from a reference run
    relative to the reference's magnitude (0 = invariant).  Without: ``rmse(x, mean(x)) / |mean(x)|``,
    the relative spread of a matrix's entries about their mean (a coefficient of variation).
    A zero mean gives inf (or nan for 0/0).
    """
    x = _f64(x)
    if ref is None:
        m = np.mean(x, axis=_MAT, keepdims=True)
        num = np.sqrt(np.mean(np.square(x - m), axis=_MAT))
        den = np.abs(m[..., 0, 0])
    else:
        ref = _f64(ref)
        num, den = rmse(x, ref), np.abs(np.mean(ref, axis=_MAT))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def slogdet(x) -> tuple[np.ndarray, np.ndarray]:
    """(sign, log|det|) per matrix, float64 (``numpy.linalg.slogdet`` on the float64 upcast)."""
    s, l = np.linalg.slogdet(_f64(x))
    return s, l


def determinant(x) -> np.ndarray:
    """Determinant per matrix in float64: ``sign * exp(log|det|)`` from ``slogdet`` (±inf or 0 only
    when the value itself leaves float64's range; compare ``slogdet`` then)."""
    s, l = slogdet(x)
    with np.errstate(over="ignore", under="ignore"):
        return s * np.exp(l)


def numerical_rank(x, rtol: float | None = None, atol: float = 0.0) -> np.ndarray:
    """Numerical rank per matrix: singular values (float64 SVD) above ``max(atol, rtol * s_max)``.

    Default ``rtol = dk * eps(float32)`` -- the inputs are float32 tensors, so singular values
    below that relative level are indistinguishable from rounding noise.
    """
    x = _f64(x)
    if rtol is None:
        rtol = max(x.shape[-2:]) * float(np.finfo(np.float32).eps)
    s = np.linalg.svd(x, compute_uv=False)
    tol = np.maximum(atol, rtol * s[..., :1])
    return np.sum(s > tol, axis=-1)


def head_spread(values, head_axis: int = -1) -> np.ndarray:
    """Spread across heads of a per-head scalar (e.g. ``rmse`` or ``log|det|`` ``[layers, B, H]``):
    the standard deviation over ``head_axis`` (float64)."""
    return np.std(_f64(values), axis=head_axis)


def tensor_head_spread(x, head_axis: int = -3) -> np.ndarray:
    """Spread across heads of the tensors themselves (``x [..., H, dk, dk]``): sqrt of the mean over
    matrix entries of the variance over heads.  0 when all heads carry the same matrix."""
    x = _f64(x)
    var = np.var(x, axis=head_axis)
    return np.sqrt(np.mean(var, axis=_MAT))


def dag_values(x) -> np.ndarray:
    """DAG value per matrix: ``|log(trace(expm(M * M)) / dk)|`` (M * M element-wise), float64.

    Computed stably as ``log tr e^S = c + log tr e^(S - cI)`` with ``c`` the largest real part of
    the eigenvalues of S = M * M, so values stay finite where the float32 training regulariser
    (``pldr_jax.losses.dag_loss``) overflows to inf; otherwise both agree to float32 rounding.
    """
    import scipy.linalg

    x = _f64(x)
    dk = x.shape[-1]
    S = np.square(x).reshape(-1, dk, dk)
    if S.shape[0] == 0:
        return np.zeros(x.shape[:-2])
    finite = np.all(np.isfinite(S), axis=(-2, -1))
    c = np.zeros(S.shape[0])
    if finite.any():
        c[finite] = np.max(np.linalg.eigvals(S[finite]).real, axis=-1)
    with np.errstate(all="ignore"):
        tr = np.trace(scipy.linalg.expm(S - c[:, None, None] * np.eye(dk)), axis1=-2, axis2=-1)
        out = np.abs(c + np.log(tr) - np.log(dk))
    return out.reshape(x.shape[:-2])


def dag_per_layer(x, layer_axis: int = 0) -> np.ndarray:
    """DAG values ``x [layers, B, H, dk, dk]`` averaged over everything but the layer axis ->
    ``[layers]``.  The mean over all layers is the training regulariser's value."""
    d = dag_values(x)
    d = np.moveaxis(d, layer_axis, 0)
    return d.reshape(d.shape[0], -1).mean(axis=1)


def matching_decimals(a, b, max_decimals: int = 15) -> np.ndarray:
    """The number of decimal places (0..max_decimals) to which ``a`` and ``b`` agree: the largest d
    with ``round(a, d) == round(b, d)`` for every d' <= d (-1 when not even the integer part
    agrees).  Equal values (including equal infinities) give ``max_decimals``."""
    a, b = _f64(a), _f64(b)
    a, b = np.broadcast_arrays(a, b)
    out = np.full(a.shape, -1, dtype=np.int64)
    alive = np.ones(a.shape, bool)
    for d in range(max_decimals + 1):
        eq = (np.round(a, d) == np.round(b, d)) | (a == b)
        alive &= eq
        out[alive] = d
    return out


def compare_runs(ref: dict, other: dict, keys: Sequence[str] | None = None,
                 rank_rtol: float | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-matrix comparison of two runs' deductive outputs.

    ref, other: {key: array [..., dk, dk]} with equal shapes (e.g. ``[layers, B, H, dk, dk]``).
    Returns {key: {metric: array [...]}} with metrics ``rmse``, ``order_param`` (rmse / |mean(ref)|),
    ``det_ref``, ``det_other``, ``logdet_ref``, ``logdet_other``, ``sign_ref``, ``sign_other``,
    ``det_decimals`` (decimal places to which the determinants agree, capped at 15),
    ``rank_ref``, ``rank_other``, ``dag_ref``, ``dag_other``, ``mean_ref``, ``mean_other``.
    """
    keys = [k for k in (keys or DEDUCTIVE_KEYS) if k in ref and k in other]
    out = {}
    for k in keys:
        a, b = _f64(ref[k]), _f64(other[k])
        if a.shape != b.shape:
            raise ValueError(f"compare_runs: {k} shapes differ: {a.shape} vs {b.shape}")
        sa, la = slogdet(a)
        sb, lb = slogdet(b)
        da, db = determinant(a), determinant(b)
        out[k] = {
            "rmse": rmse(a, b), "order_param": order_parameter(b, a),
            "det_ref": da, "det_other": db, "logdet_ref": la, "logdet_other": lb,
            "sign_ref": sa, "sign_other": sb, "det_decimals": matching_decimals(da, db),
            "rank_ref": numerical_rank(a, rank_rtol), "rank_other": numerical_rank(b, rank_rtol),
            "dag_ref": dag_values(a), "dag_other": dag_values(b),
            "mean_ref": np.mean(a, axis=_MAT), "mean_other": np.mean(b, axis=_MAT),
        }
    return out


# --------------------------------------------------------------------------- generation along forward
def pad_prompts(prompts, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (list of id lists, or ``[B, L]`` with 0 right-padding) -> (right-padded int32
    ``[B, length]``, lengths ``[B]``).  Validates: non-empty, no pad id 0 inside a prompt."""
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        rows = [list(r[: int(np.sum(r != 0))]) for r in arr]
        for r, full in zip(rows, arr):
            if np.any(full[len(r):] != 0):
                raise ValueError("prompt arrays must be right-padded with 0 (no pad inside a prompt)")
    else:
        prompts = list(prompts)
        if prompts and all(isinstance(p, (int, np.integer)) for p in prompts):  # a single flat prompt
            rows = [list(map(int, prompts))]
        else:
            rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty")
        if any(t == 0 for t in r):
            raise ValueError(f"prompt {i} contains the pad id 0")
        if any(t < 0 for t in r):
            raise ValueError(f"prompt {i} contains negative ids")
    lens = np.array([len(r) for r in rows], np.int32)
    length = int(lens.max()) if length is None else int(length)
    if lens.max() > length:
        raise ValueError(f"a prompt of length {lens.max()} does not fit the buffer of {length}")
    buf = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        buf[i, : len(r)] = r
    return buf, lens


@functools.partial(jax.jit, static_argnames=("cfg", "with_deductive"))
def _last_step(cfg: PLDRConfig, params, buf, lengths, g_lm, with_deductive: bool):
    """One full re-run on the right-padded buffer (pad-aware A = the rows alone): the logits at each
    row's last real position [B, V], and the deductive outputs (or None)."""
    out = forward(cfg, params, buf, g_lm, pad_aware_A=True)
    last = out.logits[jnp.arange(buf.shape[0]), lengths - 1]
    return last, (out.deductive if with_deductive else None)


def _greedy(logits: np.ndarray, pad_id: int = 0) -> np.ndarray:
    lg = np.array(logits, dtype=np.float32, copy=True)
    lg[:, pad_id] = -np.inf  # never emit the pad id: it would read as padding in the next pass
    return np.argmax(lg, axis=-1).astype(np.int32)


def decoder_tokens(cfg: PLDRConfig, params, prompts, max_new_tokens: int, *, g_lm=None) -> list[list[int]]:
    """Greedy tokens of the real KV+G-cache decoder (``pldr_jax.decode.generate``, top_k=1, no EOS
    stop): the token path of ``deductive_trace(..., follow="decoder")``."""
    from ..decode import generate

    rows = pad_prompts(prompts)
    prompts_l = [list(map(int, r[:n])) for r, n in zip(*rows)]
    out = generate(cfg, params, prompts_l, max_new_tokens=int(max_new_tokens), kv_cache=True, g_cache=True,
                   top_k=1, eos_id=None, g_lm=g_lm)
    return [list(map(int, t)) for t in out.tokens]


# --------------------------------------------------------------------------- traces
@dataclasses.dataclass
class DeductiveTrace:
    """Deductive outputs along a greedy generation, in cached and uncached modes.

    Step t (0..T-1) is the model call that produces new token t+1: step 0 is the prefill on the
    prompt, step t runs on the prompt plus the first t generated tokens.

    tokens: [B, P + T] int32 prompt + generated tokens (right-padded with 0 for shorter prompts).
    prompt_lengths: [B].  generated: [B, T] the new tokens along the followed path.
    cached / uncached: {key: [T, layers, B, H, dk, dk] float32}; keys A, A_LM, A_P, G_LM for a model
      that derives G (only G_LM when G is given).  ``cached`` is a read-only broadcast of the
      prompt-time values.
    logits_cached / logits_uncached: [T, B, V] next-token logits of the two modes on the same prefix.
    follow: what built the prefixes: "cached" / "uncached" (that mode's greedy choices), "decoder"
      (``pldr_jax.decode.generate`` KV+G greedy) or "given".
    method: how the trace was computed (text).
    """
    tokens: np.ndarray
    prompt_lengths: np.ndarray
    generated: np.ndarray
    cached: dict
    uncached: dict
    logits_cached: np.ndarray
    logits_uncached: np.ndarray
    follow: str
    method: str

    @property
    def steps(self) -> int:
        return int(self.generated.shape[1])


_METHOD = (
    "Computed with pldr_jax.model.forward on a fixed-size right-padded buffer with pad-aware A (each "
    "row equals the prompt run alone). cached: the deductive outputs of the prefill on the prompt, "
    "which a KV+G-cache decoder uses at every later step (a KV-only decoder recomputes A_LM, A_P, "
    "G_LM from the cached prompt-time A: the same numbers); the cached-mode logits are a full re-run "
    "with the prompt's G_LM (the reference's G-only mode, equal to KV+G decoding up to float "
    "rounding). uncached: A, A_LM, A_P, G_LM recomputed from the whole prefix at each step (the "
    "reference's no-cache mode). Both modes are evaluated on the same prefixes, built from {path}, "
    "so differences come from recomputing the deductive outputs, not from diverging tokens. No EOS stop.")
_PATHS = {"cached": "the greedy choices of the cached mode (pad id 0 excluded)",
          "uncached": "the greedy choices of the uncached mode (pad id 0 excluded)",
          "decoder": "the greedy tokens of pldr_jax.decode.generate with the KV- and G-cache",
          "given": "the tokens given by the caller"}


def deductive_trace(cfg: PLDRConfig, params, prompts, *, max_new_tokens: int, g_lm=None,
                    follow: str = "cached", generated: Sequence[Sequence[int]] | None = None,
                    keys: Sequence[str] | None = None) -> DeductiveTrace:
    """Collect the deductive outputs along a greedy generation in cached and uncached modes.

    prompts: list of id lists (or a ``[B, L]`` right-padded array).  max_new_tokens: steps T.
    g_lm: a given G (predefined-G models need one unless their config is "identity"); then only
      G_LM is traced and both modes use it.
    follow: "cached" (default) or "uncached" -- whose greedy choices extend the prefixes (computed
      here with ``forward``); "decoder" -- the greedy tokens of ``pldr_jax.decode.generate`` with the
      KV- and G-cache (``decoder_tokens``); or give ``generated`` ([B][T] token ids) to trace any path.
    keys: subset of ("A", "A_LM", "A_P", "G_LM") to keep (memory: T * layers * B * H * dk^2 floats each).

    The per-step deductive outputs are always computed here with ``forward`` (see ``_METHOD`` /
    ``trace.method``): the decoder's own per-step outputs are not needed, so any decoder path can be
    traced by passing its tokens as ``generated``.
    """
    T = int(max_new_tokens)
    if T < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if follow not in ("cached", "uncached", "decoder"):
        raise ValueError(f"follow must be 'cached', 'uncached' or 'decoder', got {follow!r}")
    if follow == "decoder" and generated is None:
        generated = decoder_tokens(cfg, params, prompts, T, g_lm=g_lm)
    buf, lens = pad_prompts(prompts)
    B, P = buf.shape
    L = P + T
    if L > cfg.max_seq_len:
        raise ValueError(f"longest prompt ({P}) + max_new_tokens ({T}) exceeds max_seq_len={cfg.max_seq_len}")
    if generated is not None:
        gen_given = np.asarray([list(g) for g in generated], np.int64)
        if gen_given.shape != (B, T):
            raise ValueError(f"generated must be [B={B}, T={T}] token ids, got shape {gen_given.shape}")
        if np.any(gen_given <= 0) or np.any(gen_given >= cfg.vocab_size):
            raise ValueError("generated tokens must be ids in [1, vocab_size): the pad id 0 cannot be traced "
                             "(it would read as padding)")
        follow = "decoder" if follow == "decoder" else "given"
    buf = np.pad(buf, ((0, 0), (0, T)))
    prompt_lens = lens.copy()
    g_fixed = None if g_lm is None else jnp.asarray(g_lm, jnp.float32)
    if g_fixed is None and not cfg.learned_g and cfg.custom_G_type != "identity":
        raise ValueError(f"a predefined-G config (custom_G_type={cfg.custom_G_type!r}) needs g_lm")

    # prefill: the cached-mode deductive outputs
    last0, ded0 = _last_step(cfg, params, jnp.asarray(buf), jnp.asarray(lens), g_fixed, True)
    ded0 = {k: np.asarray(v) for k, v in ded0.items() if keys is None or k in keys}
    g_cache = g_fixed if g_fixed is not None else (jnp.asarray(ded0["G_LM"]) if "G_LM" in ded0 else None)
    if g_cache is None:  # G_LM not kept: recompute it for the cached re-runs
        g_cache = _last_step(cfg, params, jnp.asarray(buf), jnp.asarray(lens), None, True)[1]["G_LM"]

    unc = {k: [] for k in ded0}
    lg_c, lg_u, gen = [], [], np.zeros((B, T), np.int32)
    for t in range(T):
        if t == 0:
            last_c, last_u, ded = np.asarray(last0), np.asarray(last0), ded0
        else:
            last_u, ded = _last_step(cfg, params, jnp.asarray(buf), jnp.asarray(lens), g_fixed, True)
            last_c, _ = _last_step(cfg, params, jnp.asarray(buf), jnp.asarray(lens), g_cache, False)
            last_u, last_c = np.asarray(last_u), np.asarray(last_c)
        for k in unc:
            unc[k].append(np.asarray(ded[k]))
        lg_c.append(last_c)
        lg_u.append(last_u)
        if follow in ("given", "decoder"):
            tok = gen_given[:, t].astype(np.int32)
        else:
            tok = _greedy(last_c if follow == "cached" else last_u)
        gen[:, t] = tok
        buf[np.arange(B), lens] = tok
        lens = lens + 1
    uncached = {k: np.stack(v) for k, v in unc.items()}
    cached = {k: np.broadcast_to(v, (T, *v.shape)) for k, v in ded0.items()}
    return DeductiveTrace(tokens=buf, prompt_lengths=prompt_lens, generated=gen, cached=cached,
                          uncached=uncached, logits_cached=np.stack(lg_c), logits_uncached=np.stack(lg_u),
                          follow=follow, method=_METHOD.format(path=_PATHS[follow]))


# --------------------------------------------------------------------------- analysis of a trace
@dataclasses.dataclass
class InvarianceResult:
    """Arrays from ``analyze_trace``; shapes use T steps, layers, B rows, H heads.

    per_key: {key: {metric: [T, layers, B, H]}} -- ``compare_runs(cached, uncached)`` per step
      (ref = cached), plus ``drift_cached`` / ``drift_uncached`` = rmse to the step-0 tensor,
      ``order_param_cached`` / ``order_param_uncached`` = rmse/|mean| of each tensor about its own mean.
    spread: {key: {"cached"|"uncached": [T, layers, B]}} -- ``tensor_head_spread``.
    dag_layer: {key: {"cached"|"uncached": [T, layers]}} -- DAG per layer (mean over rows and heads).
    logits_max_abs_diff: [T, B]; same_greedy_token: [T, B] bool (argmax of the two modes agrees).
    method: how the trace was computed.
    """
    per_key: dict
    spread: dict
    dag_layer: dict
    logits_max_abs_diff: np.ndarray
    same_greedy_token: np.ndarray
    method: str
    follow: str


def analyze_trace(trace: DeductiveTrace, keys: Sequence[str] | None = None,
                  rank_rtol: float | None = None) -> InvarianceResult:
    """All invariance metrics of a ``DeductiveTrace`` (cached = reference run)."""
    keys = [k for k in (keys or DEDUCTIVE_KEYS) if k in trace.cached and k in trace.uncached]
    cmp = compare_runs(trace.cached, trace.uncached, keys, rank_rtol)
    per_key, spread, dag_layer = {}, {}, {}
    for k in keys:
        m = dict(cmp[k])
        m["drift_cached"] = rmse(trace.cached[k], trace.cached[k][:1])
        m["drift_uncached"] = rmse(trace.uncached[k], trace.uncached[k][:1])
        m["order_param_cached"] = order_parameter(trace.cached[k])
        m["order_param_uncached"] = order_parameter(trace.uncached[k])
        per_key[k] = m
        spread[k] = {"cached": tensor_head_spread(trace.cached[k]),
                     "uncached": tensor_head_spread(trace.uncached[k])}
        dag_layer[k] = {"cached": m["dag_ref"].mean(axis=(2, 3)), "uncached": m["dag_other"].mean(axis=(2, 3))}
    lc, lu = trace.logits_cached, trace.logits_uncached
    diff = np.max(np.abs(_f64(lc) - _f64(lu)), axis=-1)
    same = _greedy(lc.reshape(-1, lc.shape[-1])) == _greedy(lu.reshape(-1, lu.shape[-1]))
    return InvarianceResult(per_key=per_key, spread=spread, dag_layer=dag_layer, logits_max_abs_diff=diff,
                            same_greedy_token=same.reshape(lc.shape[:2]), method=trace.method,
                            follow=trace.follow)
