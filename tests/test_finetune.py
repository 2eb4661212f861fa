"""pldr-jax finetune: data checks, SFT response-only loss, resume exactness, export, generate."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import PLDRConfig, init_params
from pldr_jax.cli import main
from pldr_jax.finetune import data as D
from pldr_jax.finetune import metrics as M
from pldr_jax.finetune.loop import sft_loss, sft_targets
from pldr_jax.finetune.tasks import embedded_records


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny LM folder with a small tokenizer trained on the embedded task texts."""
    from pldr_jax.data.tokenizer import Tokenizer
    from pldr_jax.io.hf import save_hf
    d = tmp_path_factory.mktemp("lm")
    texts = [r["text"] for r in embedded_records("seq-cls")] + [r["response"] for r in embedded_records("sft")]
    Tokenizer.train(texts, d / "tok", 300, num_threads=1)
    tok_file = d / "tok.model"
    cfg = PLDRConfig.preset("tiny", vocab_size=300, max_seq_len=48)
    return save_hf(cfg, jax.device_get(init_params(cfg, jax.random.key(0))), d / "hf", tokenizer_model=tok_file)


def _ft(lm, tmp_path, *extra, capsys=None):
    return main(["finetune", str(lm), *extra])


def test_sft_loss_counts_response_tokens_only():
    from pldr_jax import forward
    from pldr_jax.losses import masked_loss
    cfg = PLDRConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.array([[5, 6, 7, 8, 9, 10, 3, 0]])
    mask = jnp.array([[False, False, False, True, True, True, True, False]])    # prompt 5 6 7, EOS 3
    inputs, targets = sft_targets(tokens, mask)
    np.testing.assert_array_equal(np.asarray(targets), [[0, 0, 8, 9, 10, 3, 0]])
    logits = forward(cfg, params, inputs).logits
    base, n = sft_loss(cfg, params, tokens, mask)
    assert float(n) == 4 and abs(float(base) - float(masked_loss(logits, targets)[0])) < 1e-6
    # a prompt token's target changed (position 0 asked to predict 41, not 6): the loss is the same
    changed = jnp.where(mask[:, 1:], tokens[:, 1:].at[0, 0].set(41), 0)
    assert float(masked_loss(logits, changed)[0]) == float(masked_loss(logits, targets)[0])
    # a response target changed: the loss moves
    moved = targets.at[0, 3].set(41)
    assert float(masked_loss(logits, moved)[0]) != float(masked_loss(logits, targets)[0])


def test_encode_and_errors():
    from pldr_jax.data.tokenizer import Tokenizer
    tok = Tokenizer.train([r["text"] for r in embedded_records("seq-cls")], None, 200, num_threads=1)
    f = D.Fields()
    recs = [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}]
    labels, pt = D.label_space("seq-cls", recs, f, "t")
    e = D.encode("seq-cls", recs, tok, 8, f, labels, pt, "t")
    assert labels == ("x", "y") and pt == "single_label_classification" and e.tokens.shape == (2, 8)
    assert all(row[np.sum(row != 0) - 1] == tok.eos_id for row in e.tokens)     # EOS appended, right padding
    with pytest.raises(ValueError, match=r"record 0: label 'z' is not in id2label \['x', 'y'\]"):
        D.encode("seq-cls", [{"text": "a", "label": "z"}], tok, 8, f, labels, pt, "t")
    with pytest.raises(ValueError, match="no records"):
        D.encode("seq-cls", [], tok, 8, f, labels, pt, "t")
    qa = [{"question": "q?", "context": "the cat sat", "answers": {"text": ["cat"], "answer_start": [4]}}]
    eq = D.encode("qa", qa, tok, 32, f, where="t")
    s, t = int(eq.labels[0][0]), int(eq.labels[1][0])
    assert tok.decode(eq.tokens[0, s:t + 1].tolist()).strip() == "cat"
    bad = [{"question": "q?", "context": "the cat sat", "answers": {"text": ["dog"], "answer_start": [4]}}]
    with pytest.raises(ValueError, match="answer span .* is outside the context"):
        D.encode("qa", bad, tok, 32, f, where="t")
    tc = [{"tokens": ["use", "sys.path", "now"], "tags": ["O", "B-ID", "O"]}]
    et = D.encode("token-cls", tc, tok, 16, f, ("O", "B-ID"), where="t")
    assert [int(et.labels[0, s]) for s in et.meta[0]["starts"]] == [0, 1, 0]


def test_metrics():
    assert M.classification(np.array([0, 1, 1]), np.array([0, 1, 0])) == {"accuracy": 2 / 3, "macro_f1": 2 / 3}
    assert M.bio_entities(["B-X", "I-X", "O", "I-Y", "B-X"]) == {("X", 0, 1), ("Y", 3, 3), ("X", 4, 4)}
    r = M.entity_prf([["B-X", "O", "B-X"]], [["B-X", "O", "O"]])
    assert (r["precision"], r["recall"]) == (0.5, 1.0)
    assert M.squad_em_f1(["The cat"], [["cat"]]) == {"exact_match": 1.0, "f1": 1.0}


def test_cli_bad_input_writes_nothing(lm, tmp_path, capsys):
    wd = tmp_path / "run"
    assert _ft(lm, tmp_path, "--task", "ner", "--train", "embedded", "--workdir", str(wd)) == 2
    assert "unknown task 'ner'" in capsys.readouterr().err and not wd.exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _ft(lm, tmp_path, "--task", "seq-cls", "--train", str(empty), "--workdir", str(wd)) == 2
    assert "no records (empty data)" in capsys.readouterr().err and not wd.exists()
    tr, va = tmp_path / "tr.jsonl", tmp_path / "va.jsonl"
    tr.write_text("\n".join(json.dumps({"text": f"t {i}", "label": "ab"[i % 2]}) for i in range(6)))
    va.write_text(json.dumps({"text": "t", "label": "c"}))
    assert _ft(lm, tmp_path, "--task", "seq-cls", "--train", str(tr), "--valid", str(va), "--workdir", str(wd)) == 2
    assert "label 'c' is not in id2label ['a', 'b']" in capsys.readouterr().err and not wd.exists()
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "q", "context": "abc", "answers": {"text": ["zz"], "answer_start": [9]}}))
    assert _ft(lm, tmp_path, "--task", "qa", "--train", str(qa), "--valid", str(qa), "--workdir", str(wd)) == 2
    assert "outside the context" in capsys.readouterr().err and not wd.exists()


def test_seq_cls_resumes_exactly_and_exports(lm, tmp_path, capsys):
    """Killed after step 4 with its last checkpoint at step 3 (step 4's removed), started again: the
    same weights as one 6-step run, and metrics.jsonl reads back as one history (step 4 once); the
    loss plot is written; the exported folder is a sequence-classification folder load_hf_head reads."""
    import shutil
    from pldr_jax.io.hf import load_hf_head, read_hf_state_dict
    from pldr_jax.train.reporting import read_metrics
    common = ["--task", "seq-cls", "--train", "embedded", "--batch-size", "16", "--max-length", "24",
              "--lr", "2e-3", "--epochs", "1", "--save-every", "3", "--log-every", "1", "--eval-every", "3",
              "--no-progress", "--json"]
    assert _ft(lm, tmp_path, *common, "--workdir", str(tmp_path / "a"), "--max-steps", "6") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 6 and set(res["valid"]) == {"loss", "accuracy", "macro_f1"}
    assert _ft(lm, tmp_path, *common, "--workdir", str(tmp_path / "b"), "--max-steps", "4") == 0
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")     # the kill: step 4 logged, never checkpointed
    capsys.readouterr()
    assert _ft(lm, tmp_path, *common, "--workdir", str(tmp_path / "b"), "--max-steps", "6") == 0
    assert "resumed from step 3" in capsys.readouterr().err
    a, b = read_hf_state_dict(tmp_path / "a" / "hf"), read_hf_state_dict(tmp_path / "b" / "hf")
    assert sorted(a) == sorted(b) and "score.weight" in a and "final_layer.weight" not in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    cfg, params, g, hcfg, head = load_hf_head(tmp_path / "a" / "hf")
    assert hcfg.architecture == "PldrllmForSequenceClassification" and hcfg.labels == (
        "aifc", "configparser", "re", "socketserver")
    ha, hb = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    train_a = [(r["step"], r["loss"]) for r in ha if r["kind"] == "train"]
    train_b = [(r["step"], r["loss"]) for r in hb if r["kind"] == "train"]
    assert [s for s, _ in train_a] == [1, 2, 3, 4, 5, 6] and train_b == train_a
    ev = [r for r in hb if r["kind"] == "eval"]
    assert [r["step"] for r in ev] == [3, 6] and {"val_loss", "val_accuracy", "val_macro_f1"} <= set(ev[-1])
    assert ev[-1]["val_accuracy"] == res["valid"]["accuracy"]
    assert [r["step"] for r in hb if r["kind"] == "resume"] == [3]
    raw = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw if r.get("kind") == "train"].count(4) == 2   # logged twice, read once
    for d in ("a", "b"):
        png = tmp_path / d / "loss_curve.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    # a different recipe in the same workdir: refused, nothing overwritten
    assert _ft(lm, tmp_path, "--task", "seq-cls", "--train", "embedded", "--workdir", str(tmp_path / "a"),
               "--lr", "1e-4", "--max-steps", "1") == 2
    assert "different recipe" in capsys.readouterr().err


def test_sft_run_then_generate(lm, tmp_path, capsys):
    wd = tmp_path / "sft"
    assert _ft(lm, tmp_path, "--task", "sft", "--train", "embedded", "--workdir", str(wd), "--max-steps", "2",
               "--batch-size", "8", "--max-length", "32", "--json") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["valid"]["tokens"] > 0 and res["valid"]["perplexity"] > 1
    assert main(["generate", str(wd), "--prompt", "Describe the Python module abc.", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_fixed_g_is_the_g_cache_and_freezes_the_metric_learner():
    """--fixed-g: the starting model's G-cache of a sequence gives that sequence's normal forward
    (step 0), and with it the metric learner's params get exactly zero gradient (without it, not)."""
    from pldr_jax import forward
    from pldr_jax.finetune.loop import fixed_g_lm
    from pldr_jax.finetune.step import METRIC_LEARNER, frozen_mask, task_loss
    from pldr_jax.heads import HeadConfig, init_head
    cfg = PLDRConfig.preset("tiny")
    params = {k: v for k, v in init_params(cfg, jax.random.key(0)).items() if k != "final"}
    tokens = jnp.array([[5, 6, 7, 8, 9, 3, 0, 0], [11, 12, 13, 3, 0, 0, 0, 0]])
    g = jnp.asarray(fixed_g_lm(cfg, params, np.asarray(tokens[0])))
    assert g.shape == (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    row = tokens[:1, :6]
    np.testing.assert_allclose(forward(cfg, params, row, g).hidden, forward(cfg, params, row).hidden,
                               rtol=1e-5, atol=1e-6)
    hcfg = HeadConfig("seq-cls", 3)
    tree = {**params, "head": init_head(cfg, hcfg, jax.random.key(1))}
    batch = {"inputs": tokens, "mask": jnp.ones(2), "labels": jnp.array([0, 2])}
    grad = lambda g_lm: jax.grad(lambda p: task_loss(cfg, hcfg, "seq-cls", p, batch, g_lm)[0])(tree)
    fixed, learned = grad(g), grad(None)
    for name in METRIC_LEARNER:
        assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(fixed["layers"][name])), name
        assert any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree_util.tree_leaves(learned["layers"][name])), name
    assert float(jnp.abs(fixed["layers"]["wq"]["kernel"]).max()) > 0      # the rest still learns
    mask = frozen_mask(tree, fixed_g=True)
    assert {k for k, v in mask["layers"].items() if all(jax.tree_util.tree_leaves(v))} == set(METRIC_LEARNER)
    assert not any(jax.tree_util.tree_leaves(mask["head"])) and not mask["embed"]["embedding"]
    assert all(jax.tree_util.tree_leaves(frozen_mask(tree, freeze_decoder=True)["layers"]))


def test_fixed_g_and_freeze_decoder_runs_keep_frozen_weights(lm, tmp_path, capsys):
    """After --fixed-g training the metric learner is bitwise the source's and the rest moved;
    after --freeze-decoder the whole decoder is; fixed_g.npy holds the G used."""
    from pldr_jax.finetune.step import METRIC_LEARNER
    from pldr_jax.io.hf import load_hf, load_hf_head
    _, src, _ = load_hf(lm)
    common = ["--task", "seq-cls", "--train", "embedded", "--batch-size", "16", "--max-length", "24", "--lr", "2e-3",
              "--warmup-steps", "1", "--max-steps", "2", "--no-progress", "--no-plot", "--no-tensorboard", "--json"]
    assert _ft(lm, tmp_path, *common, "--fixed-g", "--workdir", str(tmp_path / "g")) == 0
    assert _ft(lm, tmp_path, *common, "--freeze-decoder", "--workdir", str(tmp_path / "f")) == 0
    capsys.readouterr()
    _, pg, *_ = load_hf_head(tmp_path / "g" / "hf")
    _, pf, *_ = load_hf_head(tmp_path / "f" / "hf")
    for name in src["layers"]:
        same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), src["layers"][name], pg["layers"][name])
        assert all(jax.tree_util.tree_leaves(same)) == (name in METRIC_LEARNER), name
    for k in ("embed", "embed_norm", "layers"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, src[k], pf[k])
    g = np.load(tmp_path / "g" / "fixed_g.npy")
    assert g.shape[0] == 2 and np.isfinite(g).all()
