"""Requests sharing a context scored in one packed row (`pldr_jax.eval.shared_context`): the layout of
the rows, and scores equal to the unshared path's (mode "cached", fixed G in every mode), ragged
contexts, shared and unshared contexts mixed, choices of different lengths, rows split at max_seq_len."""

from __future__ import annotations

import numpy as np
import pytest

from pldr_jax import PLDRConfig
from pldr_jax.eval import multiple_choice as mc
from pldr_jax.eval.shared_context import PackedRow, pack_requests, shareable

from .helpers import fast_params

CFG = PLDRConfig.preset("tiny")
CFG_G = PLDRConfig.preset("tiny-g")


@pytest.fixture(scope="module")
def params():
    return fast_params(CFG)


def _requests(seed=0):
    """Items with 1..4 choices of 1..4 tokens on contexts of 1..8 tokens, a context reused by a later
    item (its requests join the first item's row) and an empty context."""
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(5):
        ctx = rng.integers(4, CFG.vocab_size, int(rng.integers(1, 9))).tolist()
        reqs += [(ctx, rng.integers(4, CFG.vocab_size, int(rng.integers(1, 5))).tolist())
                 for _ in range(int(rng.integers(1, 5)))]
    return reqs + [(reqs[0][0], [7, 8, 9]), ([], [5, 6]), ([], [9])]


def test_pack_requests_layout():
    reqs = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10]), ([4], [11, 12, 13]), ([5, 6, 7], [14, 15, 16])]
    a, b = pack_requests(reqs, max_len=16)
    assert a.tokens == [5, 6, 7, 8, 14, 15] and a.positions == [0, 1, 2, 3, 3, 4] and a.segments == [1, 1, 1, 2, 3, 3]
    # (row index predicting the target, target, request): first targets from the context's last token
    assert a.scored == [(2, 8, 0), (3, 9, 0), (2, 10, 1), (2, 14, 3), (4, 15, 3), (5, 16, 3)]
    assert b.tokens == [4, 11, 12] and b.positions == [0, 1, 2] and b.scored == [(0, 11, 2), (1, 12, 2), (2, 13, 2)]
    # a row never exceeds max_len: the context is repeated in a new row
    rows = pack_requests([([5, 6, 7], [8, 9, 10])] * 3, max_len=7)
    assert [r.tokens for r in rows] == [[5, 6, 7, 8, 9, 8, 9], [5, 6, 7, 8, 9]]
    assert [sorted({e[2] for e in r.scored}) for r in rows] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="exceed"):
        pack_requests([([5] * 6, [8, 9, 10])], max_len=7)
    assert shareable("cached", False) and not shareable("full", False) and shareable("full", True)


class _Bar:
    """A progress factory's bar (`score_units`' progress argument) that records what it was told."""
    made: list = []

    def __init__(self, total):
        self.total, self.done, self.closed = total, 0, False
        _Bar.made.append(self)

    def update(self, n):
        self.done += n

    def close(self):
        self.closed = True


def test_shared_context_equals_unshared_in_cached_mode(params):
    reqs = _requests()
    _Bar.made = []
    shared = mc.loglikelihood_tokens(CFG, params, reqs, mode="cached", batch_size=8, progress=_Bar)
    alone = mc.loglikelihood_tokens(CFG, params, reqs, mode="cached", batch_size=8, share_context=False,
                                    progress=_Bar)
    np.testing.assert_allclose([s[0] for s in shared], [a[0] for a in alone], rtol=1e-5, atol=5e-5)
    assert [s[1] for s in shared] == [a[1] for a in alone]
    # one bar per call (packed rows, then one row per request), advanced to its total and closed
    n_rows = len(pack_requests([(c or [mc.EOS_ID], x) for c, x in reqs], CFG.max_seq_len))
    assert [(b.total, b.done, b.closed) for b in _Bar.made] == [(n_rows, n_rows, True), (len(reqs), len(reqs), True)]


def test_harness_adapter_shares_contexts_in_cached_mode(params, monkeypatch):
    """lm-eval's adapter passes every request to one `loglikelihood_tokens` call: in mode "cached" the
    choices of a context are packed, with the unshared scores."""
    from pldr_jax.eval import harness
    calls = []
    real = mc.score_packed_rows
    monkeypatch.setattr(mc, "score_packed_rows", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    reqs = _requests()
    lm = harness.PLDRLM(CFG, params, None, mode="cached", batch_size=8)
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    want = mc.loglikelihood_tokens(CFG, params, reqs, mode="cached", batch_size=8, share_context=False)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=5e-5)
    assert calls == [len({tuple(c) or (mc.EOS_ID,) for c, _ in reqs})]       # one row per distinct context


def test_rows_split_at_max_seq_len(params):
    """Four 12-token choices after a 40-token context need 40 + 4 * 11 = 84 > 64 row positions; and
    contexts cut from the left (70 + 3 > max_seq_len + 1 tokens: each choice keeps a different cut)."""
    rng = np.random.default_rng(1)
    ctx = rng.integers(4, CFG.vocab_size, 40).tolist()
    reqs = [(ctx, rng.integers(4, CFG.vocab_size, 12).tolist()) for _ in range(4)]
    assert len(pack_requests([(ctx, c) for _, c in reqs], CFG.max_seq_len)) == 2
    long = rng.integers(4, CFG.vocab_size, 70).tolist()
    reqs += [(long, [7, 8, 9]), (long, [7, 8]), (long, [10, 11, 12])]
    shared = mc.loglikelihood_tokens(CFG, params, reqs, mode="cached", batch_size=2)
    alone = mc.loglikelihood_tokens(CFG, params, reqs, mode="cached", batch_size=2, share_context=False)
    np.testing.assert_allclose([s[0] for s in shared], [a[0] for a in alone], rtol=1e-5, atol=5e-5)


def test_fixed_g_shares_in_every_mode():
    """A predefined G (identity here): every mode is causal with that G, so every mode packs."""
    p = fast_params(CFG_G, seed=2)
    reqs = _requests(seed=3)
    alone = mc.loglikelihood_tokens(CFG_G, p, reqs, mode="full", batch_size=4, share_context=False)
    for mode in ("full", "causal"):
        shared = mc.loglikelihood_tokens(CFG_G, p, reqs, mode=mode, batch_size=4)
        np.testing.assert_allclose([s[0] for s in shared], [a[0] for a in alone], rtol=1e-5, atol=5e-5)


def test_full_mode_never_packs(params, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("packed in mode full")
    monkeypatch.setattr(mc, "score_packed_rows", boom)
    mc.loglikelihood_tokens(CFG, params, [([5, 6], [7]), ([5, 6], [8])], mode="full")


def test_plan_batches_one_length_bucket_per_batch():
    lengths = [5, 20, 70, 9, 33, 34, 35, 100, 3] + [60] * 11
    plan = mc.plan_batches(lengths, 256, batch_size=4)
    assert sorted(i for idx, _, _ in plan for i in idx) == list(range(len(lengths)))
    for idx, L, B in plan:
        assert len(idx) <= B <= 4 and B & (B - 1) == 0 and B < 2 * len(idx)   # B: 4 or a power of two < 2 rows
        assert {mc.bucket_length(lengths[i], 256) for i in idx} == {L}
    assert [(len(idx), L, B) for idx, L, B in plan][:2] == [(2, 128, 2), (4, 64, 4)]


def test_score_packed_rows_checks_its_arguments():
    """`score_packed_rows` is public: a bad argument is a ValueError naming it, raised before any
    batch is built (params=None would fail otherwise)."""
    row = pack_requests([([5, 6, 7], [8, 9])], CFG.max_seq_len)
    long = PackedRow([5] * (CFG.max_seq_len + 1), list(range(CFG.max_seq_len + 1)), [1] * (CFG.max_seq_len + 1),
                     [(0, 6, 0)])
    g2 = np.zeros((CFG_G.num_layers, 2, CFG_G.num_heads, CFG_G.d_model // CFG_G.num_heads,
                   CFG_G.d_model // CFG_G.num_heads), np.float32)
    cases = [((CFG, row, 1), {"batch_size": 0}, "batch_size must be >= 1"),
             ((PLDRConfig.preset("tiny-g", custom_G_type="random"), row, 1), {}, "needs g_lm"),
             ((CFG_G, row, 1), {"g_lm": g2}, "one G_LM for all rows"),
             ((CFG, [long], 1), {}, f"max_seq_len={CFG.max_seq_len}"),
             ((CFG, [PackedRow([5, 6], [0], [1, 1], [])], 1), {}, "2 tokens but 1 positions"),
             ((CFG, [PackedRow([5, 6], [0, 1], [1, 1], [(2, 7, 0)])], 1), {}, "scored row index 2"),
             ((CFG, row, 0), {}, "request index 0 outside n_requests=0"),
             ((CFG, row, -1), {}, "n_requests must be >= 0")]
    for (cfg, rows, n), kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            mc.score_packed_rows(cfg, None, rows, n, **kw)
