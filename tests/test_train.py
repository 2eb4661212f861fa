"""Training step and optimiser against the reference recipe.

* The learning-rate schedule equals the reference's `LinearWarmupCosineLRSchedule` (LambdaLR)
  formula, re-implemented here in float64 (float32-rounding tolerance).
* `make_optimizer` equals torch's AdamW algorithm (written out in numpy below) after
  `clip_grad_value_(1.0)`, on a random tree, over several steps.
* Golden 3-step trajectory from ../shared/reference/tiny_v510_train.npz (the reference's loss and
  float32 gradients at the reference weights on a 2 x 11 batch).  Because the reference's first
  learning rate is 0, the parameters after update 0 equal the initial ones, so updates 0 and 1
  both use the *golden* loss and gradients; the expected parameters after them come from the
  numpy AdamW below.  Update 2 starts from those (numpy) parameters; its gradient is the model's
  own (validated against the golden one at update 0).  Bounds: loss within 1e-3 relative; the
  parameters' movement from the start (p_k - p_0) within 5e-3 of the reference movement's norm
  (2e-2 per tensor); the learning rate to float32 rounding.
* Gradient accumulation equals the full batch; the DAG option, bfloat16 compute and
  predefined-G training behave as specified.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pldr_jax
from pldr_jax.io.state_dict import state_dict_to_params
from pldr_jax.train import (StepOptions, create_train_state, lr_schedule, make_optimizer, make_train_step)
from pldr_jax.train.loop import TrainConfig

from .conftest import ref_path

B1, B2, EPS, WD, CLIP = 0.9, 0.95, 1e-5, 0.1, 1.0
# Steps and helpers compile with LLVM's optimisations off (about 3x faster to compile; the same
# HLO program, so the same numbers up to float rounding).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def ref_factor(step, warmup, total, alpha):
    """The reference's LambdaLR factor (LinearWarmupCosineLRSchedule), float64."""
    step = min(float(step), float(total))
    if step <= warmup:
        return step / warmup
    return (1 - alpha) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) + alpha


class TorchAdamW:
    """torch.optim.AdamW (amsgrad=False, maximize=False) after clip_grad_value_, in numpy float64."""

    def __init__(self, params, clip=CLIP):
        self.m = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
        self.v = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
        self.t = 0
        self.clip = clip

    def step(self, params, grads, lr):
        self.t += 1
        out = {}
        for k, p in params.items():
            g = np.asarray(grads[k], np.float64)
            if self.clip is not None:
                g = np.clip(g, -self.clip, self.clip)
            p = np.asarray(p, np.float64) * (1 - lr * WD)
            self.m[k] = B1 * self.m[k] + (1 - B1) * g
            self.v[k] = B2 * self.v[k] + (1 - B2) * g * g
            bc1, bc2 = 1 - B1 ** self.t, 1 - B2 ** self.t
            denom = np.sqrt(self.v[k]) / math.sqrt(bc2) + EPS
            out[k] = p - (lr / bc1) * self.m[k] / denom
        return out


def flat(tree):
    return {jax.tree_util.keystr(kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_tree_close(got, want, rel, what=""):
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for k in want:
        bound = rel * max(float(np.abs(want[k]).max()), 1e-12)
        err = float(np.abs(got[k].astype(np.float64) - want[k]).max())
        assert err <= bound, f"{what}{k}: max abs err {err:.3g} > {bound:.3g}"


def micro_cfg(**kw):
    """A very small learned-G model (fast to compile)."""
    base = dict(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=64, max_seq_len=32, A_dff=8,
                num_reslayerA=1, num_denseA=1)
    base.update(kw)
    return pldr_jax.PLDRConfig(**base)


def micro_batch(B=4, L=12, V=64, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, V, (B, L + 1)).astype(np.int32)
    toks[1, -3:] = 0  # uneven padding across rows
    toks[3, -7:] = 0
    return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}


# --------------------------------------------------------------------------- schedule / optimiser
@pytest.mark.parametrize("warmup,total,alpha", [(2, 10, 0.1), (2000, 250_000, 0.1), (5, 7, 0.0), (3, 3, 0.5)])
def test_lr_schedule_is_the_reference_formula(warmup, total, alpha):
    peak = 1e-3
    sched = lr_schedule(peak, warmup, total, alpha)
    steps = sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total, total + 5, 2 * total})
    for s in (s for s in steps if s >= 0):
        want = peak * ref_factor(s, warmup, total, alpha)
        got = float(sched(jnp.int32(s)))
        assert got == pytest.approx(want, rel=2e-6, abs=1e-12), (s, got, want)
    assert float(sched(0)) == 0.0  # the reference's first update has learning rate 0


@pytest.mark.parametrize("warmup,total,alpha", [(2, 10, 0.1), (2000, 250_000, 0.1), (0, 50, 0.2), (5, 7, 0.0)])
def test_lr_schedule_is_optax_warmup_cosine(warmup, total, alpha):
    """Our schedule is optax's warm-up + cosine (to 1e-7 x lr: optax's warm-up form loses relative
    precision at small counts, not the value) and at every count within float32 rounding of the
    reference (previous test); counts past a boundary included."""
    import optax
    peak = 1e-3
    ours = lr_schedule(peak, warmup, total, alpha)
    theirs = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=alpha * peak)
    counts = jnp.asarray(sorted({0, 1, 2, 3, max(warmup - 1, 0), warmup, warmup + 1, total // 3, total - 1,
                                 total, total + 1, 3 * total}), jnp.int32)
    np.testing.assert_allclose(np.asarray(jax.vmap(ours)(counts)), np.asarray(jax.vmap(theirs)(counts)),
                               rtol=0, atol=1e-7 * peak)
    for c in np.asarray(counts):
        assert float(ours(jnp.int32(c))) == pytest.approx(peak * ref_factor(c, warmup, total, alpha) if warmup
                                                          else peak * ((1 - alpha) * 0.5 * (1 + math.cos(
                                                              math.pi * min(c, total) / total)) + alpha),
                                                          rel=2e-6, abs=1e-12), c


def test_logged_lr_is_the_applied_lr_after_a_skipped_step():
    """A non-finite step advances `state.step` but not optax's count: the next update applies
    schedule(count), and that is the lr the step logs (not schedule(state.step))."""
    from pldr_jax.train.optimizer import schedule_count
    cfg = pldr_jax.PLDRConfig.preset("tiny-g", num_layers=1)
    hp = dict(learning_rate=1e-2, warmup_steps=4, total_steps=10, alpha=0.1)
    tx, sched = make_optimizer(**hp), lr_schedule(**hp)
    step = make_train_step(cfg, tx, sched, donate=False, compiler_options=FAST_COMPILE)
    batch = micro_batch(V=cfg.vocab_size)
    g = pldr_jax.random_normal_g(cfg, jax.random.key(1))
    g_nan = g.at[0, 0, 0, 0].set(jnp.nan)  # a NaN in the (constant) G_LM: non-finite loss
    s0 = create_train_state(cfg, tx, 0)

    a, ma1 = step(s0, batch, g)
    a, ma2 = step(a, batch, g_nan)
    a, ma3 = step(a, batch, g)
    b, mb1 = step(s0, batch, g)
    b, mb2 = step(b, batch, g)
    assert [float(m["nonfinite"]) for m in (ma1, ma2, ma3)] == [0.0, 1.0, 0.0]
    assert int(a.step) == 3 and int(schedule_count(a.opt_state)) == 2 == int(schedule_count(b.opt_state))
    # the run with the skipped step applied exactly the updates of the run without it ...
    for x, y in zip(jax.tree_util.tree_leaves((a.params, a.opt_state)), jax.tree_util.tree_leaves((b.params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # ... so its third step applied schedule(1), and logs it
    assert float(ma3["lr"]) == float(mb2["lr"]) == pytest.approx(hp["learning_rate"] * 1 / 4, rel=1e-6)
    assert float(ma3["lr"]) != float(sched(2))
    assert schedule_count(optax.sgd(0.1).init({"w": jnp.zeros(2)}), "none") == "none"


def test_make_optimizer_equals_torch_adamw_with_value_clipping():
    rng = np.random.default_rng(1)
    params = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    tx = make_optimizer(learning_rate=2e-2, warmup_steps=2, total_steps=6, alpha=0.1, weight_decay=WD,
                        clip_value=CLIP)
    state = tx.init(jax.tree_util.tree_map(jnp.asarray, params))
    ref = TorchAdamW(params)
    p_jax, p_ref = jax.tree_util.tree_map(jnp.asarray, params), dict(params)
    for k in range(6):
        grads = {n: (3.0 * rng.normal(size=v.shape)).astype(np.float32) for n, v in params.items()}  # some > 1
        upd, state = tx.update(jax.tree_util.tree_map(jnp.asarray, grads), state, p_jax)
        import optax
        p_jax = optax.apply_updates(p_jax, upd)
        p_ref = ref.step(p_ref, grads, 2e-2 * ref_factor(k, 2, 6, 0.1))
        for n in params:
            np.testing.assert_allclose(np.asarray(p_jax[n]), p_ref[n], rtol=2e-6, atol=2e-7)
    # the first update had lr 0: nothing moved then (checked implicitly above); global-norm clip option
    tx2 = make_optimizer(1e-3, 0, 10, clip_value=None, clip_norm=1.0)
    upd, _ = tx2.update({"a": jnp.full((4,), 10.0)}, tx2.init({"a": jnp.zeros(4)}), {"a": jnp.zeros(4)})
    assert np.all(np.isfinite(np.asarray(upd["a"])))


@pytest.mark.parametrize("kw", [dict(learning_rate=-1.0), dict(warmup_steps=11, total_steps=10),
                                dict(alpha=1.5), dict(clip_value=0.0), dict(weight_decay=-0.1),
                                dict(total_steps=0)])
def test_make_optimizer_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        make_optimizer(**kw)


# --------------------------------------------------------------------------- golden trajectory
def test_golden_three_step_trajectory(tiny_v510):
    """Three reference-recipe updates from the reference weights on the golden batch.

    The expected trajectory `ref` is numpy torch-AdamW driven by the reference's golden loss and
    gradients for updates 0 and 1 (the parameters are still the reference weights then: lr_0 = 0)
    and by the model's gradient at the `ref` parameters for update 2.  The parameters' movement
    from the start, p_k - p_0, must match the reference's: within 5e-3 of its norm over the whole
    model and 2e-2 of its norm per tensor (measured: 4e-4 / 1.7e-3 globally after updates 1 / 2,
    per tensor at most 8.7e-3).  Why not tighter: Adam's first updates are ~lr x sign(grad), so
    gradient elements near zero, whose sign the model and the reference (agreeing to ~2e-4 x
    max|grad|) may round differently, move by +-lr in opposite directions.  (The optimiser alone is
    checked exactly against torch's AdamW in
    `test_make_optimizer_equals_torch_adamw_with_value_clipping`.)
    """
    cfg, params0 = tiny_v510
    t = np.load(ref_path("tiny_v510_train.npz"))
    batch = {"inputs": jnp.asarray(t["tar_inp"], jnp.int32), "targets": jnp.asarray(t["tar_real"], jnp.int32)}
    golden_loss = float(t["loss"])
    golden_grads = flat(state_dict_to_params(cfg, {k[len("grad/"):]: t[k] for k in t.files
                                                   if k.startswith("grad/")}))
    peak, warmup, total, alpha = 1e-3, 2, 10, 0.1

    tx = make_optimizer(peak, warmup, total, alpha, WD, CLIP)
    state = create_train_state(cfg, tx, 0, params=jax.tree_util.tree_map(jnp.asarray, params0))
    step = make_train_step(cfg, tx, lr_schedule(peak, warmup, total, alpha), donate=False,
                           compiler_options=FAST_COMPILE)

    treedef = jax.tree_util.tree_structure(params0)
    keys = list(flat(params0).keys())
    unflat = lambda d: jax.tree_util.tree_unflatten(treedef, [jnp.asarray(d[k], jnp.float32) for k in keys])

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def loss_and_grads(p):
        def f(p):
            return pldr_jax.masked_loss(pldr_jax.forward(cfg, p, batch["inputs"]).logits, batch["targets"])[0]
        return jax.value_and_grad(f)(p)

    p0 = flat(params0)
    ref = dict(p0)
    ref_opt = TorchAdamW(p0)
    for k in range(3):
        lr_want = peak * ref_factor(k, warmup, total, alpha)
        if k < 2:  # parameters are still the reference weights: the golden loss and gradients
            loss_ref, grads_ref = golden_loss, golden_grads
        else:
            lr_, gr_ = loss_and_grads(unflat(ref))
            loss_ref, grads_ref = float(lr_), flat(gr_)
        loss_here = float(loss_and_grads(state.params)[0])  # the model's loss at the step's input
        state, m = step(state, batch)

        assert float(m["lr"]) == pytest.approx(lr_want, rel=1e-6, abs=0.0), k  # float32 rounding
        assert float(m["loss"]) == pytest.approx(loss_ref, rel=1e-3), k
        assert float(m["loss"]) == pytest.approx(loss_here, rel=1e-5), k
        assert float(m["tokens"]) == float((t["tar_real"] != 0).sum())
        if k < 2:
            assert float(m["accuracy"]) == float(t["accuracy"])

        ref = ref_opt.step(ref, grads_ref, lr_want)
        got = {n: np.asarray(v, np.float64) for n, v in flat(state.params).items()}
        if k > 0:
            # the reference trajectory, by movement from the start: d = p_k - p_0 (the parameters
            # themselves are ~1000x larger than 3 updates of lr 1e-3 and would hide any error)
            d_got = {n: got[n] - p0[n] for n in keys}
            d_ref = {n: ref[n] - p0[n] for n in keys}
            num = sum(float(np.sum((d_got[n] - d_ref[n]) ** 2)) for n in keys)
            den = sum(float(np.sum(d_ref[n] ** 2)) for n in keys)
            assert math.sqrt(num / den) <= 5e-3, (k, math.sqrt(num / den))
            for n in keys:
                err = float(np.linalg.norm(d_got[n] - d_ref[n]))
                moved = float(np.linalg.norm(d_ref[n]))
                assert moved > 0 and err <= 2e-2 * moved, (k, n, err, moved)
        if k == 0:  # lr 0: nothing moved
            assert all(np.array_equal(got[n], p0[n]) for n in keys)
    assert int(state.step) == 3
    # after two real updates the loss went down from the reference's 4.690829
    assert float(loss_and_grads(state.params)[0]) < golden_loss


# --------------------------------------------------------------------------- step options
@pytest.fixture(scope="module")
def micro():
    """A small learned-G config, its optimiser, a padded batch and the compiled float32 SGD step
    (SGD: parameter changes are lr x gradient, so gradients are compared without Adam's
    normalisation amplifying rounding noise)."""
    import optax
    cfg = micro_cfg()
    sgd = optax.sgd(0.1)
    step = make_train_step(cfg, sgd, donate=False, compiler_options=FAST_COMPILE)
    return dict(cfg=cfg, sgd=sgd, step=step, batch=micro_batch())


def _sgd_two_steps(step, cfg, tx, batch, seed=3):
    state = create_train_state(cfg, tx, seed)
    p0 = flat(state.params)
    losses = []
    for _ in range(2):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return losses, {k: np.asarray(v, np.float64) - p0[k] for k, v in flat(state.params).items()}, m


def test_grad_accumulation_equals_full_batch(micro):
    cfg, sgd, batch = micro["cfg"], micro["sgd"], micro["batch"]
    l1, d1, m1 = _sgd_two_steps(micro["step"], cfg, sgd, batch)
    step2 = make_train_step(cfg, sgd, opts=StepOptions(grad_accum=2), donate=False, compiler_options=FAST_COMPILE)
    l2, d2, m2 = _sgd_two_steps(step2, cfg, sgd, batch)
    np.testing.assert_allclose(l2, l1, rtol=2e-6)
    assert float(m2["tokens"]) == float(m1["tokens"]) == float(np.sum(np.asarray(batch["targets"]) != 0))
    assert float(m2["accuracy"]) == pytest.approx(float(m1["accuracy"]), abs=1e-6)
    for k in d1:  # parameter change = -lr x (sum of) gradients: the accumulated gradient is the full one
        assert float(np.abs(d2[k] - d1[k]).max()) <= 1e-3 * float(np.abs(d1[k]).max()) + 1e-8, k
    with pytest.raises(ValueError):
        StepOptions(grad_accum=0)


def test_dag_regularised_step_matches_direct_formula(micro):
    cfg, sgd, batch = micro["cfg"], micro["sgd"], micro["batch"]
    coeffs = (0.05, 0.02, 0.01)
    state = create_train_state(cfg, sgd, 6)  # a seed whose DAG values are finite (reference oddity 5)
    p0 = state.params
    step = make_train_step(cfg, sgd, opts=StepOptions(dag_coeffs=coeffs), donate=False, compiler_options=FAST_COMPILE)
    state, m = step(state, batch)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def direct(p):
        def objective(p):
            out = pldr_jax.forward(cfg, p, batch["inputs"])
            ce = pldr_jax.masked_loss(out.logits, batch["targets"])[0]
            return ce + pldr_jax.dag_total(out.deductive, coeffs), (ce, pldr_jax.dag_loss(out.deductive))
        return jax.value_and_grad(objective, has_aux=True)(p)

    (total, (ce, dags)), grads = direct(p0)
    assert np.isfinite(float(total))
    assert float(m["loss"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(m["total_loss"]) == pytest.approx(float(total), rel=1e-5)
    for name, key in (("dag_A", "A_LM"), ("dag_P", "A_P"), ("dag_G", "G_LM")):
        assert float(m[name]) == pytest.approx(float(dags[key]), rel=1e-5)
    got, want, before = flat(state.params), flat(grads), flat(p0)
    for k in got:  # SGD(0.1): p1 = p0 - 0.1 * grad of (CE + DAG terms)
        upd = np.asarray(got[k], np.float64) - before[k]
        assert float(np.abs(upd + 0.1 * want[k]).max()) <= 1e-3 * float(np.abs(want[k]).max()) * 0.1 + 1e-8, k


def test_bfloat16_compute_keeps_float32_master_weights(micro):
    cfg, batch = micro["cfg"], micro["batch"]
    tx = make_optimizer(1e-2, 0, 10, 0.1)
    s32 = create_train_state(cfg, micro["sgd"], 7)
    _, m32 = micro["step"](s32, batch)
    c16 = cfg.replace(dtype="bfloat16")
    s16 = create_train_state(c16, tx, 7)
    s16, m16 = make_train_step(c16, tx, donate=False, compiler_options=FAST_COMPILE)(s16, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s16.opt_state)
               if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.05  # same initial weights, bf16 matmuls
    assert np.isfinite(float(m16["grad_norm"]))


def test_unrolled_and_scanned_layers_agree(micro):
    """StepOptions.unroll_layers (Python loop over layer slices, the default) and the lax.scan form
    are the same computation: equal losses, accuracy and parameters after two SGD steps."""
    cfg, sgd = micro["cfg"].replace(num_layers=2), micro["sgd"]
    batch = micro_batch(seed=3)
    runs = []
    for unroll in (True, False):
        step = make_train_step(cfg, sgd, opts=StepOptions(unroll_layers=unroll), donate=False,
                               compiler_options=FAST_COMPILE)
        runs.append(_sgd_two_steps(step, cfg, sgd, batch))
    (l1, d1, m1), (l2, d2, m2) = runs
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    assert float(m1["accuracy"]) == float(m2["accuracy"])
    for k in d1:
        assert float(np.abs(d1[k] - d2[k]).max()) <= 1e-4 * float(np.abs(d1[k]).max()) + 1e-8, k


def test_step_accuracy_is_argmax_accuracy(micro):
    """The step's accuracy (from the fused head + loss) equals `masked_loss`'s argmax accuracy."""
    cfg, batch = micro["cfg"], micro["batch"]
    state = create_train_state(cfg, micro["sgd"], 11)
    out = pldr_jax.forward(cfg, state.params, batch["inputs"])
    loss, acc = pldr_jax.masked_loss(out.logits, batch["targets"])
    _, m = micro["step"](state, batch)
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(m["accuracy"]) == pytest.approx(float(acc), abs=1e-6)


def test_predefined_g_training():
    """v510G ablations: the same compiled step trains with an identity and a random-normal G."""
    from pldr_jax.g_sources import make_g
    cfg = micro_cfg(custom_G_type="external", A_dff=0, num_reslayerA=0, num_denseA=0)
    tx = make_optimizer(3e-2, 0, 20, 0.1)
    step = make_train_step(cfg, tx, compiler_options=FAST_COMPILE)
    batch = micro_batch(seed=4)
    for spec in ("identity", "random_normal:0.05"):
        g = make_g(cfg, spec, jax.random.key(0))
        g_before = np.asarray(g).copy()
        state = create_train_state(cfg, tx, 0)
        assert "plga" not in state.params["layers"] and "metric_res" not in state.params["layers"]
        losses = []
        for _ in range(4):
            state, m = step(state, batch, g)
            losses.append(float(m["loss"]))
        assert losses[-1] < losses[0], spec
        np.testing.assert_array_equal(np.asarray(g), g_before)  # G is a constant, not trained
    with pytest.raises(ValueError, match="learned-G"):
        make_train_step(cfg, tx, opts=StepOptions(dag_coeffs=(0.1, 0, 0)))


@pytest.mark.parametrize("kw", [dict(steps=0), dict(batch_size=6, grad_accum=4), dict(warmup_steps=50, steps=10),
                                dict(dtype="float16"), dict(dag_coeffs=(-1.0, 0, 0)), dict(mesh=(1, 1))])
def test_train_config_validation(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


def test_cli_resolves_presets_recipes_and_overrides(capsys):
    import json
    from pldr_jax.cli import main
    from pldr_jax.train.cli import MAIN_JOB_MODEL, MAIN_JOB_RECIPE
    assert main(["train", "--preset", "v51-110m", "--set", "num_layers=2", "--mesh=-1,4,1", "--dag", "0.1,0,0",
                 "--workdir", "x", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    m, t = out["model"], out["train"]
    assert out["recipe"] == "paper" and m["num_layers"] == 2 and m["d_model"] == 896
    assert (t["learning_rate"], t["warmup_steps"], t["total_steps"], t["alpha"], t["weight_decay"], t["clip_value"],
            t["batch_size"], t["seq_len"]) == (1e-3, 2000, 250_000, 0.1, 0.1, 1.0, 32, 1024)
    assert t["mesh"] == [-1, 4, 1] and t["dag_coeffs"] == [0.1, 0.0, 0.0] and t["unroll_layers"] is None
    assert main(["train", "--preset", "v51-dag-110m", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"] == "paper-dag" and out["train"]["dag_coeffs"] == [0.05, 0.05, 0.05]
    assert main(["train", "--preset", "tiny", "--no-clip-value", "--clip-norm", "1", "--steps", "20",
                 "--dtype", "bfloat16", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["clip_value"] is None and out["train"]["clip_norm"] == 1.0 and out["model"]["dtype"] == "bfloat16"
    assert out["train"]["warmup_steps"] <= 20
    assert main(["train", "--preset", "tiny", "--no-unroll-layers", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["unroll_layers"] is False
    assert TrainConfig(unroll_layers=False).step_options().unroll_layers is False
    assert TrainConfig().step_options().unroll_layers is None      # the platform's default
    assert TrainConfig().step_options().resolved("cpu").unroll_layers is True
    assert TrainConfig().step_options().resolved("tpu").unroll_layers is False
    assert main(["train", "--main-job", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out["model"][k] for k in MAIN_JOB_MODEL} == MAIN_JOB_MODEL
    assert out["train"]["steps"] == MAIN_JOB_RECIPE["steps"] and out["train"]["overwrite"]
    assert main(["train", "--preset", "tiny", "--set", "nonsense", "--print-config"]) == 2
    assert main(["train", "--preset", "tiny", "--set", "num_heads=3", "--print-config"]) == 2
