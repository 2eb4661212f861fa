"""Core model: config, shapes, RoPE, attention properties, layer iteration, dtypes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pldr_jax
from pldr_jax import PLDRConfig
from pldr_jax.ops.rope import apply_rope

TINY = PLDRConfig.preset("tiny")


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value,match", [
    ("d_model", 30, "divisible by num_heads"),
    ("num_layers", 0, "num_layers"),
    ("dff", -1, "dff"),
    ("custom_G_type", "bogus", "custom_G_type"),
    ("dtype", "int8", "dtype"),
    ("rope_theta", 0.5, "rope_theta"),
    ("vocab_size", 2, "vocab_size"),
    ("A_dff", 0, "A_dff"),
    ("layer_norm_eps", 0.0, "layer_norm_eps"),
    ("init", "kaiming", "init"),
])
def test_config_rejects_bad_values_naming_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**{field: value})


def test_config_hashable_frozen_and_round_trips():
    assert hash(TINY) == hash(PLDRConfig.preset("tiny"))
    with pytest.raises(Exception):
        TINY.d_model = 64  # type: ignore[misc]
    assert PLDRConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown PLDRConfig fields"):
        PLDRConfig.from_dict({**TINY.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        PLDRConfig.preset("v99")


def test_from_reference_hparams(ref):
    import json
    hp = json.loads((ref / "tiny_v510.json").read_text())
    cfg = PLDRConfig.from_reference_hparams(hp)
    assert cfg == TINY
    with pytest.raises(ValueError, match="input_vocab_size"):
        PLDRConfig.from_reference_hparams({"num_layers": 2})
    g = PLDRConfig.from_reference_hparams({**hp["hyperparameters"], "custom_G_type": "identity"})
    assert not g.learned_g and g.A_dff == 0


# --------------------------------------------------------------------------- paper sizes (no memory)
@pytest.mark.parametrize("name,count", [("v51-110m", 109_689_362), ("v51g-106m", 105_606_482),
                                        ("v51-dag-110m", 109_689_362)])
def test_paper_parameter_counts(name, count):
    assert pldr_jax.count_params(PLDRConfig.preset(name)) == count


@pytest.mark.parametrize("name", ["v51-110m", "v51g-106m"])
def test_paper_forward_shapes_eval_shape(name):
    cfg = PLDRConfig.preset(name)
    params = pldr_jax.abstract_params(cfg)
    tokens = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    out = jax.eval_shape(lambda p, t: pldr_jax.forward(cfg, p, t), params, tokens)
    assert out.logits.shape == (2, 1024, 32000) and out.logits.dtype == jnp.float32
    assert out.deductive["G_LM"].shape[0] == 5 and out.deductive["G_LM"].shape[-3:] == (14, 64, 64)
    if cfg.learned_g:
        for k in ("A", "A_LM", "A_P", "G_LM"):
            assert out.deductive[k].shape == (5, 2, 14, 64, 64)


def test_logical_axes_cover_every_param():
    for name in ("tiny", "tiny-g"):
        cfg = PLDRConfig.preset(name)
        params = pldr_jax.abstract_params(cfg)
        axes = pldr_jax.logical_axes(cfg)
        flat_p = jax.tree_util.tree_leaves_with_path(params)
        flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
        for path, leaf in flat_p:
            assert len(flat_a[path]) == leaf.ndim, path


# --------------------------------------------------------------------------- RoPE
def _rope_direct(x, theta, interleaved):
    """Per-pair rotation written out element by element (numpy float64)."""
    B, L, H, dk = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    for pos in range(L):
        for i in range(dk // 2):
            ang = pos * theta ** (-2.0 * i / dk)
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + dk // 2)
            out[:, pos, :, a] = x[:, pos, :, a] * math.cos(ang) - x[:, pos, :, b] * math.sin(ang)
            out[:, pos, :, b] = x[:, pos, :, b] * math.cos(ang) + x[:, pos, :, a] * math.sin(ang)
    return out


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_matches_direct_formula(interleaved):
    x = np.random.default_rng(0).normal(size=(2, 9, 3, 8)).astype(np.float32)
    got = apply_rope(jnp.asarray(x), jnp.arange(9), 10000.0, interleaved)
    np.testing.assert_allclose(np.asarray(got), _rope_direct(x, 10000.0, interleaved), atol=2e-6)


def test_rope_preserves_relative_dot_products():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
    dots = []
    for p in (0, 5, 17):
        qr = apply_rope(q, jnp.array([[p + 3]]), 10000.0, False)
        kr = apply_rope(k, jnp.array([[p]]), 10000.0, False)
        dots.append(float(jnp.sum(qr * kr)))
    np.testing.assert_allclose(dots, dots[0], rtol=1e-5)


# --------------------------------------------------------------------------- model properties
def _random_tokens(B, L, V, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, V, size=(B, L)), jnp.int32)


def _sdpa_reference_model(cfg, params, tokens):
    """An independent plain causal-SDPA transformer in numpy with the same weights (G = I)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), pldr_jax.unstack_layers(params))
    toks = np.asarray(tokens)
    B, L = toks.shape
    H, dk, D = cfg.num_heads, cfg.head_dim, cfg.d_model

    def ln(x, q):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + cfg.layer_norm_eps) * q["scale"] + q["bias"]

    lin = lambda q, x: x @ q["kernel"] + q["bias"]
    silu = lambda x: x / (1 + np.exp(-x))
    x = ln(p["embed"]["embedding"][toks] * math.sqrt(D), p["embed_norm"])
    pos = np.arange(L)
    valid = toks != 0
    allowed = (pos[None, :, None] >= pos[None, None, :]) & valid[:, None, :]
    for lp in p["layers"]:
        q = _rope_direct(lin(lp["wq"], x).reshape(B, L, H, dk), cfg.rope_theta, cfg.reference_rope)
        k = _rope_direct(lin(lp["wk"], x).reshape(B, L, H, dk), cfg.rope_theta, cfg.reference_rope)
        v = lin(lp["wv"], x).reshape(B, L, H, dk)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dk)
        s = np.where(allowed[:, None], s, -1e30)
        e = np.exp(s - s.max(-1, keepdims=True))
        e /= e.sum(-1, keepdims=True)
        att = np.einsum("bhqk,bkhd->bqhd", e, v).reshape(B, L, D)
        h = ln(x + lin(lp["dense"], att), lp["norm1"])
        f = lin(lp["ffn"]["w3"], silu(lin(lp["ffn"]["w1"], h)) * lin(lp["ffn"]["w2"], h))
        x = ln(h + f, lp["norm2"])
    return lin(p["final"], x)


@pytest.mark.parametrize("name", ["tiny", "tiny-g"])
def test_identity_g_equals_plain_causal_sdpa(name):
    cfg = PLDRConfig.preset(name)
    params = pldr_jax.init_params(cfg, jax.random.key(3))
    tokens = _random_tokens(2, 10, cfg.vocab_size).at[1, 8:].set(0)
    eye = jnp.broadcast_to(jnp.eye(cfg.head_dim), (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim))
    got = pldr_jax.forward(cfg, params, tokens, g_lm=eye).logits
    want = _sdpa_reference_model(cfg, params, tokens)
    valid = np.asarray(tokens) != 0
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=2e-5)


def test_scan_and_python_loop_layouts_agree():
    params = pldr_jax.init_params(TINY, jax.random.key(1))
    tokens = _random_tokens(2, 12, TINY.vocab_size)
    a = pldr_jax.forward(TINY, params, tokens)
    b = pldr_jax.forward(TINY, pldr_jax.unstack_layers(params), tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
    for k in a.deductive:
        # float32 summation order differs between the two layouts; A_LM/G_LM come through a matrix
        # inverse, which amplifies it a little
        np.testing.assert_allclose(a.deductive[k], b.deductive[k], rtol=1e-4, atol=1e-4)
    restacked = pldr_jax.stack_layers(pldr_jax.unstack_layers(params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, restacked, params)


def test_pad_aware_A_makes_padded_row_equal_prompt_alone():
    params = pldr_jax.init_params(TINY, jax.random.key(2))
    row = _random_tokens(1, 7, TINY.vocab_size, seed=5)
    padded = jnp.concatenate([row, jnp.zeros((1, 3), jnp.int32)], axis=1)
    batch = jnp.concatenate([padded, _random_tokens(1, 10, TINY.vocab_size, seed=6)], axis=0)
    alone = pldr_jax.forward(TINY, params, row, pad_aware_A=True)
    batched = pldr_jax.forward(TINY, params, batch, pad_aware_A=True)
    np.testing.assert_allclose(batched.logits[0, :7], alone.logits[0], atol=1e-5)
    np.testing.assert_allclose(batched.deductive["G_LM"][:, 0], alone.deductive["G_LM"][:, 0], rtol=1e-5, atol=1e-5)
    # the reference's default (A over every position, pads included) differs
    ref_default = pldr_jax.forward(TINY, params, batch)
    assert np.abs(np.asarray(ref_default.logits[0, :7] - alone.logits[0])).max() > 1e-4


def test_reference_A_sees_future_tokens():
    params = pldr_jax.init_params(TINY, jax.random.key(4))
    t = _random_tokens(1, 8, TINY.vocab_size)
    t2 = t.at[0, 7].set((t[0, 7] % (TINY.vocab_size - 1)) + 1)
    a, b = pldr_jax.forward(TINY, params, t).logits, pldr_jax.forward(TINY, params, t2).logits
    assert np.abs(np.asarray(a[0, :7] - b[0, :7])).max() > 1e-5  # the documented reference leak


def test_bfloat16_compute_keeps_deductive_path_float32():
    cfg = TINY.replace(dtype="bfloat16")
    params = pldr_jax.init_params(TINY, jax.random.key(0))
    tokens = _random_tokens(2, 12, cfg.vocab_size)
    out = pldr_jax.forward(cfg, params, tokens)
    ref = pldr_jax.forward(TINY, params, tokens)
    assert out.logits.dtype == jnp.float32 and out.deductive["G_LM"].dtype == jnp.float32
    assert np.isfinite(np.asarray(out.logits)).all()
    np.testing.assert_allclose(out.logits, ref.logits, atol=0.15)


def test_forward_input_errors():
    params = pldr_jax.init_params(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match="integer"):
        pldr_jax.forward(TINY, params, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="rank 2"):
        pldr_jax.forward(TINY, params, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="max_seq_len"):
        pldr_jax.forward(TINY, params, jnp.ones((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="g_lm has shape"):
        pldr_jax.forward(TINY, params, jnp.ones((1, 4), jnp.int32), g_lm=jnp.zeros((2, 4, 8, 7)))
    gcfg = TINY.replace(custom_G_type="external", A_dff=0, num_reslayerA=0, num_denseA=0)
    with pytest.raises(ValueError, match="g_lm is required"):
        pldr_jax.forward(gcfg, pldr_jax.init_params(gcfg, jax.random.key(0)), jnp.ones((1, 4), jnp.int32))


def test_init_reference_vs_corrected_wv():
    ref = pldr_jax.init_params(PLDRConfig.preset("small"), jax.random.key(0))
    cor = pldr_jax.init_params(PLDRConfig.preset("small", init="corrected"), jax.random.key(0))
    D = 256
    # reference slip: wv keeps torch's default init (non-zero bias, bound 1/sqrt(D))
    assert np.abs(np.asarray(ref["layers"]["wv"]["bias"])).max() > 0
    assert np.abs(np.asarray(ref["layers"]["wv"]["kernel"])).max() <= 1 / math.sqrt(D) + 1e-6
    assert np.abs(np.asarray(cor["layers"]["wv"]["bias"])).max() == 0
    assert np.abs(np.asarray(ref["layers"]["wk"]["bias"])).max() == 0
    # xavier-normal plga tensors: std sqrt(2 / (dk*dk + H*dk))
    dk, H = 32, 8
    std = np.asarray(ref["layers"]["plga"]["W"]).std()
    assert abs(std - math.sqrt(2 / (dk * dk + H * dk))) / std < 0.05
    assert abs(np.asarray(ref["embed"]["embedding"]).std() - 1.0) < 0.02


def _interleaved_to_neox(cfg, params):
    """Permute per-head features (2i -> i, 2i+1 -> i + dk/2) so a NeoX-RoPE model computes exactly
    what the interleaved model computes; dk-indexed metric-learner and PLGA tensors follow."""
    dk, H = cfg.head_dim, cfg.num_heads
    perm = np.concatenate([np.arange(0, dk, 2), np.arange(1, dk, 2)])
    cols = (np.arange(H)[:, None] * dk + perm[None, :]).reshape(-1)
    lay = jax.tree_util.tree_map(np.asarray, params["layers"])
    for n in ("wq", "wk"):
        lay[n] = {"kernel": lay[n]["kernel"][..., cols], "bias": lay[n]["bias"][..., cols]}
    lay["metric_norm"] = {k: v[..., perm] for k, v in lay["metric_norm"].items()}
    res = lay["metric_res"]
    for n in ("w1", "w2"):
        res[n] = {"kernel": res[n]["kernel"][..., perm, :], "bias": res[n]["bias"]}
    res["w3"] = {"kernel": res["w3"]["kernel"][..., perm], "bias": res["w3"]["bias"][..., perm]}
    res["norm"] = {k: v[..., perm] for k, v in res["norm"].items()}
    lay["plga"] = {k: v[..., perm, :][..., perm] for k, v in lay["plga"].items()}
    return {**params, "layers": lay}, perm


def test_neox_rope_equals_interleaved_on_permuted_weights():
    params = pldr_jax.init_params(TINY, jax.random.key(7))
    tokens = _random_tokens(2, 11, TINY.vocab_size)
    neox_cfg = TINY.replace(reference_rope=False)
    neox_params, perm = _interleaved_to_neox(TINY, params)
    a = pldr_jax.forward(TINY, params, tokens)
    b = pldr_jax.forward(neox_cfg, neox_params, tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-3)  # A_LM ** P amplifies float32 rounding
    np.testing.assert_allclose(np.asarray(a.deductive["G_LM"])[..., perm, :][..., perm], b.deductive["G_LM"],
                               rtol=2e-3, atol=2e-3)
    # and the pairing matters: the same weights under the other pairing give other logits
    c = pldr_jax.forward(neox_cfg, params, tokens)
    assert np.abs(np.asarray(a.logits - c.logits)).max() > 5e-2


@pytest.mark.parametrize("rows", [32, 20])            # 20: not a multiple of 16 (the plain-transpose path)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dense_custom_vjp_matches_autodiff(rows, dtype):
    """`ops.layers.dense`: the forward and its hand-written backward equal float64 math; the weight
    and bias gradients come back in the master weights' float32, not rounded to bfloat16."""
    from pldr_jax.ops.layers import dense
    kx, kw, kb, kg = jax.random.split(jax.random.key(0), 4)
    dt = jnp.dtype(dtype)
    x = jax.random.normal(kx, (2, rows, 48)).astype(dt)
    w = jax.random.normal(kw, (48, 40)) * 0.2                       # float32 master weights
    b = jax.random.normal(kb, (40,)) * 0.1
    g = jax.random.normal(kg, (2, rows, 40)).astype(dt)
    y, vjp = jax.vjp(dense, x, w, b)
    dx, dw, db = vjp(g)
    assert y.dtype == dx.dtype == dt and dw.dtype == db.dtype == jnp.float32 and dw.shape == w.shape
    f64 = lambda a: np.asarray(a, np.float64)
    wc = f64(w.astype(dt))                                          # what the matmul saw
    tol = dict(rtol=1e-2, atol=3e-2) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(y), f64(x) @ wc + f64(b), **tol)
    np.testing.assert_allclose(f64(dx), f64(g) @ wc.T, **tol)
    # weight / bias gradients: float32 accumulation of the exact products of the 16-bit inputs
    np.testing.assert_allclose(f64(dw), np.einsum("blk,bln->kn", f64(x), f64(g)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f64(db), f64(g).sum((0, 1)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_cross_entropy_matches_logits_then_loss(dtype):
    """The fused output head + cross-entropy equals logsumexp(logits) - logits[target] on float32
    logits, its `correct` equals argmax == target, and its custom backward equals autodiff."""
    from pldr_jax.ops.cross_entropy import head_cross_entropy
    kx, kw, kb, kt, kg = jax.random.split(jax.random.key(3), 5)
    dt = jnp.dtype(dtype)
    x = jax.random.normal(kx, (3, 7, 24)).astype(dt)
    w = jax.random.normal(kw, (24, 50)) * 0.3
    b = jax.random.normal(kb, (50,)) * 0.1
    t = jax.random.randint(kt, (3, 7), 0, 50)
    weights = jax.random.uniform(kg, (3, 7))

    def plain(x, w, b):
        logits = jnp.matmul(x.astype(jnp.float32), w.astype(dt).astype(jnp.float32)) + b
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
        return nll, (jnp.argmax(logits, -1) == t).astype(jnp.float32)

    nll, correct = head_cross_entropy(x, w, b, t)
    nll_ref, correct_ref = plain(x, w, b)
    assert nll.shape == correct.shape == (3, 7) and nll.dtype == jnp.float32
    np.testing.assert_allclose(nll, nll_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, correct_ref)
    got = jax.grad(lambda *a: jnp.sum(head_cross_entropy(*a, t)[0] * weights), argnums=(0, 1, 2))(x, w, b)
    want = jax.grad(lambda *a: jnp.sum(plain(*a)[0] * weights), argnums=(0, 1, 2))(x, w, b)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-6)
    for a, e, name in zip(got, want, ("x", "kernel", "bias")):
        assert a.dtype == (dt if name == "x" else jnp.float32), name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), err_msg=name, **tol)


def test_fused_projections_give_the_same_forward():
    """`params.fuse_projections` (wq|wk|wv and ffn w1|w2 concatenated) is a pure re-layout."""
    from pldr_jax.params import fuse_params, unstack_layers
    params = pldr_jax.init_params(TINY, jax.random.key(5))
    tokens = _random_tokens(2, 9, TINY.vocab_size)
    a = pldr_jax.forward(TINY, params, tokens)
    for run in (fuse_params(params), fuse_params(unstack_layers(params))):
        lp = run["layers"] if isinstance(run["layers"], dict) else run["layers"][0]
        assert "wqkv" in lp and "wq" not in lp and "w12" in lp["ffn"] and "w1" not in lp["ffn"]
        b = pldr_jax.forward(TINY, run, tokens)
        np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    assert fuse_params(fuse_params(params))["layers"]["wqkv"]["kernel"].shape == (TINY.num_layers, 32, 96)
