"""The prefill's cheaper forms compute what the plain forms compute.

* RoPE tables made once per prompt length (`decode.step.prompt_rope_tables`, constants of the
  compiled prefill) rotate exactly as the tables computed inside each rotation, and the prefill
  with them equals the prefill that computes them per layer, bit for bit; so does the decode
  step, which gathers its rows from the table of the buffer's positions;
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


def _in_graph(P, dk, theta):
    """`prompt_rope_tables` computed in the traced graph instead of as constants."""
    from pldr_jax.ops.rope import rope_tables
    return rope_tables(jnp.arange(P, dtype=jnp.int32), dk, theta)


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
    monkeypatch.setattr(decode_step_mod, "prompt_rope_tables", _in_graph)   # cos / sin in the graph
    want = run_prefill()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("kv_cache,g_cache", [(True, True), (True, False), (False, False)], ids=["kv_g", "kv", "none"])
def test_decode_with_rope_tables_equals_per_layer_rope(tiny_v510, monkeypatch, kv_cache, g_cache):
    """The decode step takes its rows' RoPE from the constant table of the buffer's positions: the
    same tokens and logits, bit for bit, as every layer computing cos / sin of the positions in the
    graph (ragged prompts; the whole-buffer mode uses the table as is)."""
    cfg, params = tiny_v510
    run = lambda: Sampler(cfg, params)(PROMPTS, max_new_tokens=5, kv_cache=kv_cache, g_cache=g_cache,
                                       top_k=1, eos_id=None, return_logits=True)
    got = run()
    monkeypatch.setattr(decode_step_mod, "prompt_rope_tables", _in_graph)   # cos / sin in the graph
    jax.clear_caches()                                   # the loop is traced again without the table
    want = run()
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(want.logits))
    jax.clear_caches()


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
