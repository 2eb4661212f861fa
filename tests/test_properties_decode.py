"""Property-based tests (hypothesis) of `pldr_jax.generate`: sampling parameters, ragged prompt
batches, small random configs.  No crash other than the documented ValueError (naming the argument),
ids in the vocabulary, shapes right, logits finite.

Shapes are kept in fixed buckets (prompts <= 16 tokens, max_new_tokens <= 16, B in {1, 3}) so the
compiled decoder is reused across examples.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pldr_jax
from pldr_jax import PLDRConfig
from pldr_jax.decode import generate, prepare_params

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
CFG = PLDRConfig(num_layers=1, d_model=16, num_heads=2, dff=24, vocab_size=23, max_seq_len=32, A_dff=4,
                 num_reslayerA=1, num_denseA=1)


@pytest.fixture(scope="module")
def model():
    return prepare_params(CFG, pldr_jax.init_params(CFG, jax.random.key(0)), 1)[1]


def _check(out, B, max_new):
    assert out.ids.shape[0] == B and len(out.tokens) == B
    for b in range(B):
        assert 1 <= len(out.tokens[b]) <= max_new
        assert all(0 <= t < CFG.vocab_size for t in out.tokens[b])
    assert np.isfinite(out.logits).all()


temperatures = st.one_of(st.floats(1e-3, 10.0), st.floats(-5.0, 0.0), st.sampled_from([math.inf, math.nan]))
top_ps = st.one_of(st.floats(1e-3, 1.0), st.floats(-1.0, 0.0), st.floats(1.0, 3.0, exclude_min=True))
top_ks = st.integers(-3, 40)


@SETTINGS
@given(t=temperatures, p=top_ps, k=top_ks, seed=st.integers(0, 2**31 - 1))
def test_sampling_parameters(model, t, p, k, seed):
    kw = dict(temperature=t, top_p=p, top_k=k, seed=seed)
    bad = [name for name, ok in [("temperature", math.isfinite(t) and t > 0), ("top_k", k >= 0),
                                 ("top_p", 0 < p <= 1)] if not ok]
    if bad:
        with pytest.raises(ValueError, match=bad[0]) as e:
            generate(CFG, model, [[5, 6, 7]], max_new_tokens=8, eos_id=None, return_logits=True, **kw)
        assert any(s in str(e.value) for s in ("> 0", ">= 0", "(0, 1]"))  # the allowed range is stated
        return
    out = generate(CFG, model, [[5, 6, 7]], max_new_tokens=8, eos_id=None, return_logits=True, **kw)
    _check(out, 1, 8)
    assert list(out.num_generated) == [8]


@SETTINGS
@given(lens=st.lists(st.integers(1, 16), min_size=3, max_size=3), max_new=st.integers(1, 16),
       greedy=st.booleans(), eos=st.sampled_from([None, 3]), data=st.data())
def test_ragged_prompt_batches(model, lens, max_new, greedy, eos, data):
    prompts = [data.draw(st.lists(st.integers(1, CFG.vocab_size - 1), min_size=n, max_size=n)) for n in lens]
    out = generate(CFG, model, prompts, max_new_tokens=max_new, top_k=1 if greedy else 0, eos_id=eos,
                   return_logits=True)
    _check(out, 3, max_new)
    assert list(out.prompt_lengths) == lens
    for b in range(3):
        toks = out.tokens[b]
        if eos is not None and eos in toks:
            assert toks.index(eos) == len(toks) - 1  # stops right after EOS
        else:
            assert len(toks) == max_new


@SETTINGS
@given(lens=st.lists(st.integers(-1, 40), min_size=1, max_size=3), max_new=st.integers(-1, 40),
       oov=st.booleans())
def test_bad_prompts_raise_documented_errors(model, lens, max_new, oov):
    prompts = [[(CFG.vocab_size + 5 if oov and i == 0 else 4)] * n for i, n in enumerate(lens) if n >= 0]
    try:
        out = generate(CFG, model, prompts, max_new_tokens=max_new, top_k=1, eos_id=None)
    except ValueError as e:
        msg = str(e)
        assert any(w in msg for w in ("max_new_tokens", "empty", "vocab_size", "max_seq_len", "prompts must")), msg
        return
    assert prompts and all(prompts) and not oov and 1 <= max_new and max(lens) + max_new <= CFG.max_seq_len
    assert out.ids.shape[0] == len(prompts)


@st.composite
def small_configs(draw):
    heads = draw(st.sampled_from([1, 2]))
    dk = draw(st.sampled_from([2, 4]))
    kw = dict(num_layers=draw(st.integers(1, 2)), d_model=heads * dk, num_heads=heads, dff=draw(st.integers(1, 12)),
              vocab_size=draw(st.integers(4, 30)), max_seq_len=32, reference_rope=draw(st.booleans()))
    if draw(st.booleans()):
        kw.update(A_dff=draw(st.integers(1, 4)), num_reslayerA=1, num_denseA=1)
    else:
        kw.update(custom_G_type="identity", A_dff=0, num_reslayerA=0, num_denseA=0)
    return PLDRConfig(**kw)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=small_configs(), seed=st.integers(0, 2**16), kv=st.booleans())
def test_small_random_configs_generate(cfg, seed, kv):
    params = pldr_jax.init_params(cfg, jax.random.key(seed))
    prompts = [[1 + (i % (cfg.vocab_size - 1)) for i in range(5)], [cfg.vocab_size - 1]]
    out = generate(cfg, params, prompts, max_new_tokens=6, kv_cache=kv, top_k=1, eos_id=None, return_logits=True)
    assert out.ids.shape[0] == 2 and [len(t) for t in out.tokens] == [6, 6]
    assert all(0 <= t < cfg.vocab_size for row in out.tokens for t in row)
    assert out.logits.shape[:2] == (2, 6) and out.logits.shape[2] == cfg.vocab_size
    assert np.isfinite(out.logits).all()
