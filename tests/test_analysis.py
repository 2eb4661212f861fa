"""Invariance analysis: metrics on constructed inputs with known answers, traces, tables, plots, CLI."""

from __future__ import annotations

import csv
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import PLDRConfig, forward
from pldr_jax.analysis import invariance as inv
from pldr_jax.analysis import report
from pldr_jax.losses import dag_loss
from .helpers import fast_params

TINY = PLDRConfig.preset("tiny")
TINY_G = PLDRConfig.preset("tiny-g")
T_STEPS = 4


@pytest.fixture(scope="module")
def model():
    return TINY, fast_params(TINY)


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def trace(model):
    cfg, p = model
    return inv.deductive_trace(cfg, p, PROMPTS, max_new_tokens=T_STEPS)


@pytest.fixture(scope="module")
def result(trace):
    return inv.analyze_trace(trace)


# --------------------------------------------------------------------------- metrics, known answers
def test_rmse_and_order_parameter_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(inv.rmse(a, a), 0.0)
    assert inv.rmse(np.zeros((4, 4)), np.full((4, 4), 2.0)) == pytest.approx(2.0)
    ref = np.full((4, 4), 2.0)
    signs = np.where(np.indices((4, 4)).sum(0) % 2 == 0, 1.0, -1.0)
    assert inv.order_parameter(ref + 0.2 * signs, ref) == pytest.approx(0.1)      # rmse 0.2 / |mean| 2
    assert inv.order_parameter(4.0 + signs) == pytest.approx(0.25)               # spread 1 / mean 4
    assert np.isinf(inv.order_parameter(signs))                                  # zero mean
    with pytest.raises(ValueError):
        inv.rmse(np.zeros((3, 3)), np.zeros((4, 4)))


def test_determinants_and_decimal_agreement():
    m = np.diag([2.0, 3.0, 0.5]).astype(np.float32)
    assert inv.determinant(m) == pytest.approx(3.0)
    s, l = inv.slogdet(-m)
    assert s == -1 and l == pytest.approx(np.log(3.0))
    x = np.random.default_rng(1).normal(size=(2, 4, 8, 8)).astype(np.float32)
    d = inv.determinant(x)
    np.testing.assert_array_equal(d, inv.determinant(x.copy()))                  # identical runs: equal
    np.testing.assert_array_equal(inv.matching_decimals(d, d), 15)
    assert inv.matching_decimals(1.0, 1.0 + 2e-9) == 8
    assert inv.matching_decimals(1.0, 2.0) == -1
    big = 10.0 * np.eye(400)                                                     # det 1e400: beyond float64
    s, l = inv.slogdet(big)
    assert s == 1 and l == pytest.approx(400 * np.log(10.0)) and np.isinf(inv.determinant(big))


def test_numerical_rank_known_ranks():
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=(8, 1)), rng.normal(size=(1, 8))
    assert inv.numerical_rank((u @ v).astype(np.float32)) == 1                   # a rank-1 G gives rank 1
    three = sum(rng.normal(size=(8, 1)) @ rng.normal(size=(1, 8)) for _ in range(3))
    assert inv.numerical_rank(three.astype(np.float32)) == 3
    stack = np.stack([np.eye(8), np.zeros((8, 8)), u @ v])
    np.testing.assert_array_equal(inv.numerical_rank(stack), [8, 0, 1])
    assert inv.numerical_rank(np.diag([1.0, 1e-3]), rtol=1e-2) == 1


def test_head_spread():
    one = np.random.default_rng(3).normal(size=(8, 8))
    same = np.broadcast_to(one, (2, 4, 8, 8))                                    # [layers, H, dk, dk]
    np.testing.assert_array_equal(inv.tensor_head_spread(same), 0.0)
    two = np.stack([np.zeros((8, 8)), np.full((8, 8), 2.0)])                     # heads 0 and 2: std 1
    assert inv.tensor_head_spread(two) == pytest.approx(1.0)
    assert inv.head_spread(np.array([[1.0, 3.0]])) == pytest.approx(1.0)


def test_dag_values_known_and_consistent_with_training_loss():
    assert inv.dag_values(np.zeros((8, 8))) == pytest.approx(0.0)               # tr(e^0) = dk
    assert inv.dag_values(np.eye(8)) == pytest.approx(1.0)                      # tr(e^I) = dk e
    x = 0.3 * np.random.default_rng(4).normal(size=(2, 1, 4, 8, 8)).astype(np.float32)
    per = inv.dag_values(x)
    assert per.shape == (2, 1, 4)
    assert float(np.mean(per)) == pytest.approx(float(dag_loss({"G_LM": jnp.asarray(x)})["G_LM"]), rel=1e-4)
    np.testing.assert_allclose(inv.dag_per_layer(x), per.reshape(2, -1).mean(1))
    big = np.full((2, 1, 4, 8, 8), 30.0)                                         # float32 expm overflows
    assert not np.isfinite(float(dag_loss({"A_P": jnp.asarray(big)})["A_P"]))
    # exact: M*M = 900 * ones -> eigenvalues 7200 and 0 -> tr e^S = e^7200 + 7 -> |7200 - log 8|
    np.testing.assert_allclose(inv.dag_values(big), 7200 - np.log(8.0), rtol=1e-12)


def test_compare_identical_runs():
    rng = np.random.default_rng(5)
    run = {k: rng.normal(size=(2, 1, 4, 8, 8)).astype(np.float32) for k in ("A_LM", "G_LM")}
    cmp = inv.compare_runs(run, {k: v.copy() for k, v in run.items()})
    for k in run:
        m = cmp[k]
        np.testing.assert_array_equal(m["rmse"], 0.0)
        np.testing.assert_array_equal(m["order_param"], 0.0)
        np.testing.assert_array_equal(m["det_ref"], m["det_other"])
        np.testing.assert_array_equal(m["det_decimals"], 15)
        np.testing.assert_array_equal(m["rank_ref"], 8)
        np.testing.assert_array_equal(m["dag_ref"], m["dag_other"])
    rows = report.comparison_rows(cmp)
    assert len(rows) == 2 * 2 * 1 * 4 and {"tensor", "layer", "row", "head", "rmse"} <= set(rows[0])


# --------------------------------------------------------------------------- traces
def test_trace_cached_vs_uncached(model, trace, result):
    cfg, p = model
    assert trace.generated.shape == (2, T_STEPS) and trace.steps == T_STEPS
    assert set(trace.cached) == set(trace.uncached) == {"A", "A_LM", "A_P", "G_LM"}
    assert trace.uncached["G_LM"].shape == (T_STEPS, 2, 2, 4, 8, 8)
    res = result
    for k, m in res.per_key.items():
        np.testing.assert_array_equal(m["rmse"][0], 0.0)                         # step 0: same pass
        np.testing.assert_array_equal(m["det_decimals"][0], 15)
        np.testing.assert_array_equal(m["drift_cached"], 0.0)                    # the cache is frozen
        assert m["rmse"].shape == (T_STEPS, 2, 2, 4)
    assert float(res.per_key["G_LM"]["rmse"][1:].max()) > 1e-3                 # A (and G) move without it
    np.testing.assert_array_equal(res.logits_max_abs_diff[0], 0.0)
    # the uncached step t equals a reference (unpadded, non-pad-aware) forward on that row's prefix
    row, t = 0, 2
    n = int(trace.prompt_lengths[row]) + t
    prefix = jnp.asarray(trace.tokens[row:row + 1, :n])
    ref = forward(cfg, p, prefix)
    np.testing.assert_allclose(trace.uncached["G_LM"][t][:, row], ref.deductive["G_LM"][:, 0], atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(trace.logits_uncached[t, row], ref.logits[0, -1], atol=1e-3)
    # the cached step t is a pass with the prompt's G, which fixed-G causality makes a prefix property
    g0 = jnp.asarray(trace.cached["G_LM"][0][:, row:row + 1])
    np.testing.assert_allclose(trace.logits_cached[t, row], forward(cfg, p, prefix, g0).logits[0, -1], atol=1e-4)
    # followed path: the cached mode's greedy tokens (pad id excluded)
    lg = trace.logits_cached[:, row].copy()
    lg[:, 0] = -np.inf
    np.testing.assert_array_equal(trace.generated[row], lg.argmax(-1))


def test_trace_is_invariant_for_a_fixed_g(model):
    """Known answer: with a predefined (identity) G nothing is recomputed, so the two modes agree exactly."""
    _, p = model
    cfg_g = TINY_G
    p_g = {**p, "layers": {k: v for k, v in p["layers"].items() if k not in ("metric_norm", "metric_res", "plga")}}
    tr = inv.deductive_trace(cfg_g, p_g, [[5, 6, 7]], max_new_tokens=3)
    assert set(tr.cached) == {"G_LM"}
    res = inv.analyze_trace(tr)
    m = res.per_key["G_LM"]
    np.testing.assert_array_equal(m["rmse"], 0.0)
    np.testing.assert_array_equal(m["det_decimals"], 15)
    np.testing.assert_array_equal(m["rank_ref"], 8)
    np.testing.assert_allclose(res.logits_max_abs_diff, 0.0, atol=1e-5)


def test_trace_follows_given_tokens_and_validates(model):
    cfg, p = model
    gen = [[9, 10, 11, 12], [20, 21, 22, 23]]
    tr = inv.deductive_trace(cfg, p, PROMPTS, max_new_tokens=T_STEPS, generated=gen, keys=("G_LM",))
    assert tr.follow == "given" and tr.generated.tolist() == gen and set(tr.uncached) == {"G_LM"}
    assert tr.tokens[0, :7].tolist() == [5, 6, 7, 9, 10, 11, 12]
    for bad, match in [(dict(generated=[[0, 3]]), "pad id"), (dict(generated=[[1]]), "generated must be"),
                       (dict(follow="x"), "follow")]:
        with pytest.raises(ValueError, match=match):
            inv.deductive_trace(cfg, p, [5, 6, 7], max_new_tokens=2, **bad)
    with pytest.raises(ValueError, match="max_seq_len"):
        inv.deductive_trace(cfg, p, [5, 6, 7], max_new_tokens=cfg.max_seq_len)
    with pytest.raises(ValueError, match="pad id 0"):
        inv.pad_prompts([[5, 0, 6]])


# --------------------------------------------------------------------------- tables and plots
def test_report_tables(result):
    res = result
    rows = report.trace_rows(res)
    assert len(rows) == 4 * T_STEPS * 2 * 2 * 4                                  # tensors*steps*layers*rows*heads
    text = report.to_csv(rows)
    back = list(csv.DictReader(io.StringIO(text)))
    assert len(back) == len(rows)
    for r, b in zip(rows[:50], back[:50]):                                       # floats round-trip exactly
        assert float(b["det_cached"]) == r["det_cached"] and int(b["det_decimals"]) == r["det_decimals"]
    summ = report.summary_rows(res)
    assert len(summ) == 4 * 2 and summ[0]["tensor"] == "A"
    assert all(r["max_rmse"] >= 0 for r in summ)
    md = report.to_markdown(summ, formats={"max_rmse": ".15e"})
    lines = md.strip().splitlines()
    assert lines[0].startswith("| tensor | layer |") and len(lines) == 2 + len(summ)


def test_plots(trace, result, tmp_path):
    from matplotlib.figure import Figure

    from pldr_jax.analysis.plots import heatmap_grid, plot_deductive_heatmaps, plot_drift
    fig = heatmap_grid(trace.cached["G_LM"][0][:, 0], title="G", path=tmp_path / "g.png", shared_scale=True)
    assert isinstance(fig, Figure) and (tmp_path / "g.png").stat().st_size > 1000
    assert len([a for a in fig.axes if a.images]) == 2 * 4                      # layers x heads panels
    figs = plot_deductive_heatmaps({k: v[0] for k, v in trace.cached.items()}, tmp_path, keys=("A_LM",))
    assert set(figs) == {"A_LM"} and (tmp_path / "A_LM.png").exists()
    drift = result.per_key["G_LM"]["drift_uncached"]
    fig = plot_drift(drift, tmp_path / "drift.png")
    assert len(fig.axes[0].lines) == 2 and (tmp_path / "drift.png").stat().st_size > 1000


def test_cli_analyze(model, tmp_path, monkeypatch):
    import pldr_jax.g_sources as gs
    from pldr_jax.cli import build_parser

    cfg, p = model
    monkeypatch.setattr(gs, "load_model_spec", lambda spec, config=None: (cfg, p, None))
    args = build_parser().parse_args(["analyze", "ckpt", "--prompt-ids", "5,6,7", "--prompt-ids", "8 9 10 11 12",
                                      "--max-new-tokens", str(T_STEPS), "--out", str(tmp_path), "--no-plots"])
    assert args.func(args) == 0
    for name in ("trace.csv", "summary.csv", "summary.md", "steps.csv", "metrics.npz", "generated.json"):
        assert (tmp_path / name).stat().st_size > 0
    z = np.load(tmp_path / "metrics.npz")
    assert z["G_LM/rmse"].shape == (T_STEPS, 2, 2, 4)
    args = build_parser().parse_args(["analyze", "ckpt", "--prompt", "hi"])
    with pytest.raises(ValueError, match="--tokenizer"):
        args.func(args)


def test_trace_reproduces_the_reference_generations(tiny_v510, ref):
    """Golden: the reference's KV+G-cache and no-cache greedy generations (20 steps), their per-step
    logits and G_LM, reproduced by the traces that follow the cached and the uncached mode."""
    cfg, p = tiny_v510
    z = np.load(ref / "tiny_v510_generate.npz")
    prompt = z["prompt_ids"].tolist()
    g_ref = {m: np.stack([z[f"{m}_layer{i}_step_G_LM"] for i in range(cfg.num_layers)], 1) for m in ("kvT_gT", "kvF_gF")}
    cached = inv.deductive_trace(cfg, p, [prompt], max_new_tokens=20, follow="cached", keys=("G_LM",))
    assert cached.generated[0].tolist() == z["kvT_gT_ids"].tolist()
    np.testing.assert_allclose(cached.logits_cached[:, 0], z["kvT_gT_step_logits"], atol=2e-5)
    np.testing.assert_allclose(cached.cached["G_LM"], g_ref["kvT_gT"], atol=2e-5)
    unc = inv.deductive_trace(cfg, p, [prompt], max_new_tokens=20, follow="uncached", keys=("G_LM",))
    assert unc.generated[0].tolist() == z["kvF_gF_ids"].tolist()
    np.testing.assert_allclose(unc.logits_uncached[:, 0], z["kvF_gF_step_logits"], atol=1e-4)
    np.testing.assert_allclose(unc.uncached["G_LM"], g_ref["kvF_gF"], atol=2e-3, rtol=0)  # float32 noise, see README
    drift = inv.analyze_trace(unc).per_key["G_LM"]["drift_uncached"]
    assert drift[0].max() == 0 and drift[1:].max() > 0.1                        # G_LM moves without the cache
