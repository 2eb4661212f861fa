"""G_LM sources: shapes, specs, transfer into a v510G model, external files, the batched sweep."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import PLDRConfig, count_params, forward, masked_loss
from pldr_jax import g_sources as gs
from .conftest import ref_path
from .helpers import fast_params

TINY = PLDRConfig.preset("tiny")
SHAPE = (TINY.num_layers, TINY.num_heads, TINY.head_dim, TINY.head_dim)


@pytest.fixture(scope="module")
def learned():
    return TINY, fast_params(TINY)


def test_simple_sources_shapes_and_statistics():
    eye = gs.identity_g(TINY)
    assert eye.shape == SHAPE and eye.dtype == jnp.float32
    np.testing.assert_array_equal(eye[1, 3], np.eye(8))
    n = np.asarray(gs.random_normal_g(TINY, jax.random.key(1), scale=0.02))      # 512 values
    assert n.dtype == np.float32 and abs(n.std() - 0.02) < 0.002 and abs(n.mean()) < 0.004
    u = np.asarray(gs.random_uniform_g(TINY, jax.random.key(1)))
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.05
    np.testing.assert_array_equal(u, gs.random_uniform_g(TINY, jax.random.key(1)))  # pure in the key
    assert gs.default_g(TINY) is None
    np.testing.assert_array_equal(gs.default_g(TINY.replace(custom_G_type="identity", A_dff=0)), eye[:2])


def test_make_g_specs(tmp_path):
    k = jax.random.key(3)
    assert gs.make_g(TINY, "learned") is None
    np.testing.assert_array_equal(gs.make_g(TINY, "identity"), gs.identity_g(TINY))
    np.testing.assert_array_equal(gs.make_g(TINY, "random_normal:0.02", k), gs.random_normal_g(TINY, k, 0.02))
    np.testing.assert_array_equal(gs.make_g(TINY, "normal:2:1", k), gs.random_normal_g(TINY, k, 2.0, 1.0))
    np.testing.assert_array_equal(gs.make_g(TINY, "uniform", k), gs.random_uniform_g(TINY, k))
    u = gs.make_g(TINY, "uniform:-1:1", k)
    assert float(u.min()) >= -1 and float(u.min()) < -0.5
    g = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    path = tmp_path / "g.npz"
    np.savez(path, **{f"layer{i}_G_LM": g[i][None] for i in range(2)})
    np.testing.assert_array_equal(gs.make_g(TINY, f"external:{path}"), g)
    np.testing.assert_array_equal(gs.make_g(TINY, g), g)  # an array is validated and passed on
    for bad, match in [("bogus", "unknown G spec"), ("random_normal:x", "numbers"), ("uniform:0.5", "both bounds"),
                       ("uniform:1:0", "low must be"), ("identity:3", "no arguments"), ("external:", "needs a path"),
                       ("transfer:preset:tiny", "prompt_tokens")]:
        with pytest.raises(ValueError, match=match):
            gs.make_g(TINY, bad, k)
    with pytest.raises(ValueError, match="learned-G config"):
        gs.make_g(TINY.replace(custom_G_type="identity", A_dff=0), "learned")
    with pytest.raises(ValueError, match="expected"):
        gs.make_g(TINY, np.zeros((3, 4, 8, 8)))


def test_external_g_files(tmp_path):
    # the authors' G-cache list format (one "layer{i}_G_LM" [1, H, dk, dk] per layer); the paper's learned
    # G of PLDRv51-110M (copied into tests/data, so this runs without ../shared)
    paper = ref_path("predefined_G_LM_cache_list_PLDRv51_110M_1_5layer_14head_64x64_paper.npz")
    cfg = PLDRConfig.preset("v51g-106m")
    g = gs.external_g(paper, cfg)
    assert g.shape == (5, 14, 64, 64) and g.dtype == jnp.float32
    with np.load(paper) as raw:  # exactly the file's arrays, in layer order
        np.testing.assert_array_equal(np.asarray(g), np.stack([raw[f"layer{i}_G_LM"][0] for i in range(5)]))
    np.testing.assert_array_equal(gs.external_g(ref_path("predefined_G_LM_cache_list_IDENTITY_5layer_14head_64x64_paper.npz"),
                                                cfg), gs.identity_g(cfg))
    with pytest.raises(ValueError, match="layers"):
        gs.external_g(paper, TINY)
    # an .npy of the stacked array gives the same G
    np.save(tmp_path / "g.npy", np.asarray(g))
    np.testing.assert_array_equal(gs.external_g(tmp_path / "g.npy", cfg), g)
    with pytest.raises(FileNotFoundError):
        gs.external_g(tmp_path / "missing.npz", cfg)


def _row(ids, n=8):
    """One right-padded row [1, n]: every check uses length 8, so the forward passes compile a few times only."""
    x = np.zeros((1, n), np.int32)
    x[0, :len(ids)] = ids
    return jnp.asarray(x)


PROMPT = [5, 17, 9, 33]


def test_transferred_g_into_v510g_gives_the_learned_models_g_cache_logits(learned):
    """Acceptance: a learned model's G_LM, transferred into a v510G model, gives the same logits as the
    learned model run with that G-cache."""
    cfg, p = learned
    prompt = _row(PROMPT)                                              # padded: pad-aware A = the prompt alone
    G = gs.transferred_g(cfg, p, prompt)
    assert G.shape == SHAPE
    own = forward(cfg, p, prompt, pad_aware_A=True)
    np.testing.assert_array_equal(G, own.deductive["G_LM"][:, 0])
    cfg_g, p_g = gs.drop_deep_net(cfg, p)
    assert cfg_g.custom_G_type == "external" and not cfg_g.learned_g
    assert count_params(p_g) < count_params(p) and "plga" not in p_g["layers"]
    other = _row([5, 17, 9, 33, 2, 71, 44, 8])
    for x in (prompt, other):
        a = forward(cfg_g, p_g, x, G).logits                      # v510G with the transferred G
        b = forward(cfg, p, x, G).logits                          # learned model + that G-cache
        np.testing.assert_array_equal(a, b)
    # on the prompt itself the G-cache is what the learned model derives: its own logits
    n = len(PROMPT)
    np.testing.assert_allclose(forward(cfg_g, p_g, prompt, G).logits[:, :n], own.logits[:, :n], atol=1e-5, rtol=0)
    # through the decoder: the learned model's KV+G-cache generation == the v510G model with the transferred G
    try:
        from pldr_jax.decode import generate
    except ImportError:
        return
    out = generate(cfg, p, [PROMPT], max_new_tokens=5, kv_cache=True, g_cache=True, top_k=1, eos_id=None,
                   return_logits=True)
    seq = _row(PROMPT + out.tokens[0][:-1])
    # with a fixed G attention is causal, so one v510G pass gives every step's next-token logits
    step_logits = forward(cfg_g, p_g, seq, G).logits[0, n - 1:]
    # the decoder runs fused, transposed weights (prepare_params): float32 summation order differs
    np.testing.assert_allclose(out.logits[0], step_logits, atol=3e-4, rtol=0)
    assert out.tokens[0] == np.argmax(np.asarray(step_logits), -1).tolist()


def test_transferred_g_batch_reductions_and_specs(learned):
    cfg, p = learned
    batch = jnp.concatenate([_row([5, 6, 7, 8]), _row([9, 10])])
    first = gs.transferred_g(cfg, p, batch)
    np.testing.assert_allclose(first, gs.transferred_g(cfg, p, batch[0]), atol=1e-4, rtol=1e-4)
    # pad-aware: the padded row gives the G of the same prompt alone (up to float32 rounding, which the
    # metric learner's LayerNorms amplify)
    allg = gs.transferred_g(cfg, p, batch, reduce="none")
    alone = gs.transferred_g(cfg, p, batch[1])
    np.testing.assert_allclose(allg[:, 1], alone, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(gs.transferred_g(cfg, p, batch, reduce="mean"), allg.mean(axis=1), atol=1e-6)
    with pytest.raises(ValueError, match="reduce"):
        gs.transferred_g(cfg, p, batch, reduce="max")
    with pytest.raises(ValueError, match="learned-G source"):
        gs.transferred_g(TINY.replace(custom_G_type="identity", A_dff=0), p, batch)
    # "transfer:<checkpoint>" loads the source model and takes its prompt G-cache
    g = gs.make_g(cfg, "transfer:ckpt", prompt_tokens=batch[0], loader=lambda path: (cfg, p, None))
    np.testing.assert_allclose(g, first, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="source model"):
        gs.make_g(cfg, "transfer:x", prompt_tokens=batch[0],
                  loader=lambda path: (cfg.replace(num_layers=3), p, None))


def test_sweep_forward_equals_separate_forwards(learned):
    cfg, p = learned
    x = jnp.concatenate([_row([5, 6, 7, 8, 9]), _row([11, 12, 13])])
    srcs = [gs.identity_g(cfg), gs.random_normal_g(cfg, jax.random.key(1), 0.5),
            gs.random_uniform_g(cfg, jax.random.key(2)), gs.transferred_g(cfg, p, x[:1])]
    out = gs.sweep_forward(cfg, p, x, gs.stack_g(srcs), pad_aware_A=True)
    assert out.logits.shape == (4, 2, 8, cfg.vocab_size)
    for s, g in enumerate(srcs):
        np.testing.assert_allclose(out.logits[s], forward(cfg, p, x, g, pad_aware_A=True).logits, atol=1e-5, rtol=0)
    # the same sweep on the v510G model (training-from-scratch setting) gives the same numbers
    cfg_g, p_g = gs.drop_deep_net(cfg, p)
    out_g = gs.sweep_forward(cfg_g, p_g, x, gs.stack_g(srcs), pad_aware_A=True)
    np.testing.assert_allclose(out_g.logits, out.logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="different shapes"):
        gs.stack_g([srcs[0], srcs[0][:1]])


def test_predefined_g_is_a_constant_in_training(learned):
    """v510G from scratch: G enters the loss as a constant; gradients flow to the weights only."""
    cfg, p = learned
    cfg_g, p_g = gs.drop_deep_net(cfg, p)
    G = gs.random_uniform_g(cfg_g, jax.random.key(4))
    x = _row([5, 6, 7, 8, 9, 10, 11, 12], 9)

    def loss(params, g):
        return masked_loss(forward(cfg_g, params, x[:, :-1], g).logits, x[:, 1:])[0]

    grads = jax.jit(jax.grad(loss))(p_g, G)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(p_g)
    assert all(bool(jnp.all(jnp.isfinite(t))) for t in jax.tree_util.tree_leaves(grads))
