"""lm-eval tasks while training (`pldr_jax.train.task_eval`), on in-memory parameters."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from pldr_jax.eval import harness

needs_lm_eval = pytest.mark.skipif(not harness.HAS_LM_EVAL, reason="lm_eval is not importable (test extra)")

MC_ITEMS = [
    {"context": "The cat sat on the", "choices": ["mat", "moon", "market"], "label": 0},
    {"context": "Water is", "choices": ["wet", "dry"], "label": 0},
    {"context": "The sun rises in the", "choices": ["east", "west", "sea"], "label": 0},
    {"context": "A dog likes to", "choices": ["run", "sing"], "label": 1},
]


@needs_lm_eval
def test_local_task_on_in_memory_params(tmp_path):
    import pldr_jax
    from pldr_jax.data import Tokenizer, default_corpus_documents
    from pldr_jax.train.task_eval import TaskEvaluator
    tok = Tokenizer.train(default_corpus_documents()[:60], tmp_path / "tok", 128)
    cfg = pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=128, max_seq_len=32,
                              A_dff=8, num_reslayerA=1, num_denseA=1)
    params = pldr_jax.init_params(cfg, jax.random.key(3))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ITEMS))
    yaml_path = tmp_path / "local_mc.yaml"
    yaml_path.write_text(
        f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        f"  cache_dir: {tmp_path / 'hf_cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    ev = TaskEvaluator([str(yaml_path)], tok, batch_size=4)
    rec = ev(cfg, params, 7)
    assert rec["kind"] == "lm_eval" and rec["step"] == 7 and rec["lm_eval_s"] > 0
    # the accuracy of the adapter's own log-likelihoods (lm-eval joins context and choice with a space)
    lm = harness.PLDRLM(cfg, params, tok, batch_size=1)
    correct = 0
    for item in MC_ITEMS:
        ll = [lm.loglikelihood([(item["context"], " " + c)], disable_tqdm=True)[0][0] for c in item["choices"]]
        correct += int(np.argmax(ll) == item["label"])
    assert rec["local_mc"] == {"acc": correct / len(MC_ITEMS), "sample_len": len(MC_ITEMS)}
    with pytest.raises(ValueError, match="unknown task"):
        TaskEvaluator(["no_such_task_xyz"], tok)._task_manager()
