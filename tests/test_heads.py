"""Task heads (pldr_jax.heads, nnx_heads, io.hf heads) against the authors' Hugging Face port.

Golden folders in tests/data/hf_heads/ were written by the port itself (`make_golden.py` there);
each NAME_outputs.npz holds the port's last hidden state, logits and loss.  Against the port run in
float64, its own float32 hidden states differ by up to 1e-4 here and ours (float32) by up to 2e-4, so
the full chain (tokens -> our decoder -> head) is compared at 3e-4 (tests/test_io.py's HF golden:
2e-4) and the head alone (their hidden state -> our head and loss) at 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import PLDRConfig, init_params
from pldr_jax.heads import (HeadConfig, apply_head, head_logits, head_loss, init_head, labels_to_numpy,
                            last_token_index)
from pldr_jax.io.hf import hf_head_config, load_hf, load_hf_head, read_hf_state_dict, save_hf

GOLD = Path(__file__).parent / "data" / "hf_heads"
FULL_TOL = 3e-4
CASES = ["seqcls_single", "seqcls_multi", "seqcls_regression", "tokencls", "qa"]
ARCH = {"seqcls_single": "PldrllmForSequenceClassification", "seqcls_multi": "PldrllmForSequenceClassification",
        "seqcls_regression": "PldrllmForSequenceClassification", "tokencls": "PldrllmForTokenClassification",
        "qa": "PldrllmForQuestionAnswering"}


def _ref(name):
    return np.load(GOLD / f"{name}_outputs.npz")


def _logits(hcfg, out):
    return np.stack([np.asarray(out[0]), np.asarray(out[1])]) if hcfg.task == "qa" else np.asarray(out)


def _ref_logits(hcfg, ref):
    return np.stack([ref["start_logits"], ref["end_logits"]]) if hcfg.task == "qa" else ref["logits"]


def _labels(hcfg, ref):
    if hcfg.task == "qa":
        return labels_to_numpy(hcfg, (ref["start_positions"], ref["end_positions"]))
    return labels_to_numpy(hcfg, ref["labels"])


@pytest.mark.parametrize("name", CASES)
def test_golden_heads(name):
    cfg, params, g, hcfg, head = load_hf_head(GOLD / name)
    ref = _ref(name)
    assert g is None and "final" not in params and hcfg.architecture == ARCH[name]
    # the head alone on the port's hidden state: logits and Hugging Face's loss
    out = apply_head(hcfg, head, jnp.asarray(ref["last_hidden"]), jnp.asarray(ref["input_ids"]))
    np.testing.assert_allclose(_logits(hcfg, out), _ref_logits(hcfg, ref), atol=1e-5, rtol=0)
    loss, _ = head_loss(hcfg, out, _labels(hcfg, ref))
    np.testing.assert_allclose(float(loss), float(ref["loss"]), atol=1e-5, rtol=1e-5)
    # the whole model: our decoder's hidden state and the head's logits
    out = head_logits(cfg, hcfg, params, head, jnp.asarray(ref["input_ids"]), g)
    np.testing.assert_allclose(_logits(hcfg, out), _ref_logits(hcfg, ref), atol=FULL_TOL, rtol=0)


def test_golden_head_configs():
    s = hf_head_config(json.loads((GOLD / "seqcls_single" / "config.json").read_text()))
    assert (s.task, s.num_labels, s.labels, s.problem_type) == ("seq-cls", 3, ("neg", "neu", "pos"),
                                                                "single_label_classification")
    assert hf_head_config(json.loads((GOLD / "seqcls_multi" / "config.json").read_text())).problem_type \
        == "multi_label_classification"
    r = hf_head_config(json.loads((GOLD / "seqcls_regression" / "config.json").read_text()))
    assert (r.num_labels, r.problem_type) == (1, "regression")
    t = hf_head_config(json.loads((GOLD / "tokencls" / "config.json").read_text()))
    assert (t.task, t.labels) == ("token-cls", ("O", "B-PER", "I-PER", "B-LOC", "I-LOC"))
    assert hf_head_config(json.loads((GOLD / "qa" / "config.json").read_text())).num_labels == 2


@pytest.mark.parametrize("name", CASES)
def test_save_hf_writes_their_folder(tmp_path, name):
    """their folder -> load_hf_head -> save_hf: the same tensors under the same names and the config
    fields their port reads, so their port gives the golden logits on our folder; and back."""
    cfg, params, g, hcfg, head = load_hf_head(GOLD / name)
    out = save_hf(cfg, params, tmp_path / name, head_cfg=hcfg, head=head)
    theirs, ours = read_hf_state_dict(GOLD / name), read_hf_state_dict(out)
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    c_theirs = json.loads((GOLD / name / "config.json").read_text())
    c_ours = json.loads((out / "config.json").read_text())
    skip = {"transformers_version", "pldr_jax"}
    for k, v in c_theirs.items():
        if k not in skip:
            assert c_ours.get(k) == v, (k, c_ours.get(k), v)
    cfg2, params2, g2, hcfg2, head2 = load_hf_head(out)
    assert (cfg2, hcfg2) == (cfg, hcfg)
    ref = _ref(name)
    a = head_logits(cfg, hcfg, params, head, jnp.asarray(ref["input_ids"]))
    b = head_logits(cfg2, hcfg2, params2, head2, jnp.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(_logits(hcfg, a), _logits(hcfg, b))


def test_last_token_index_and_no_pad_error():
    t = jnp.array([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last_token_index(t, 0), [2, 4, 4, 0])
    np.testing.assert_array_equal(last_token_index(t[:1], None), [4])
    with pytest.raises(ValueError, match="Cannot handle batch sizes > 1 if no padding token is defined"):
        last_token_index(t, None)


def test_loss_picks_problem_type_and_masks_rows():
    h_single = HeadConfig("seq-cls", 3)
    logits = jnp.array([[1.0, 2.0, 0.5], [0.1, 0.2, 3.0]])
    l_int, n = head_loss(h_single, logits, np.array([1, 2], np.int32))
    ref = -np.mean([jax.nn.log_softmax(logits[0])[1], jax.nn.log_softmax(logits[1])[2]])
    assert abs(float(l_int) - ref) < 1e-6 and float(n) == 2
    l_multi, n = head_loss(h_single, logits, np.array([[0, 1, 0], [1, 0, 1]], np.float32))
    x, y = np.asarray(logits), np.array([[0, 1, 0], [1, 0, 1]], np.float32)
    bce = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
    assert abs(float(l_multi) - bce) < 1e-6 and float(n) == 6
    l_reg, _ = head_loss(HeadConfig("seq-cls", 1), jnp.array([[0.5], [2.0]]), np.array([1.0, 1.0], np.float32))
    assert abs(float(l_reg) - (0.25 + 1.0) / 2) < 1e-6
    # a dummy row (example_mask 0) changes nothing, whatever its label
    l_masked, n = head_loss(h_single, jnp.concatenate([logits, logits[:1]]), np.array([1, 2, 0], np.int32),
                            example_mask=np.array([1, 1, 0]))
    assert abs(float(l_masked) - ref) < 1e-6 and float(n) == 2
    # QA: a position past the sequence is clamped to L and ignored
    s = jnp.array([[0.0, 1.0, 2.0]]); e = jnp.array([[2.0, 1.0, 0.0]])
    l_qa, _ = head_loss(HeadConfig("qa", 2), (s, e), (np.array([2]), np.array([9])))
    assert abs(float(l_qa) - (-float(jax.nn.log_softmax(s[0])[2])) / 2) < 1e-6


def test_head_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'ner'"):
        HeadConfig("ner", 3)
    with pytest.raises(ValueError, match="2 outputs"):
        HeadConfig("qa", 3)
    with pytest.raises(ValueError, match="unknown problem_type"):
        HeadConfig("seq-cls", 2, problem_type="ranking")
    with pytest.raises(ValueError, match="load_hf_head"):
        load_hf(GOLD / "seqcls_single")
    with pytest.raises(ValueError, match="unknown architecture 'PldrllmForMaskedLM'"):
        hf_head_config({"architectures": ["PldrllmForMaskedLM"]})
    # a head weight whose shape disagrees with id2label: one message naming both
    cfg, params, g, hcfg, head = load_hf_head(GOLD / "seqcls_single")
    bad = save_hf(cfg, params, tmp_path / "bad", head_cfg=hcfg, head=head)
    c = json.loads((bad / "config.json").read_text())
    c["id2label"] = {"0": "a", "1": "b"}
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"score.weight has shape \(3, 32\); expected \[num_labels=2"):
        load_hf_head(bad)


def test_nnx_task_model_matches_functions():
    from flax import nnx
    from pldr_jax.nnx_heads import PLDRTaskModel
    cfg, params, g, hcfg, head = load_hf_head(GOLD / "tokencls")
    ref = _ref("tokencls")
    model = PLDRTaskModel.from_params(cfg, hcfg, params, head)
    assert model.head.kernel.out_sharding == ("embed", "norm")
    tokens = jnp.asarray(ref["input_ids"])
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(head_logits(cfg, hcfg, params, head, tokens)),
                               atol=1e-5, rtol=0)  # per-layer loop vs scan: float32 order
    labels = jnp.asarray(ref["labels"], jnp.int32)
    opt = nnx.Optimizer(model, __import__("optax").sgd(0.05), wrt=nnx.Param)
    before = float(model.loss(tokens, labels))
    for _ in range(3):
        _, grads = nnx.value_and_grad(lambda m: m.loss(tokens, labels))(model)
        opt.update(model, grads)
    assert float(model.loss(tokens, labels)) < before
    p2, h2 = model.to_params()
    assert set(p2) == {"embed", "embed_norm", "layers"} and set(h2) == {"kernel", "bias"}
    fresh = PLDRTaskModel(PLDRConfig.preset("tiny"), HeadConfig("seq-cls", 4), rngs=nnx.Rngs(0))
    assert fresh(jnp.ones((2, 5), jnp.int32)).shape == (2, 4) and not hasattr(fresh.head, "bias")


HF_PY, HF_PORT = os.environ.get("PLDR_HF_PYTHON"), os.environ.get("PLDR_HF_PORT")


@pytest.mark.skipif(not (HF_PY and HF_PORT), reason="PLDR_HF_PYTHON / PLDR_HF_PORT not set (a Python with "
                    "torch + transformers==4.56.1 and the folder holding the authors' `pldrllm` package)")
@pytest.mark.parametrize("task,n,reference_rope", [("seq-cls", 3, True), ("token-cls", 4, False), ("qa", 2, True)])
def test_save_hf_loads_in_their_port(tmp_path, task, n, reference_rope):
    """A folder save_hf writes from our own (fresh) weights: their port gives our logits."""
    cfg = PLDRConfig(num_layers=2, d_model=32, num_heads=2, dff=48, vocab_size=61, max_seq_len=32, A_dff=12,
                     num_reslayerA=2, num_denseA=2, reference_rope=reference_rope)
    params = init_params(cfg, jax.random.key(3))
    hcfg = HeadConfig(task, n)
    head = init_head(cfg, hcfg, jax.random.key(4))
    if hcfg.has_bias:
        head["bias"] = 0.3 * jax.random.normal(jax.random.key(5), (n,))
    folder = save_hf(cfg, params, tmp_path / "ours", head_cfg=hcfg, head=head)
    ids = np.random.default_rng(0).integers(4, 61, size=(2, 10))
    ids[1, 7:] = 0
    np.savez(tmp_path / "in.npz", input_ids=ids, attention_mask=(ids != 0).astype(np.int64))
    p = subprocess.run([HF_PY, str(GOLD / "make_golden.py"), "--port", HF_PORT, "--run", str(folder),
                        "--inputs", str(tmp_path / "in.npz"), "--save", str(tmp_path / "out.npz")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = np.load(tmp_path / "out.npz")
    ours = head_logits(cfg, hcfg, params, head, jnp.asarray(ids))
    # our init's power exponents make G_LM less well-conditioned than the port's: float32 spread to 5e-4
    np.testing.assert_allclose(_logits(hcfg, ours), _ref_logits(hcfg, theirs), atol=1e-3, rtol=0)
    # and their hidden state through our head: equal to 1e-5
    out = apply_head(hcfg, head, jnp.asarray(theirs["last_hidden"]), jnp.asarray(ids))
    np.testing.assert_allclose(_logits(hcfg, out), _ref_logits(hcfg, theirs), atol=1e-5, rtol=0)
