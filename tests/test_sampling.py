"""Sampling: the reference's temperature -> top-p -> top-k filtering, greedy, seeds, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax.decode.sampling import (NEG_LOGIT, Greedy, SamplingParams, filter_logits, make_sampler,
                                      sample_logits, validate_sampling)


# ---------------------------------------------------------------- NumPy port of the reference's filters
def _ref_top_k(logits, k):
    if k == 0:
        return logits
    kth = np.sort(logits, axis=-1)[:, ::-1][:, k - 1:k]
    return np.where(logits < kth, NEG_LOGIT, logits)


def _ref_top_p(logits, p):
    srt = np.sort(logits, axis=-1)[:, ::-1]
    e = np.exp(srt - srt[:, :1])
    cum = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1)
    idx = np.maximum((cum <= p).sum(-1) - 1, 0)
    mins = srt[np.arange(len(srt)), idx][:, None]
    return np.where(logits < mins, NEG_LOGIT, logits)


def _ref_filter(logits, temperature, top_k, top_p):
    x = logits.astype(np.float32)
    if temperature < 1:
        x = x / temperature
    if top_p < 1:
        x = _ref_top_p(x, top_p)
    if top_k > 0:
        x = _ref_top_k(x, top_k)
    return x


_filter_jit = jax.jit(filter_logits)     # traced values: one compilation for every case below


@pytest.fixture(scope="module")
def logits():
    return np.asarray(jax.random.normal(jax.random.key(0), (6, 50)) * 3.0, np.float32)


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.5, 3, 0.9),
                                   (1.0, 40, 0.3), (0.9, 1, 1.0), (1.0, 50, 1.0), (1.0, 0, 0.0001)])
def test_filter_matches_reference(logits, t, k, p):
    got = np.asarray(_filter_jit(logits, jnp.float32(t), jnp.int32(k), jnp.float32(p)))
    want = _ref_filter(logits, t, k, p)
    kept_got, kept_want = got > NEG_LOGIT / 2, want > NEG_LOGIT / 2
    np.testing.assert_array_equal(kept_got, kept_want)
    np.testing.assert_allclose(got[kept_got], want[kept_want], rtol=1e-6)
    assert kept_got.sum(-1).min() >= 1


def test_filter_traced_values_no_recompile(logits):
    traces = []

    @jax.jit
    def f(x, t, k, p):
        traces.append(1)
        return filter_logits(x, t, k, p)

    for t, k, p in [(1.0, 0, 1.0), (0.5, 3, 0.9), (0.9, 10, 0.5)]:
        got = np.asarray(f(logits, jnp.float32(t), jnp.int32(k), jnp.float32(p)))
        want = _ref_filter(logits, t, k, p)
        np.testing.assert_array_equal(got > NEG_LOGIT / 2, want > NEG_LOGIT / 2)
    assert len(traces) == 1


def test_top_k_1_is_greedy(logits):
    key = jax.random.key(3)
    greedy = np.asarray(sample_logits(logits, key, top_k=1))
    np.testing.assert_array_equal(greedy, logits.argmax(-1))
    # the stochastic path with top_k=1 (traced values) also returns the argmax
    for s in range(5):
        got = sample_logits(logits, jax.random.key(s), 1.0, jnp.int32(1), 1.0, kind=("sample", True))
        np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))
    assert make_sampler(0.3, 1, 0.5) == Greedy()


def test_sampling_reproducible_and_seed_dependent(logits):
    a = sample_logits(logits, jax.random.key(7), 1.0, 0, 1.0)
    b = sample_logits(logits, jax.random.key(7), 1.0, 0, 1.0)
    np.testing.assert_array_equal(a, b)
    draws = {tuple(np.asarray(sample_logits(logits, jax.random.key(s), 1.0, 0, 1.0)).tolist()) for s in range(8)}
    assert len(draws) > 1


def test_sampling_respects_filters(logits):
    for s in range(20):
        tok = np.asarray(sample_logits(logits, jax.random.key(s), 1.0, 3, 1.0))
        top3 = np.argsort(-logits, axis=-1)[:, :3]
        assert all(tok[i] in top3[i] for i in range(len(tok)))


def test_temperature_sharpens():
    x = jnp.array([[2.0, 1.0, 0.0]] * 4000)
    hot = np.asarray(sample_logits(x, jax.random.key(0), 1.0, 0, 1.0))
    cold = np.asarray(sample_logits(x, jax.random.key(0), 0.25, 0, 1.0))
    assert (cold == 0).mean() > (hot == 0).mean() + 0.2
    # the frequency of the top token at temperature 1 is its softmax probability
    p0 = float(jax.nn.softmax(jnp.array([2.0, 1.0, 0.0]))[0])
    assert abs((hot == 0).mean() - p0) < 0.03


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"), (dict(temperature="1"), "temperature"),
])
def test_validation_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        validate_sampling(**kw)
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_sampler_objects():
    s = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    assert s.filtered and s.kind == ("sample", True)
    assert SamplingParams().kind == ("sample", False)
    assert hash(s) == hash(SamplingParams(0.7, 5, 0.9))
    with pytest.raises(Exception):
        s.top_k = 3  # frozen


def test_greedy_tokens_equals_argmax_with_ties_nan_and_inf():
    from pldr_jax.decode.sampling import greedy_tokens
    x = np.array(jax.random.normal(jax.random.key(3), (8, 50)), np.float32)
    x[1, [4, 9]] = 7.0                      # tie: the first index wins
    x[2, [6, 30]] = np.nan                  # NaN: the first NaN, as argmax
    x[3, :] = -np.inf
    x[4, [2, 40]] = np.inf
    x[5, 0] = np.nan
    x[6, [3, 12]] = np.inf, np.nan          # NaN after an inf: still the first NaN
    x[7, :] = np.nan
    np.testing.assert_array_equal(np.asarray(greedy_tokens(jnp.asarray(x))), np.argmax(x, axis=-1))
    np.testing.assert_array_equal(np.asarray(greedy_tokens(jnp.asarray(x))), np.asarray(jnp.argmax(jnp.asarray(x), -1)))
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy_tokens)(jnp.asarray(x))), np.argmax(x, axis=-1))
    xb = jnp.asarray(x, jnp.bfloat16)       # 16-bit logits: ties created by the rounding, first index wins
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy_tokens)(xb)), np.asarray(jnp.argmax(xb, -1)))
