"""A training run with the operations on (`pldr_jax.train.operations`): throughput and MFU fields,
TensorBoard events read by TensorBoard's reader, a profiler trace of the chosen steps, the dynamics
probe and its plot, a local lm-eval task on the in-memory parameters, a two-source data mixture with
per-source token counts -- and, resumed halfway, the same losses bitwise as straight through."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import pldr_jax
    from pldr_jax.data import Tokenizer, default_corpus_documents
    tmp = tmp_path_factory.mktemp("ops")
    docs = default_corpus_documents()[:80]
    tok = Tokenizer.train(docs, tmp / "tok", 128)
    for name, part in (("a", docs[:40]), ("b", docs[40:])):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    mc = [{"context": "The for statement", "choices": ["loops", "cat"], "label": 0},
          {"context": "A module is", "choices": ["a file", "blue"], "label": 0}]
    (tmp / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (tmp / "ops_mc.yaml").write_text(
        f"task: ops_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp / 'mc.jsonl'}\n"
        f"  cache_dir: {tmp / 'hf_cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    cfg = pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=128, max_seq_len=32,
                              A_dff=8, num_reslayerA=1, num_denseA=1)
    return tmp, tok, cfg


def _tc(tmp, name, steps, **kw):
    from pldr_jax.train.loop import TrainConfig
    return TrainConfig(workdir=str(tmp / name), steps=steps, total_steps=6, seq_len=16, batch_size=8,
                       learning_rate=1e-2, warmup_steps=1, log_every=1, eval_every=3, eval_batches=1, save_every=3,
                       validation_fraction=0.1, progress=False, tensorboard=True, dynamics_every=2, dynamics_rows=2,
                       data_mixture=((f"jsonl:{tmp / 'a.jsonl'}:text", 3.0), (str(tmp / "b.jsonl"), 1.0)), **kw)


def _train(setup, tc):
    from pldr_jax.train.loop import train
    tmp, tok, cfg = setup
    return train(cfg, tc, tokenizer=tok, compiler_options=FAST_COMPILE, log=lambda *a, **k: None)


def test_run_with_operations(setup):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from pldr_jax.train.loop import read_metrics
    tmp = setup[0]
    r = _train(setup, _tc(tmp, "full", 6, profile_steps=(2, 3), eval_tasks=(str(tmp / "ops_mc.yaml"),),
                          eval_tasks_every=3))
    wd = tmp / "full"
    recs = read_metrics(wd / "metrics.jsonl")
    train_recs = [x for x in recs if x.get("kind") == "train"]
    assert [x["step"] for x in train_recs] == list(range(1, 7))
    for x in train_recs[1:]:
        assert x["tokens_per_s_per_device"] > 0 and 0 < x["mfu"] < 1 and 0 < x["goodput"] <= 1
        assert x["data_wait_s"] >= 0 and x["step_s"] > 0
    # per-source tokens: every target of a packed row is a real token, all 8 x 16 of each step counted
    assert sum(train_recs[-1]["tokens_by_source"].values()) == 6 * 8 * 16
    a, b = (train_recs[-1]["tokens_by_source"][k] for k in ("a", "b"))
    assert a > b > 0
    dyn = [x for x in recs if x.get("kind") == "dynamics"]
    assert [x["step"] for x in dyn] == [2, 4, 6] and math.isnan(dyn[0]["g_drift"]) and dyn[1]["g_drift"] > 0
    assert all(0 <= x["det_decimals_min"] <= 15 and x["order_parameter"] > 0 for x in dyn)
    assert (wd / "dynamics.png").stat().st_size > 1000
    lm = [x for x in recs if x.get("kind") == "lm_eval"]  # on the in-memory parameters, its time apart
    assert [x["step"] for x in lm] == [3, 6] and all(x["ops_mc"]["acc"] in (0.0, 0.5, 1.0) for x in lm)
    assert train_recs[3]["lm_eval_s"] > 0 and "lm_eval_s" not in train_recs[4]
    cfg = json.loads((wd / "run_config.json").read_text())
    assert cfg["throughput"]["model_flops_per_step"] > 0 and "measured" in cfg["throughput"]["peak_source"]
    # TensorBoard: TensorBoard's own reader finds every metric, the eval results and the config
    acc = EventAccumulator(str(wd / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/mfu", "train/goodput", "train/tokens_per_s_per_device",
            "train/data_wait_s", "eval/val_loss", "dynamics/order_parameter", "train/tokens_by_source/b"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(train_recs[-1]["loss"])
    assert any(t.startswith("run_config") for t in acc.Tags()["tensors"])
    # the profile of steps 2..3
    traces = list((wd / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert r.end_step == 6

    # stopped after step 3 (its checkpoint) and resumed: the straight run's losses, bitwise
    first = _train(setup, _tc(tmp, "halves", 3))
    second = _train(setup, _tc(tmp, "halves", 6, resume=True))
    assert second.start_step == 3
    np.testing.assert_array_equal(first.losses + second.losses, r.losses)
    halves = [x for x in read_metrics(tmp / "halves" / "metrics.jsonl") if x.get("kind") == "train"]
    assert halves[-1]["tokens_by_source"] == train_recs[-1]["tokens_by_source"]
