"""The prefill's cheaper forms compute what the plain forms compute.

* RoPE tables made once per prompt length (`decode.step.prompt_rope_tables`, constants of the
  compiled prefill) rotate exactly as the tables computed inside each rotation, and the prefill
  with them equals the prefill that computes them per layer, bit for bit;
* `ops.deductive.derive_g` takes A_LM ** P as exp(P log A_LM): within float32 rounding of
  ``jnp.power``;
* a call that does not need the prompt's stacked deductive outputs does not stack them in the
  prefill, and its ``prompt_deductive`` (stacked from the final cache when read) equals the stacked
  ones, for a learned G and a given G.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax.decode import Sampler, prepare_params
from pldr_jax.decode.output import LayerStack
from pldr_jax.decode import step as decode_step_mod
from pldr_jax.ops.deductive import derive_g, iswiglu
from pldr_jax.ops.rope import apply_rope

PROMPTS = [[70, 48, 9, 8, 68, 61, 1], [5, 17, 99], [12, 40, 33, 7, 7, 81, 2, 64, 90, 11, 45, 23]]


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("P,dk", [(12, 8), (64, 64)])
def test_prompt_rope_tables_rotate_as_the_graph_does(interleaved, P, dk):
    x = jax.random.normal(jax.random.key(0), (3, P, 4, dk))
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (3, P))
    tables = decode_step_mod.prompt_rope_tables(P, dk, 10000.0)
    assert tables[0].shape == (P, dk // 2) and isinstance(tables[0], np.ndarray)
    want = jax.jit(lambda x, p: apply_rope(x, p, 10000.0, interleaved))(x, pos)
    got = jax.jit(lambda x: apply_rope(x, None, 10000.0, interleaved, tables=tables))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_prefill_with_rope_tables_equals_per_layer_rope(tiny_v510, monkeypatch):
    cfg, params = tiny_v510
    _, run = prepare_params(cfg, params, 1)
    B, P, S = len(PROMPTS), 16, 32
    tokens = np.zeros((B, P), np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    run_prefill = lambda: jax.jit(lambda p, t, l: decode_step_mod.prefill(cfg, p, t, l, None, S))(
        run, jnp.asarray(tokens), lengths)
    got = run_prefill()
    monkeypatch.setattr(decode_step_mod, "prompt_rope_tables", lambda *a: None)   # each layer its own
    want = run_prefill()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_derive_g_power_as_exp_log_matches_power():
    H, dk = 3, 8
    ks = jax.random.split(jax.random.key(1), 6)
    p = {"W": jax.random.normal(ks[0], (H, dk, dk)), "b": jax.random.normal(ks[1], (H, dk, dk)),
         "P": jax.random.uniform(ks[2], (H, dk, dk), minval=-1.5, maxval=2.5),
         "a": jax.random.normal(ks[3], (H, dk, dk)), "ba": jax.random.normal(ks[4], (H, dk, dk))}
    A = jax.random.normal(ks[5], (2, H, dk, dk)) * 3.0        # A_LM from ~1e-9 up to ~1e2
    A_LM, A_P, G_LM = jax.jit(derive_g)(p, A)
    want_lm = iswiglu(jnp.einsum("hij,bhjk->bhik", p["W"], A) + p["b"]) + 1e-9
    np.testing.assert_array_equal(np.asarray(A_LM), np.asarray(want_lm))
    assert float(jnp.min(A_LM)) > 0 and float(jnp.min(A_LM)) < 1e-6       # the small end is exercised
    want_p = jnp.power(want_lm, p["P"])
    np.testing.assert_allclose(np.asarray(A_P), np.asarray(want_p), rtol=2e-6, atol=0)
    want_g = jnp.einsum("hij,bhjk->bhik", p["a"], want_p) + p["ba"]
    np.testing.assert_allclose(np.asarray(G_LM), np.asarray(want_g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("given_g", [False, True], ids=["learned_g", "given_g"])
def test_prompt_deductive_without_stacking_equals_stacked(tiny_v510, given_g):
    cfg, params = tiny_v510
    sampler = Sampler(cfg, params)
    kw = dict(max_new_tokens=4, top_k=1, eos_id=None)
    if given_g:
        H, dk = cfg.num_heads, cfg.head_dim
        kw["g_lm"] = np.broadcast_to(np.eye(dk, dtype=np.float32) * 0.5, (cfg.num_layers, H, dk, dk))
    plain = sampler(PROMPTS, **kw)
    full = sampler(PROMPTS, return_deductive=True, **kw)
    assert isinstance(plain.prompt_deductive, LayerStack) and isinstance(full.prompt_deductive, dict)
    assert plain.tokens == full.tokens
    assert sorted(plain.prompt_deductive) == sorted(full.prompt_deductive) == (["G_LM"] if given_g else
                                                                                ["A", "A_LM", "G_LM"])
    for name, want in full.prompt_deductive.items():
        got = plain.prompt_deductive[name]
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
