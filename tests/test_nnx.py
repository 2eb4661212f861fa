"""The Flax NNX model (`pldr_jax.nnx.PLDRLLM`): per-layer Params with logical axes, exact conversion
to and from the functional params, the same outputs as `forward`, and the same training as
`train_step` with `nnx.Optimizer` and the reference optimiser."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pldr_jax
from pldr_jax.nnx import PLDRLLM, params_to_state, partition_specs, state_to_params
from pldr_jax.train import create_train_state, lr_schedule, make_optimizer, make_train_step
from pldr_jax.train.sharding import logical_to_spec

from .helpers import fast_params

CFG = pldr_jax.PLDRConfig.preset("tiny")
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and np.array_equal(la[k], lb[k]), k


def tokens(B=2, L=7, seed=0, cfg=CFG):
    t = np.random.default_rng(seed).integers(1, cfg.vocab_size, (B, L))
    t[1, -2:] = 0  # padding
    return jnp.asarray(t, jnp.int32)


def test_params_per_layer_with_logical_axes():
    params = fast_params(CFG)
    model = PLDRLLM.from_params(CFG, params)
    assert len(model.layers) == CFG.num_layers
    state = nnx.state(model, nnx.Param)
    n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(state))
    assert n == pldr_jax.count_params(CFG)
    axes = pldr_jax.logical_axes(CFG)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)
    # every Param carries the functional tree's logical axes (the layers' without the stacking axis)
    for path, want in jax.tree_util.tree_leaves_with_path(axes, is_leaf=is_axes):
        keys = [k.key for k in path]
        if keys[0] == "layers":
            assert want[0] == "layers"
            for i in range(CFG.num_layers):
                p = model.layers[i]
                for k in keys[1:]:
                    p = getattr(p, k)
                assert isinstance(p, nnx.Param) and p.out_sharding == want[1:], keys
                assert p.shape == params["layers"][keys[1]][keys[2]].shape[1:] if len(keys) == 3 else True
        else:
            p = model
            for k in keys:
                p = getattr(p, k)
            assert isinstance(p, nnx.Param) and p.out_sharding == want, keys
    # the rule table maps them as it maps the functional params (one rule table for both)
    specs = nnx.to_pure_dict(partition_specs(model))
    assert specs["layers"][0]["wq"]["kernel"] == logical_to_spec(("embed", "heads"))
    assert specs["embed"]["embedding"] == logical_to_spec(("vocab", "embed"))


def test_state_round_trip_is_exact():
    params = fast_params(CFG, seed=1)
    model = PLDRLLM.from_params(CFG, params)
    assert_trees_equal(state_to_params(nnx.state(model, nnx.Param)), params)
    assert_trees_equal(model.to_params(), params)
    # functional params into another model, and back
    fresh = PLDRLLM.from_params(CFG, fast_params(CFG, seed=3))
    before = fresh.to_params()
    assert not np.array_equal(before["layers"]["wq"]["kernel"], params["layers"]["wq"]["kernel"])
    nnx.update(fresh, params_to_state(params))
    assert_trees_equal(fresh.to_params(), params)
    assert_trees_equal(state_to_params(nnx.state(fresh, nnx.Param)), params)
    # per-layer layout in, the same model
    assert_trees_equal(PLDRLLM.from_params(CFG, pldr_jax.unstack_layers(params)).to_params(), params)


def test_rngs_initialisation_is_init_params():
    model = PLDRLLM(CFG, rngs=nnx.Rngs(params=7))
    want = pldr_jax.init_params(CFG, nnx.Rngs(params=7).params())
    assert_trees_equal(model.to_params(), want)


def test_constructor_errors():
    with pytest.raises(ValueError, match="exactly one of"):
        PLDRLLM(CFG)
    with pytest.raises(ValueError, match="layers"):
        PLDRLLM.from_params(CFG.replace(num_layers=3), fast_params(CFG))
    with pytest.raises(ValueError, match="logical axes"):
        PLDRLLM.from_params(CFG, pldr_jax.params.fuse_params(fast_params(CFG)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-g"])
def test_call_equals_forward(preset):
    """`model(tokens)` is `forward` on the model's (per-layer) params: the same numbers, bit for bit,
    within 1e-6 absolute of everything `forward` returns.  `forward` on the stacked layout (a
    `lax.scan` instead of the Python loop: XLA fuses the layer differently) agrees to float32
    rounding (~1e-6 relative), which is `forward` against itself, not the NNX model."""
    cfg = pldr_jax.PLDRConfig.preset(preset)
    params = fast_params(cfg, seed=2)
    model = PLDRLLM.from_params(cfg, params)
    tok = tokens(cfg=cfg)
    g_lm = None if cfg.learned_g else pldr_jax.random_normal_g(cfg, jax.random.key(0))
    for pad_aware_A in ((False,) if cfg.learned_g else (True,)):  # both paths, one compilation each
        got = model(tok, g_lm, pad_aware_A=pad_aware_A)
        want = pldr_jax.forward(cfg, pldr_jax.unstack_layers(params), tok, g_lm, pad_aware_A=pad_aware_A)
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-6, rtol=0)
        np.testing.assert_allclose(got.hidden, want.hidden, atol=1e-6, rtol=0)
        assert got.deductive.keys() == want.deductive.keys()
        for k in want.deductive:
            np.testing.assert_allclose(got.deductive[k], want.deductive[k], atol=1e-6, rtol=0)
        scanned = pldr_jax.forward(cfg, params, tok, g_lm, pad_aware_A=pad_aware_A)
        for a, b in [(got.logits, scanned.logits)] + [(got.deductive[k], scanned.deductive[k]) for k in want.deductive]:
            assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * max(1.0, float(np.abs(b).max()))


def test_nnx_optimizer_trains_like_train_step():
    """Four updates with `nnx.Optimizer` + the reference optimiser (clip, AdamW, warm-up + cosine)
    give `train_step`'s losses.  Both differentiate `loss_terms` (the NNX model through `model.loss`);
    the model's logits give the same loss through `masked_loss`."""
    cfg = CFG.replace(num_layers=1)
    params = fast_params(cfg, seed=4)
    rng = np.random.default_rng(5)
    batches = []
    for _ in range(2):
        t = rng.integers(1, cfg.vocab_size, (4, 9))
        t[0, -3:] = 0
        batches.append({"inputs": jnp.asarray(t[:, :-1], jnp.int32), "targets": jnp.asarray(t[:, 1:], jnp.int32)})
    batches = batches * 2  # batch 0 again at update 2: after two updates its loss went down
    hp = dict(learning_rate=3e-3, warmup_steps=1, total_steps=6, alpha=0.1)
    tx = make_optimizer(**hp)

    state = create_train_state(cfg, tx, 0, params=params)
    step = make_train_step(cfg, tx, lr_schedule(**hp), donate=False, compiler_options=FAST_COMPILE)
    want = []
    for b in batches:
        state, m = step(state, b)
        want.append(float(m["loss"]))

    model = PLDRLLM.from_params(cfg, params)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, nnx_state = nnx.split((model, optimizer))

    # NNX's functional form (split / merge) under jax.jit, to compile with the same XLA options
    # as the train step (`nnx.jit` takes none; with the default options on both sides the losses
    # agree the same way, XLA's optimisation level changes the gradients' rounding)
    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def nnx_step(nnx_state, inputs, targets):
        model, optimizer = nnx.merge(graphdef, nnx_state)
        loss, grads = nnx.value_and_grad(lambda m: m.loss(inputs, targets)[0])(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    b = batches[0]
    np.testing.assert_allclose(float(pldr_jax.masked_loss(model(b["inputs"]).logits, b["targets"])[0]),
                               float(model.loss(b["inputs"], b["targets"])[0]), rtol=1e-6)
    got = []
    for b in batches:
        loss, nnx_state = nnx_step(nnx_state, b["inputs"], b["targets"])
        got.append(float(loss))
    nnx.update((model, optimizer), nnx_state)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[2] < got[0]  # it trained
    assert int(optimizer.step[...]) == 4
    # the parameters moved the same way (relative to each tensor's movement)
    p0, pn, pt = leaves(params), leaves(model.to_params()), leaves(state.params)
    for k in p0:
        moved = np.abs(pt[k] - p0[k]).max()
        assert moved > 0, k
        assert np.abs(pn[k] - pt[k]).max() <= 1e-5 * moved, k
