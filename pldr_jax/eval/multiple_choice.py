"""Log-likelihood scoring: the core of perplexity, multiple choice and the lm-eval adapter.

Multiple choice is scored the way zero-shot benchmarks (ARC, HellaSwag, PIQA in
lm-evaluation-harness) score it: for each item, the log-likelihood of every choice as a
continuation of the context, ``acc`` = the argmax is the label, ``acc_norm`` = the argmax of the
log-likelihood divided by the choice's length (characters for text choices, as lm-eval; tokens for
token-id choices) is the label.

**Scoring modes** (PLDR's metric tensor A sums over every position of the input, so a token's
logits depend on later tokens of the same pass -- see docs/model.md):

* ``"full"`` (default): one forward pass over context + continuation, A over every real token of
  it.  This is what the authors' Hugging Face model computes under lm-evaluation-harness, i.e. the
  setting of the paper's zero-shot scores, and the reference's training-loss semantics.
* ``"cached"``: G_LM is computed from the context alone (the G-cache a decoder holds after the
  prompt) and the continuation is scored with it: the scores a KV+G-cache decoder assigns.
* ``"causal"``: every target token is scored by a pass over its own prefix only (no later token
  enters A): the scores of the no-cache decoder, one forward pass per scored token.

A given ``g_lm`` (predefined-G models, or a G source from ``pldr_jax.g_sources``) fixes G in every
mode, which then all coincide.  Batches are right-padded with pad-aware A, so every row scores as it
would alone; input lengths and scored-position counts are padded to power-of-two buckets, a batch
holds rows of one length bucket only, and its row count is ``batch_size`` or, for a bucket's last
batch, the next power of two (`plan_batches`: one compilation per (length, scored, rows) triple and
mode); only the scored positions go through the vocabulary head; every batch is dispatched before
any result is read back.

Where the mode allows it exactly (mode "cached", or a fixed G), requests that share a context share
one pass over it (`shared_context`: the context once and every continuation after it in one packed
row); mode "full" cannot share (`experiments/bench_eval.py`: requests/s batched vs one at a time).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig
from ..model import forward
from ..ops.layers import linear
from .jsonl import iter_jsonl
from .shared_context import PackedRow, pack_requests, shareable

__all__ = ["MODES", "loglikelihood_tokens", "score_units", "plan_batches", "score_packed_rows", "packed_mask",
           "bucket_length", "encode_pair", "make_encoder", "load_jsonl", "mc_requests", "MCResult",
           "score_multiple_choice"]

MODES = ("full", "cached", "causal")
EOS_ID = 3


def bucket_length(n: int, maximum: int, minimum: int = 8) -> int:
    """Smallest power of two >= n (at least ``minimum``), capped at ``maximum``."""
    b = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    return min(b, maximum)


def plan_batches(lengths: Sequence[int], maximum: int, batch_size: int) -> list[tuple[list[int], int, int]]:
    """Rows of these lengths -> batches (row indices, length bucket L, batch rows B): rows grouped by
    their power-of-two length bucket (`bucket_length`, capped at ``maximum``), longest first, in
    batches of ``batch_size``; a bucket's last, partial batch has B = the next power of two of its
    rows (not ``batch_size``), so filler rows cost less than the rows themselves (one compilation
    per (L, B) pair: B is batch_size or a power of two below it)."""
    by_bucket: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        by_bucket.setdefault(bucket_length(lengths[i], maximum), []).append(i)
    out = []
    for L, idx in by_bucket.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start: start + batch_size]
            out.append((chunk, L, min(batch_size, 1 << (len(chunk) - 1).bit_length())))
    return out


# --------------------------------------------------------------------------- jitted scorers
def _gather(cfg: PLDRConfig, params, hidden, pos, targets):
    """hidden [B, L, D], pos / targets [B, K] -> log p(target) at those positions [B, K] and greedy
    hits [B, K].  Only the K scored positions go through the vocabulary head and its softmax (a
    multiple-choice continuation is a few tokens of a long context).  Greedy = the target's
    log-probability is the maximum (= argmax == target but for exact ties; XLA:CPU's argmax over the
    vocabulary is a slow scalar loop: experiments/README.md "Batched scoring")."""
    h = jnp.take_along_axis(hidden, pos[..., None], axis=1)                    # [B, K, D]
    logits = linear(params["final"], h).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return lp, lp >= jnp.max(logp, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_full(cfg: PLDRConfig, params, inputs, pos, targets, g_lm):
    """inputs [B, L] (0 = pad); pos, targets [B, K]: log p(targets) at positions pos [B, K], greedy [B, K]."""
    hidden = forward(cfg, params, inputs, g_lm, pad_aware_A=True).hidden
    return _gather(cfg, params, hidden, pos, targets)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_cached(cfg: PLDRConfig, params, inputs, pos, targets, ctx_len):
    """G_LM from each row's first ctx_len tokens (its G-cache), then the whole row with that G."""
    col = jnp.arange(inputs.shape[1])[None, :]
    ctx = jnp.where(col < ctx_len[:, None], inputs, 0)
    g = forward(cfg, params, ctx, pad_aware_A=True).deductive["G_LM"]        # [layers, B, H, dk, dk]
    return _gather(cfg, params, forward(cfg, params, inputs, g, pad_aware_A=True).hidden, pos, targets)


def packed_mask(positions: jax.Array, segments: jax.Array) -> jax.Array:
    """Attention mask [B, 1, L, L] of packed rows (`shared_context`): positions, segments [B, L] int
    (segment 0 = padding, 1 = the context, 2.. = one continuation each).  A query sees the keys at
    positions <= its own that are context tokens or tokens of its own segment."""
    earlier = positions[:, None, :] <= positions[:, :, None]                       # [B, Lq, Lk]
    seen = (segments[:, None, :] == 1) | (segments[:, None, :] == segments[:, :, None])
    return (earlier & seen & (segments[:, None, :] > 0))[:, None]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_packed(cfg: PLDRConfig, params, inputs, positions, segments, pos, targets, g_lm):
    """Packed rows (`shared_context`): inputs, positions, segments [B, L]; A over the context tokens
    (segment 1) only, or the fixed g_lm; log p(targets) at row indices pos [B, K], greedy [B, K]."""
    hidden = forward(cfg, params, inputs, g_lm, positions=positions, attn_mask=packed_mask(positions, segments),
                     metric_mask=segments == 1).hidden
    return _gather(cfg, params, hidden, pos, targets)


@dataclasses.dataclass
class _Unit:
    inp: list            # input ids (length n <= max_seq_len)
    tgt: list            # target ids, same length
    n_score: int         # the last n_score positions are scored
    owner: int           # index of the request it belongs to


def _units_for(req_index: int, inp: list, tgt: list, n_score: int, mode: str) -> list[_Unit]:
    if mode != "causal":
        return [_Unit(inp, tgt, n_score, req_index)]
    n = len(inp)
    return [_Unit(inp[: j + 1], tgt[: j + 1], 1, req_index) for j in range(n - n_score, n)]


def _check_scoring_args(cfg: PLDRConfig, mode: str, g_lm, batch_size: int):
    """Validated (g_lm as float32 or None, whether G_LM is fixed for every row)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if g_lm is not None:
        g_lm = jnp.asarray(g_lm, jnp.float32)
        if g_lm.ndim == 5 and g_lm.shape[1] != 1:
            raise ValueError("scoring takes one G_LM for all rows: [num_layers, (1,) H, dk, dk]")
    if g_lm is None and not cfg.learned_g and cfg.custom_G_type != "identity":
        raise ValueError(f"a predefined-G config (custom_G_type={cfg.custom_G_type!r}) needs g_lm")
    return g_lm, g_lm is not None or not cfg.learned_g


def _check_packed_rows(cfg: PLDRConfig, rows: Sequence[PackedRow], n_requests: int) -> None:
    """Every row's tokens, positions and segments of one length in [1, max_seq_len], and every
    scored entry's row index inside its row and request index in [0, n_requests)."""
    if n_requests < 0:
        raise ValueError(f"n_requests must be >= 0, got {n_requests}")
    for j, row in enumerate(rows):
        n = len(row.tokens)
        if not 1 <= n <= cfg.max_seq_len:
            raise ValueError(f"packed row {j}: {n} tokens, want 1..max_seq_len={cfg.max_seq_len}")
        if len(row.positions) != n or len(row.segments) != n:
            raise ValueError(f"packed row {j}: {n} tokens but {len(row.positions)} positions and "
                             f"{len(row.segments)} segments")
        for at, _, owner in row.scored:
            if not 0 <= at < n:
                raise ValueError(f"packed row {j}: scored row index {at} outside its {n} tokens")
            if not 0 <= owner < n_requests:
                raise ValueError(f"packed row {j}: request index {owner} outside n_requests={n_requests}")


def _read_back(pending: list, progress: Callable | None, total: int):
    """Yield (row indices, log p [B, K] float64, greedy [B, K] bool) of every batch in ``pending``
    ((row indices, device result) of batches all dispatched already), in order, advancing the
    ``progress(total=total)`` bar after each."""
    bar = progress(total=total) if progress is not None else None
    try:
        for idx, (lp, gr) in pending:
            yield idx, np.asarray(lp, np.float64), np.asarray(gr)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()


def score_packed_rows(cfg: PLDRConfig, params, rows: Sequence[PackedRow], n_requests: int, *, g_lm=None,
                      batch_size: int = 8, progress: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Score packed rows (`shared_context.pack_requests`; A over each row's context, or the fixed
    g_lm); returns per request (sum log p [float64], all scored targets greedy [bool]).  Rows are
    batched as in `score_units` (`plan_batches`), every batch dispatched before any is read back.
    Raises ValueError naming a bad argument (batch_size, g_lm, a predefined-G config without g_lm,
    a row longer than max_seq_len or inconsistent, a request index outside n_requests)."""
    g_lm, _ = _check_scoring_args(cfg, "cached", g_lm, batch_size)     # packed rows score as mode "cached"
    _check_packed_rows(cfg, rows, n_requests)
    sums = np.zeros(n_requests, np.float64)
    greedy = np.ones(n_requests, bool)
    pending = []
    for idx, L, B in plan_batches([len(r.tokens) for r in rows], cfg.max_seq_len, batch_size):
        K = bucket_length(max(len(rows[i].scored) for i in idx), 1 << 30, minimum=1)
        inp, positions, segments = (np.zeros((B, L), np.int32) for _ in range(3))
        pos, tgt = np.zeros((B, K), np.int32), np.zeros((B, K), np.int32)
        inp[:, 0], segments[:, 0] = EOS_ID, 1   # filler rows: one context token, never read
        for r, i in enumerate(idx):
            row = rows[i]
            n = len(row.tokens)
            inp[r, :n], positions[r, :n], segments[r, :n] = row.tokens, row.positions, row.segments
            k = len(row.scored)
            pos[r, :k] = [e[0] for e in row.scored]
            tgt[r, :k] = [e[1] for e in row.scored]
        res = _score_packed(cfg, params, *(jnp.asarray(a) for a in (inp, positions, segments, pos, tgt)), g_lm)
        pending.append((idx, res))
    for idx, lp, gr in _read_back(pending, progress, len(rows)):
        for r, i in enumerate(idx):
            for k, (_, _, owner) in enumerate(rows[i].scored):
                sums[owner] += lp[r, k]
                greedy[owner] &= bool(gr[r, k])
    return sums, greedy


def score_units(cfg: PLDRConfig, params, units: Sequence[_Unit], n_requests: int, *, mode: str = "full",
                g_lm=None, batch_size: int = 8, progress: Callable | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score work units; returns per request (sum log p over scored targets [float64], number of scored
    targets, all scored targets greedy [bool]).  progress: a factory ``progress(total=rows)`` of an
    object with ``update(n)`` and ``close()`` (e.g. ``tqdm``), advanced after every batch."""
    g_lm, fixed_g = _check_scoring_args(cfg, mode, g_lm, batch_size)
    sums = np.zeros(n_requests, np.float64)
    counts = np.zeros(n_requests, np.int64)
    greedy = np.ones(n_requests, bool)
    pending = []
    for idx, L, B in plan_batches([len(u.inp) for u in units], cfg.max_seq_len, batch_size):
        K = bucket_length(max(units[i].n_score for i in idx), L, minimum=1)
        inp = np.zeros((B, L), np.int32)
        pos = np.zeros((B, K), np.int32)
        tgt = np.zeros((B, K), np.int32)
        ctx = np.ones(B, np.int32)
        inp[:, 0] = EOS_ID  # filler rows: one real token, never read
        for r, i in enumerate(idx):
            u = units[i]
            n = len(u.inp)
            inp[r, :n] = u.inp
            pos[r, :u.n_score] = np.arange(n - u.n_score, n)
            tgt[r, :u.n_score] = u.tgt[n - u.n_score:]
            ctx[r] = n - u.n_score + 1
        if mode == "cached" and not fixed_g:
            res = _score_cached(cfg, params, jnp.asarray(inp), jnp.asarray(pos), jnp.asarray(tgt), jnp.asarray(ctx))
        else:
            res = _score_full(cfg, params, jnp.asarray(inp), jnp.asarray(pos), jnp.asarray(tgt), g_lm)
        pending.append((idx, res))
    for idx, lp, gr in _read_back(pending, progress, len(units)):
        for r, i in enumerate(idx):
            u = units[i]
            sums[u.owner] += lp[r, :u.n_score].sum()
            counts[u.owner] += u.n_score
            greedy[u.owner] &= bool(gr[r, :u.n_score].all())
    return sums, counts, greedy


def loglikelihood_tokens(cfg: PLDRConfig, params, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                         mode: str = "full", g_lm=None, batch_size: int = 8,
                         prefix_id: int = EOS_ID, progress: Callable | None = None,
                         share_context: bool = True) -> list[tuple[float, bool]]:
    """``log p(continuation | context)`` for token-id pairs, as lm-eval's ``loglikelihood``.

    requests: (context_ids, continuation_ids); an empty context becomes ``[prefix_id]`` (EOS: the
    paper packs documents with an EOS after each, so EOS is what precedes a document).  Inputs longer
    than max_seq_len + 1 lose context tokens from the left (as lm-eval).  Returns (log-likelihood,
    is_greedy) per request: is_greedy = every continuation token is the argmax of its logits.
    progress: see `score_units` (it counts rows).  share_context: where the mode allows it exactly
    (mode "cached", or a fixed G_LM: `shared_context.shareable`), requests with the same context
    share one pass over it (`shared_context`; the scores are the unshared ones up to float32
    rounding); False = every request in its own row(s).  Mode "full" never shares.
    """
    g_lm, fixed_g = _check_scoring_args(cfg, mode, g_lm, batch_size)
    share = share_context and shareable(mode, fixed_g)
    units: list[_Unit] = []
    pairs: list[tuple[list, list]] = []
    W = cfg.max_seq_len
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if len(cont) > W:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_seq_len={W}")
        if not ctx:
            ctx = [int(prefix_id)]
        full = (ctx + cont)[-(W + 1):]
        if any(t <= 0 or t >= cfg.vocab_size for t in full):
            raise ValueError(f"request {i}: ids must be in [1, vocab_size={cfg.vocab_size}) (0 is padding)")
        if share:
            pairs.append((full[:-len(cont)], cont))
        else:
            units += _units_for(i, full[:-1], full[1:], len(cont), mode)
    if share:
        sums, greedy = score_packed_rows(cfg, params, pack_requests(pairs, W), len(requests), g_lm=g_lm,
                                         batch_size=batch_size, progress=progress)
        return [(float(s), bool(g)) for s, g in zip(sums, greedy)]
    sums, _, greedy = score_units(cfg, params, units, len(requests), mode=mode, g_lm=g_lm, batch_size=batch_size,
                                  progress=progress)
    return [(float(s), bool(g)) for s, g in zip(sums, greedy)]


# --------------------------------------------------------------------------- text encoding
def make_encoder(tokenizer) -> Callable[[str], list[int]]:
    """text -> ids without BOS/EOS, for a ``pldr_jax.data.Tokenizer`` (``encode(text, add_eos=False)``),
    a sentencepiece processor or any object whose ``encode(text)`` returns ids (a trailing EOS is
    dropped)."""
    def enc(text: str) -> list[int]:
        try:
            return list(tokenizer.encode(text, add_eos=False))
        except TypeError:
            ids = list(tokenizer.encode(text))
            return ids[:-1] if ids and ids[-1] == EOS_ID else ids
    return enc


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split: trailing spaces of the context move to the continuation,
    then ``cont = encode(context + continuation)[len(encode(context)):]`` so that the two parts
    tokenize as the whole text does."""
    n_sp = len(context) - len(context.rstrip())
    if n_sp:
        continuation = context[-n_sp:] + continuation
        context = context[:-n_sp]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


# --------------------------------------------------------------------------- multiple choice
def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Items ``{"context", "choices", "label"}`` one JSON object per line (blank lines skipped).

    context: str or list of ids; choices: list of str or of id lists (>= 2); label: int index.
    ValueError names the line of the first malformed item.
    """
    p = Path(path)
    items = []
    for ln, d in iter_jsonl(p, "multiple-choice file"):
        try:
            _validate_item(d)
        except ValueError as e:
            raise ValueError(f"{p}:{ln}: {e}") from None
        items.append(d)
    if not items:
        raise ValueError(f"{p}: no items")
    return items


def _validate_item(d) -> None:
    if not isinstance(d, dict):
        raise ValueError("item must be a JSON object with context, choices, label")
    missing = [k for k in ("context", "choices", "label") if k not in d]
    if missing:
        raise ValueError(f"item lacks {missing}")
    ch = d["choices"]
    if not isinstance(ch, list) or len(ch) < 2:
        raise ValueError("choices must be a list of at least 2 entries")
    lab = d["label"]
    if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(ch):
        raise ValueError(f"label must be an int in [0, {len(ch)}), got {lab!r}")


@dataclasses.dataclass
class MCResult:
    """acc, acc_norm: accuracies; n: items; loglikelihoods: per item, per choice (float64);
    lengths: the normalisers of acc_norm per choice; pred / pred_norm: argmax indices; labels;
    is_greedy: per item, per choice."""
    acc: float
    acc_norm: float
    n: int
    loglikelihoods: list
    lengths: list
    pred: list
    pred_norm: list
    labels: list
    is_greedy: list

    def summary(self) -> dict:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


def mc_requests(items: Sequence[dict], encode: Callable[[str], list[int]] | None = None,
                target_delimiter: str = " ") -> tuple[list, list, list]:
    """Items -> (flat list of (context_ids, continuation_ids), per-item choice counts, per-choice
    acc_norm lengths).  Text choices are scored as ``target_delimiter + choice`` (lm-eval's default
    " "), lengths are ``len(choice)`` in characters; token choices are used as given, lengths in tokens."""
    reqs, counts, lengths = [], [], []
    for i, d in enumerate(items):
        _validate_item(d)
        ctx = d["context"]
        lens = []
        for c in d["choices"]:
            if isinstance(c, str):
                if encode is None:
                    raise ValueError(f"item {i}: text choices need a tokenizer")
                if isinstance(ctx, str):
                    cids, tids = encode_pair(encode, ctx, target_delimiter + c)
                else:
                    cids, tids = list(ctx), encode(target_delimiter + c)
                lens.append(float(len(c)))
            else:
                if isinstance(ctx, str) and encode is None:
                    raise ValueError(f"item {i}: text context needs a tokenizer")
                cids = encode(ctx) if isinstance(ctx, str) else list(ctx)
                tids = [int(t) for t in c]
                lens.append(float(len(tids)))
            reqs.append((cids, tids))
        counts.append(len(d["choices"]))
        lengths.append(lens)
    return reqs, counts, lengths


def score_multiple_choice(cfg: PLDRConfig, params, items, *, tokenizer=None, mode: str = "full", g_lm=None,
                          batch_size: int = 8, target_delimiter: str = " ") -> MCResult:
    """Accuracy and length-normalised accuracy on multiple-choice items (a list of dicts or a JSONL
    path; see ``load_jsonl``).  ``tokenizer`` is needed for text items."""
    if isinstance(items, (str, os.PathLike)):
        items = load_jsonl(items)
    items = list(items)
    if not items:
        raise ValueError("no multiple-choice items")
    encode = make_encoder(tokenizer) if tokenizer is not None else None
    reqs, counts, lengths = mc_requests(items, encode, target_delimiter)
    res = loglikelihood_tokens(cfg, params, reqs, mode=mode, g_lm=g_lm, batch_size=batch_size)
    lls, greedy, pred, pred_norm, labels = [], [], [], [], []
    k = 0
    for d, n, lens in zip(items, counts, lengths):
        ll = [r[0] for r in res[k:k + n]]
        greedy.append([r[1] for r in res[k:k + n]])
        k += n
        lls.append(ll)
        pred.append(int(np.argmax(ll)))
        pred_norm.append(int(np.argmax(np.asarray(ll) / np.asarray(lens))))
        labels.append(int(d["label"]))
    acc = float(np.mean([p == l for p, l in zip(pred, labels)]))
    acc_norm = float(np.mean([p == l for p, l in zip(pred_norm, labels)]))
    return MCResult(acc=acc, acc_norm=acc_norm, n=len(items), loglikelihoods=lls, lengths=lengths, pred=pred,
                    pred_norm=pred_norm, labels=labels, is_greedy=greedy)
