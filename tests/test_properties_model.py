"""Property-based tests (hypothesis) of the model over small random configs and token batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pldr_jax
from pldr_jax import PLDRConfig

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def small_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    dk = draw(st.sampled_from([2, 4, 8]))
    learned = draw(st.booleans())
    kw = dict(num_layers=draw(st.integers(1, 2)), d_model=heads * dk, num_heads=heads,
              dff=draw(st.integers(1, 24)), vocab_size=draw(st.integers(4, 40)), max_seq_len=16,
              reference_rope=draw(st.booleans()))
    if learned:
        kw.update(A_dff=draw(st.integers(1, 8)), num_reslayerA=draw(st.integers(1, 2)),
                  num_denseA=draw(st.integers(1, 2)))
    else:
        kw.update(custom_G_type="identity", A_dff=0, num_reslayerA=0, num_denseA=0)
    return PLDRConfig(**kw)


@SETTINGS
@given(cfg=small_configs(), B=st.integers(1, 3), L=st.integers(1, 10), seed=st.integers(0, 2**16),
       pad_aware=st.booleans())
def test_forward_shapes_and_finiteness(cfg, B, L, seed, pad_aware):
    params = pldr_jax.init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, cfg.vocab_size, size=(B, L))
    lengths = rng.integers(1, L + 1, size=B)
    tokens[np.arange(L)[None, :] >= lengths[:, None]] = 0  # right padding, every row >= 1 token
    out = pldr_jax.forward(cfg, params, jnp.asarray(tokens, jnp.int32), pad_aware_A=pad_aware)
    assert out.logits.shape == (B, L, cfg.vocab_size)
    real = tokens != 0
    assert np.isfinite(np.asarray(out.logits)[real]).all()
    H, dk = cfg.num_heads, cfg.head_dim
    if cfg.learned_g:
        for k in ("A", "A_LM", "A_P", "G_LM"):
            assert out.deductive[k].shape == (cfg.num_layers, B, H, dk, dk)
        assert (np.asarray(out.deductive["A_LM"]) > 0).all()  # iSwiGLU >= 0, plus 1e-9
    else:
        assert out.deductive["G_LM"].shape[-3:] == (H, dk, dk)


@SETTINGS
@given(cfg=small_configs(), seed=st.integers(0, 2**16), L=st.integers(2, 9))
def test_causal_with_pad_aware_A_when_g_is_given(cfg, seed, L):
    """With G fixed, the model is strictly causal: changing the last token leaves earlier logits."""
    params = pldr_jax.init_params(cfg, jax.random.key(seed))
    H, dk = cfg.num_heads, cfg.head_dim
    g = jnp.asarray(np.random.default_rng(seed).normal(size=(cfg.num_layers, H, dk, dk)), jnp.float32)
    t = np.random.default_rng(seed + 1).integers(1, cfg.vocab_size, size=(1, L))
    t2 = t.copy()
    t2[0, -1] = t[0, -1] % (cfg.vocab_size - 1) + 1
    a = pldr_jax.forward(cfg, params, jnp.asarray(t, jnp.int32), g_lm=g).logits
    b = pldr_jax.forward(cfg, params, jnp.asarray(t2, jnp.int32), g_lm=g).logits
    np.testing.assert_allclose(a[0, :-1], b[0, :-1], atol=1e-5)
