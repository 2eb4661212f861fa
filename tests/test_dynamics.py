"""Training dynamics of the deductive outputs on a probe batch (`pldr_jax.analysis.dynamics`)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import pldr_jax
from pldr_jax.analysis.dynamics import DynamicsProbe, plot_dynamics, probe_tokens
from pldr_jax.analysis.invariance import compare_runs
from pldr_jax.model import forward


def _cfg():
    return pldr_jax.PLDRConfig(num_layers=2, d_model=32, num_heads=4, dff=48, vocab_size=64, max_seq_len=32,
                               A_dff=8, num_reslayerA=1, num_denseA=1)


def test_probe_matches_separate_forward_passes_and_tracks_drift(tmp_path):
    cfg = _cfg()
    params = pldr_jax.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = probe_tokens(rng.integers(1, 64, (5, 20)), rows=3, prompt_len=8, extra=8)
    assert tokens.shape == (3, 16)
    probe = DynamicsProbe(cfg, tokens, prompt_len=8)
    rec = probe(params, 10)
    assert rec["kind"] == "dynamics" and rec["step"] == 10 and math.isnan(rec["g_drift"])

    # the same numbers as running the prompt alone and the longer rows alone, through the analysis module
    cached = forward(cfg, params, np.where(np.arange(16) < 8, tokens, 0), None, pad_aware_A=True).deductive["G_LM"]
    full = forward(cfg, params, tokens, None, pad_aware_A=True).deductive["G_LM"]
    ref = compare_runs({"G_LM": np.asarray(cached)}, {"G_LM": np.asarray(full)}, ["G_LM"])["G_LM"]
    assert rec["order_parameter"] == pytest.approx(float(np.median(ref["order_param"])), rel=1e-4)
    assert rec["order_parameter_mean"] == pytest.approx(float(np.mean(ref["order_param"])), rel=1e-4)
    assert rec["det_decimals_min"] == int(np.min(ref["det_decimals"]))
    from pldr_jax.analysis.invariance import matching_decimals
    assert rec["logdet_decimals_min"] == int(np.min(matching_decimals(ref["logdet_ref"], ref["logdet_other"])))
    assert rec["logdet_decimals_min"] < 15 and rec["logdet"] == pytest.approx(float(np.mean(ref["logdet_ref"])))
    assert 0 < rec["order_parameter"] <= rec["order_parameter_max"]  # more text moves an untrained G_LM

    assert probe(params, 20)["g_drift"] == 0.0  # same parameters: no drift
    moved = jax.tree.map(lambda p: p * 1.01, params)
    r3 = probe(moved, 30)
    assert r3["g_drift"] > 0

    out = plot_dynamics([{"kind": "train", "step": s, "loss": 4.0 - s / 10} for s in (10, 20, 30)] + [rec, r3],
                        tmp_path / "dyn.png")
    assert out is not None and out.stat().st_size > 1000
    assert plot_dynamics([{"kind": "train", "step": 1, "loss": 1.0}], tmp_path / "none.png") is None


def test_probe_refuses_bad_inputs():
    cfg = _cfg()
    with pytest.raises(ValueError, match="padding"):
        probe_tokens(np.zeros((4, 16), np.int32), rows=2, prompt_len=8, extra=8)
    with pytest.raises(ValueError, match="at least"):
        probe_tokens(np.ones((1, 16), np.int32), rows=2, prompt_len=8, extra=8)
    with pytest.raises(ValueError, match="learned-G"):
        DynamicsProbe(cfg.replace(custom_G_type="identity"), np.ones((2, 16), np.int32), 8)
