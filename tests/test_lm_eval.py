"""lm-evaluation-harness as users run it: `pldr-jax eval harness RUN` on a trained run (local task
files, no network) against `pldr-jax eval mc` / `eval perplexity`, tokenizer discovery shared by
every command, batched `generate_until`, the batch-size defaults, the shipped task groups."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

for _k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # nothing downloads
    os.environ.setdefault(_k, "1")

from pldr_jax.eval import harness  # noqa: E402

needs_lm_eval = pytest.mark.skipif(not harness.HAS_LM_EVAL, reason="lm_eval (lm-evaluation-harness) is not "
                                   "importable; pip install 'lm-eval==0.4.13' (in the test extra)")

MC_ITEMS = [
    {"context": "The cat sat on the", "choices": ["mat", "moon", "market"], "label": 0},
    {"context": "Water is", "choices": ["wet", "dry"], "label": 0},
    {"context": "The sun rises in the", "choices": ["east", "west", "sea"], "label": 0},
    {"context": "A dog likes to", "choices": ["run", "sing"], "label": 1},
]
DOCS = ["The model reads the text and learns.", "A short one.", "Power law graph attention in a tiny model."]
GEN = [{"context": "The cat sat on the", "answer": "mat"}, {"context": "Water", "answer": "is"},
       {"context": "In the beginning the model", "answer": "x"}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A `pldr-jax train` run: a 128-piece tokenizer trained on the run's data (workdir/tokenizer.model)
    and a one-layer model trained for two steps, checkpointed at the end."""
    import pldr_jax
    from pldr_jax.data import default_corpus_documents
    from pldr_jax.train.loop import TrainConfig, train

    work = tmp_path_factory.mktemp("lm_eval") / "run"
    cfg = pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=128, max_seq_len=32,
                              A_dff=8, num_reslayerA=1, num_denseA=1)
    tc = TrainConfig(workdir=str(work), steps=2, total_steps=10, seq_len=16, batch_size=8, vocab_size=128,
                     learning_rate=1e-2, warmup_steps=1, log_every=1, eval_every=0, eval_batches=1, save_every=0,
                     validation_fraction=0.1, progress=False, plot=False, tensorboard=False)
    train(cfg, tc, documents=default_corpus_documents()[:60], log=lambda *a, **k: None,
          compiler_options={"xla_backend_optimization_level": 0})
    assert (work / "tokenizer.model").is_file()
    return work


@pytest.fixture(scope="module")
def lm(run_dir):
    return harness.PLDRLM(pretrained=str(run_dir))


def _cli(argv, capsys):
    from pldr_jax.cli import main
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


# --------------------------------------------------------------------------- tokenizer discovery
def test_every_command_finds_the_runs_tokenizer(run_dir, lm, tmp_path, capsys):
    from pldr_jax.io.run_tokenizer import find_tokenizer_file, resolve_tokenizer
    own = run_dir / "tokenizer.model"
    for where in (run_dir, run_dir / "checkpoints", next((run_dir / "checkpoints").iterdir())):
        assert find_tokenizer_file(where) == own, where
    assert find_tokenizer_file("preset:tiny") is None and find_tokenizer_file(tmp_path / "missing") is None
    assert Path(lm.tokenizer.path) == own and lm.tokenizer_name == str(own)
    # an explicit tokenizer wins (path or object)
    other = tmp_path / "other.model"
    shutil.copyfile(own, other)
    assert Path(resolve_tokenizer(run_dir, str(other)).path) == other
    assert resolve_tokenizer(run_dir, lm.tokenizer) is lm.tokenizer
    # an HF folder exported with the run's tokenizer: its own tokenizer.model
    from pldr_jax.io import save_model
    save_model(lm.cfg, lm.params, tmp_path / "hf", "hf", tokenizer_model=own)
    assert find_tokenizer_file(tmp_path / "hf") == tmp_path / "hf" / "tokenizer.model"
    # a state-dict file: tokenizer.model beside it, else the only *.model there
    ck = tmp_path / "sd" / "model.pth"
    ck.parent.mkdir()
    ck.write_bytes(b"")
    assert find_tokenizer_file(ck) is None
    shutil.copyfile(own, ck.parent / "paper.model")
    assert find_tokenizer_file(ck) == ck.parent / "paper.model"
    # the CLI commands on the run directory, no --tokenizer
    mc_file = tmp_path / "mc.jsonl"
    mc_file.write_text("".join(json.dumps(d) + "\n" for d in MC_ITEMS))
    out = json.loads(_cli(["eval", "mc", str(run_dir), "--data", str(mc_file)], capsys))
    assert out["n"] == len(MC_ITEMS)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    out = json.loads(_cli(["eval", "perplexity", str(run_dir), "--data", str(docs)], capsys))
    assert out["documents"] == len(DOCS) and out["bits_per_byte"] > 0
    out = json.loads(_cli(["generate", str(run_dir), "--prompt", "The cat", "--max-new-tokens", "3", "--greedy",
                           "--json"], capsys))
    assert isinstance(out["results"][0]["text"], str)


# --------------------------------------------------------------------------- batched generate_until
def test_batched_generate_until_equals_one_at_a_time(run_dir, lm):
    reqs = [("The cat sat on the", {"until": ["\n"], "max_gen_toks": 6}),
            ("Water", {"until": ["\n"], "max_gen_toks": 6}),
            ("In the beginning the model reads", {"until": ["zzz"], "max_gen_toks": 6}),
            ("A", {"until": [], "max_gen_toks": 3}),                       # another group (max_gen_toks)
            ("The sun", {"until": "e", "max_gen_toks": 6}),                # a plain-string until
            ("Power law", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False, "temperature": 0.0})]
    one = harness.PLDRLM(lm.cfg, lm.params, lm.tokenizer, batch_size=1)
    alone = [one.generate_until([r], disable_tqdm=True)[0] for r in reqs]
    batched = harness.PLDRLM(lm.cfg, lm.params, lm.tokenizer, batch_size=4).generate_until(reqs, disable_tqdm=True)
    assert batched == alone
    # the same new ids as `pldr_jax.decode.generate` on each prompt alone (greedy, EOS stop)
    from pldr_jax.decode import generate
    for (ctx, kw), text in zip(reqs, alone):
        ids = generate(lm.cfg, lm.params, [lm.tok_encode(ctx)], max_new_tokens=kw["max_gen_toks"], top_k=1,
                       eos_id=3).tokens[0]
        full = lm.tok_decode([t for t in ids if t != 3])
        until = [kw["until"]] if isinstance(kw["until"], str) else kw["until"]
        for s in until:
            if s in full:
                full = full[:full.index(s)]
        assert text == full
    assert "e" not in batched[4]


def test_generate_until_benchmark_quick(run_dir, capsys):
    """experiments/bench_generate_until.py at its smallest, on the run's model (the decode shapes of
    the test above, compiled already): every batch size returns the one-at-a-time strings (the
    speed itself is reported by the script, never asserted)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_generate_until.py"
    spec = importlib.util.spec_from_file_location("bench_generate_until", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--json", "--model", str(run_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in res["results"]] == [1, 4]
    assert all(r["same_as_first"] and r["new_tokens"] > 0 and r["median_s"] > 0 for r in res["results"])


# --------------------------------------------------------------------------- batch sizes
def test_batch_size_from_the_run_and_auto(run_dir, lm):
    from pldr_jax.eval.batch_size import auto_batch_size, parse_batch_size, run_batch_size, scoring_peak_bytes
    # the run trained 8 rows x 16 tokens on one device: 128 tokens = 4 rows of max_seq_len 32
    assert run_batch_size(run_dir) == 4 and run_batch_size(run_dir / "checkpoints") == 4
    assert lm.batch_size == 4 and run_batch_size("preset:tiny") is None
    assert parse_batch_size("auto:4") == "auto" and parse_batch_size("16") == 16
    with pytest.raises(ValueError, match="batch_size"):
        parse_batch_size("big")
    cfg, p = lm.cfg, lm.params
    p1, p2 = scoring_peak_bytes(cfg, p, 1), scoring_peak_bytes(cfg, p, 2)
    assert p2 > p1
    budget = p1 + 5 * (p2 - p1)
    b = auto_batch_size(cfg, p, budget_bytes=budget)
    assert 2 <= b <= 6 and scoring_peak_bytes(cfg, p, b) <= budget
    assert auto_batch_size(cfg, p, budget_bytes=budget, max_batch_size=2) == 2
    with pytest.raises(ValueError, match="one row"):
        auto_batch_size(cfg, p, budget_bytes=p1 // 2)
    auto = harness.PLDRLM(pretrained=str(run_dir), batch_size="auto", memory_budget_gb=budget / 2 ** 30)
    assert auto.batch_size == b and auto.batch_sizes == {"auto": b}


# --------------------------------------------------------------------------- lm-eval itself
@needs_lm_eval
def test_registration_keeps_lm_evals_own_models():
    from lm_eval.api.registry import get_model
    assert get_model("pldr_jax") is harness.PLDRLM
    assert get_model("dummy").__name__ == "DummyLM"


@needs_lm_eval
def test_shipped_groups_resolve_in_lm_evals_task_index():
    """The groups reference lm-eval's built-in tasks by name (a name lm-eval does not know would
    silently become an empty inline task), with the papers' shot counts; no dataset is loaded.
    (Only the built-in task folders the groups use are indexed: the whole index takes ~10 s.)"""
    import lm_eval.tasks
    import yaml
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind
    from pldr_jax.eval.lm_eval_cli import TASKS_DIR
    builtin = Path(lm_eval.tasks.__file__).parent
    folders = ["arc", "piqa", "siqa", "hellaswag", "openbookqa", "winogrande", "truthfulqa", "tinyBenchmarks"]
    tm = TaskManager(include_defaults=False, include_path=[str(TASKS_DIR)] + [str(builtin / f) for f in folders])
    want = {"pldrllm_zeroshot": {t: 0 for t in ("arc_easy", "arc_challenge", "piqa", "social_iqa", "hellaswag",
                                                "openbookqa", "winogrande", "truthfulqa_mc2")},
            "pldrllm_tinybenchmarks": {"tinyArc": 25, "tinyMMLU": 0, "tinyWinogrande": 5, "tinyHellaswag": 10,
                                       "tinyTruthfulQA": 0}}
    for group, shots in want.items():
        entry = tm.task_index[group]
        assert entry.kind == Kind.GROUP and Path(entry.yaml_path).parent == TASKS_DIR
        members = yaml.safe_load(Path(entry.yaml_path).read_text())["task"]
        assert {m["task"]: m["num_fewshot"] for m in members} == shots
        for name in shots:
            assert tm.task_index[name].kind in (Kind.TASK, Kind.PY_TASK), name


def _write_tasks(folder: Path) -> None:
    """Three local tasks (one per request type) reading JSON-lines files through `datasets`' json loader."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"mc": MC_ITEMS, "docs": [{"text": t} for t in DOCS], "gen": GEN}
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def task(name, file, body):
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / file}\n"
            f"  cache_dir: {folder / 'hf_cache'}\ntest_split: test\n{body}metadata:\n  version: 1.0\n")

    task("local_mc", "mc.jsonl", "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
         "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    task("local_rolling", "docs.jsonl", "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
         "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n  - metric: word_perplexity\n")
    task("local_gen", "gen.jsonl", "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
         "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 5\n"
         "metric_list:\n  - metric: exact_match\n")


@needs_lm_eval
def test_eval_harness_equals_eval_mc_and_perplexity(run_dir, lm, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    _write_tasks(tasks)
    out_dir = tmp_path / "results"
    printed = _cli(["eval", "harness", str(run_dir), "--tasks", "local_mc,local_rolling,local_gen",
                    "--include_path", str(tasks), "--output_path", str(out_dir), "--log_samples"], capsys)
    assert "local_mc" in printed and "acc_norm" in printed and "batch_size: 4" in printed
    res = json.loads(next(out_dir.rglob("results_*.json")).read_text())
    r = res["results"]
    assert res["config"]["model"] == "pldr_jax" and res["config"]["model_batch_size"] == 4
    assert Path(res["config"]["tokenizer"]) == run_dir / "tokenizer.model"
    # multiple choice: the numbers of `pldr-jax eval mc`
    mc_file = tmp_path / "mc.jsonl"
    mc_file.write_text("".join(json.dumps(d) + "\n" for d in MC_ITEMS))
    mc = json.loads(_cli(["eval", "mc", str(run_dir), "--data", str(mc_file)], capsys))
    assert r["local_mc"]["acc,none"] == mc["acc"] and r["local_mc"]["acc_norm,none"] == mc["acc_norm"]
    # rolling log-likelihood: the numbers of `pldr-jax eval perplexity` with its defaults (no EOS, as lm-eval)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    ppl = json.loads(_cli(["eval", "perplexity", str(run_dir), "--data", str(docs)], capsys))
    assert r["local_rolling"]["bits_per_byte,none"] == pytest.approx(ppl["bits_per_byte"], rel=1e-6)
    nll = ppl["nll_per_token"] * ppl["tokens"]
    words = sum(len(t.split()) for t in DOCS)
    assert r["local_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-6)
    # generation: what the adapter generates for each prompt alone
    samples = [json.loads(line) for f in out_dir.rglob("samples_local_gen_*.jsonl")
               for line in f.read_text().splitlines()]
    got = {s["doc"]["context"]: s["resps"][0][0] for s in samples}
    want = harness.PLDRLM(lm.cfg, lm.params, lm.tokenizer, batch_size=1).generate_until(
        [(d["context"], {"until": ["\n"], "max_gen_toks": 5}) for d in GEN], disable_tqdm=True)
    assert got == {d["context"]: w for d, w in zip(GEN, want)}


@needs_lm_eval
def test_eval_harness_refuses_clearly(run_dir, capsys):
    from pldr_jax.cli import main
    assert main(["eval", "harness", str(run_dir), "--tasks", "x", "--model", "hf"]) == 2
    assert "--model pldr_jax" in capsys.readouterr().err
    assert main(["eval", "harness", str(run_dir), "--tasks", "x", "--model_args", "batch_size=4"]) == 2
    assert "--batch_size" in capsys.readouterr().err
    assert main(["eval", "harness", str(run_dir), "--tasks", "x", "--batch_size", "many"]) == 2
    assert "auto" in capsys.readouterr().err
    assert main(["eval", "harness", str(run_dir), "--tasks", "x", "--model_args", "mdoe=cached"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mdoe" in err[0] and "mode" in err[0].split("valid:")[1], err
    with pytest.raises(ValueError, match="mdoe"):
        harness.PLDRLM(pretrained=str(run_dir), mdoe="cached")


def test_eval_commands_show_progress_unless_told_not_to(run_dir, tmp_path, capsys):
    from pldr_jax.cli import main
    mc_file = tmp_path / "mc.jsonl"
    mc_file.write_text("".join(json.dumps(d) + "\n" for d in MC_ITEMS))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    for task, data in (("mc", mc_file), ("perplexity", docs)):
        capsys.readouterr()
        assert main(["eval", task, str(run_dir), "--data", str(data)]) == 0
        err = capsys.readouterr().err
        assert f"{task}:" in err and "100%" in err, err
        assert main(["eval", task, str(run_dir), "--data", str(data), "--no-progress"]) == 0
        assert f"{task}:" not in capsys.readouterr().err
