"""A run directory is self-contained and relocatable; an older one still loads and resumes.

tests/data/old_run is a `pldr-jax train` run directory written by commit 586d482 of this repository
(the pipeline fingerprint before the global-batch data positions, absolute paths in its run config):

    git worktree add /work/wt/old28 586d482 && cd /work/wt/old28
    JAX_PLATFORMS=cpu python -m pldr_jax.cli train --preset tiny --seq-len 32 --batch-size 4 --steps 6 \\
        --save-every 4 --eval-every 0 --eval-batches 1 --log-every 1 --keep 2 --workdir /tmp/runs28/old_run \\
        --no-progress --no-plot --sync-checkpoints

then its tensorboard/ folder and its checkpoint 6 removed (as if it had died after saving step 4: its
metrics.jsonl keeps the rows of steps 5 and 6).  Its run config records its tokenizer as
``/tmp/runs28/old_run/tokenizer.model``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

OLD_RUN = Path(__file__).parent / "data" / "old_run"
OLD_TOKENIZER = "/tmp/runs28/old_run/tokenizer.model"


def _place_run(dest: Path) -> Path:
    """A copy of the old run at `dest` whose configs record its tokenizer by `dest`'s absolute path
    (what a run written at `dest` by an older version holds)."""
    shutil.copytree(OLD_RUN, dest)
    for f in [dest / "run_config.json", *dest.glob("checkpoints/*/config/metadata")]:
        f.write_text(f.read_text().replace(OLD_TOKENIZER, str(dest / "tokenizer.model")))
    return dest


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A tokenizer that encodes differently from the run's own."""
    from pldr_jax.data import Tokenizer, default_corpus_documents
    d = tmp_path_factory.mktemp("othertok")
    return Tokenizer.train(default_corpus_documents()[:40], d / "other", 150)


def _encodes_like(tok, ref, text="The for statement returns a value"):
    return list(tok.encode(text)) == list(ref.encode(text))


def test_copied_run_uses_its_own_tokenizer(tmp_path, other_tokenizer):
    from pldr_jax.data import Tokenizer
    from pldr_jax.io.run_tokenizer import find_tokenizer_file, resolve_tokenizer
    orig = _place_run(tmp_path / "orig")
    own = Tokenizer.load(orig / "tokenizer.model")
    assert not _encodes_like(own, other_tokenizer)  # the test can fail
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    shutil.copyfile(other_tokenizer.path, copy / "tokenizer.model")  # the copy's tokenizer replaced
    for where in (copy, copy / "checkpoints", copy / "checkpoints" / "4"):
        assert find_tokenizer_file(where) == copy / "tokenizer.model", where
    assert _encodes_like(resolve_tokenizer(copy), other_tokenizer)
    assert _encodes_like(resolve_tokenizer(orig), own)


def test_moved_run_with_another_tokenizer_in_its_old_place(tmp_path, other_tokenizer):
    from pldr_jax.data import Tokenizer
    from pldr_jax.io.run_tokenizer import resolve_tokenizer
    orig = _place_run(tmp_path / "orig")
    own = Tokenizer.load(orig / "tokenizer.model")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(orig, moved)
    orig.mkdir()  # a new run took the old place, with another tokenizer
    shutil.copyfile(other_tokenizer.path, orig / "tokenizer.model")
    assert _encodes_like(resolve_tokenizer(moved), own)
    (moved / "tokenizer.model").unlink()  # no copy of its own: what its config recorded is all there is
    assert _encodes_like(resolve_tokenizer(moved), other_tokenizer)


def test_explicit_tokenizer_overrides_with_a_warning(tmp_path, other_tokenizer):
    from pldr_jax.io.run_tokenizer import resolve_tokenizer
    run = _place_run(tmp_path / "run")
    said = []
    tok = resolve_tokenizer(run, other_tokenizer.path, warn=said.append)
    assert _encodes_like(tok, other_tokenizer)
    assert len(said) == 1 and str(run / "tokenizer.model") in said[0] and other_tokenizer.path in said[0]
    said.clear()
    same = tmp_path / "same.model"
    shutil.copyfile(run / "tokenizer.model", same)
    resolve_tokenizer(run, same, warn=said.append)
    assert said == []


# --------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture
def damaged_run(tmp_path):
    """The old run with two checkpoints, the newest one's largest array file truncated."""
    run = _place_run(tmp_path / "run")
    shutil.copytree(run / "checkpoints" / "4", run / "checkpoints" / "2")
    biggest = max((run / "checkpoints" / "4" / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(100)
    return run


@pytest.mark.parametrize("argv", [
    ["generate", "{run}", "--ids", "5 6 7", "--max-new-tokens", "1"],
    ["eval", "perplexity", "{run}", "--data", "{ids}", "--no-progress"],
    ["convert", "{run}", "{out}", "--to", "hf"],
])
def test_truncated_checkpoint_is_one_line_naming_the_step_that_loads(damaged_run, tmp_path, capsys, argv):
    from pldr_jax.cli import main
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": [5, 6, 7, 8]}) + "\n")
    argv = [a.format(run=damaged_run, ids=ids, out=tmp_path / "out") for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(damaged_run / "checkpoints" / "4") in err[0] and "pass --step 2" in err[0], err[0]


def test_step_flag_loads_the_earlier_checkpoint(damaged_run, capsys):
    from pldr_jax.cli import main
    from pldr_jax.io import load_model
    cfg, params, _ = load_model(damaged_run, step=2)
    assert cfg.num_layers == 2
    capsys.readouterr()
    assert main(["generate", str(damaged_run), "--step", "2", "--ids", "5 6 7", "--max-new-tokens", "2",
                 "--greedy", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"][0]["ids"]) == 2


def test_empty_prompt_is_the_documented_error(capsys):
    from pldr_jax.cli import main
    assert main(["generate", "preset:tiny", "--prompt", "  ", "--max-new-tokens", "1"]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err


# --------------------------------------------------------------------------- data positions across versions
def _corpus():
    from pldr_jax.data import TokenizedCorpus
    rng = np.random.default_rng(0)
    lens = rng.integers(5, 40, 60)
    return TokenizedCorpus(rng.integers(4, 90, int(lens.sum())), np.concatenate([[0], np.cumsum(lens)]))


def _ds(**kw):
    from pldr_jax.data.pipeline import PretrainDataset
    return PretrainDataset(_corpus(), **{"seq_len": 16, "batch_size": 4, "seed": 3, **kw})


def _v0_state(ds, n):
    """The state the version-0 pipeline saved after n batches for ds's inputs (its fingerprint formula)."""
    return {"next_index": n, "pipeline": ds.legacy_fingerprints[0][0]}


def _batch_at(ds, n):
    return ds[n]["inputs"]


def test_state_of_this_and_earlier_versions_continue_exactly():
    from pldr_jax.data.pipeline import PIPELINE_VERSION, restore_position
    ds = _ds()
    it = ds.iterator()
    for _ in range(3):
        next(it)
    st = it.get_state()
    assert st["pipeline_version"] == PIPELINE_VERSION and st["next_index"] == 3
    v1 = {"next_index": 3, "pipeline": st["pipeline"]}  # written before versions were stored
    for state in (st, v1, _v0_state(ds, 3)):
        it2 = ds.iterator()
        assert restore_position(it2, state) is None
        np.testing.assert_array_equal(next(it2)["inputs"], _batch_at(ds, 3))


def test_state_that_cannot_continue_exactly_names_the_choices():
    from pldr_jax.data.pipeline import DataStateMismatch, restore_position
    two = _ds(shard_count=2, batch_size=2)  # version 0 sharded rows per process: another order
    other_inputs = _ds(seq_len=8)
    for ds, state, why in ((two, _v0_state(two, 5), "version 0"),
                           (other_inputs, _ds().iterator(5).get_state(), "other inputs")):
        with pytest.raises(DataStateMismatch, match=why) as e:
            restore_position(ds.iterator(), state)
        assert "--data-state restart" in str(e.value) and "--data-state skip (past the first 5 batches)" in str(e.value)
        it = ds.iterator()
        assert "restart" in restore_position(it, state, "restart") and it.step == 0
        it = ds.iterator()
        assert "skip" in restore_position(it, state, "skip") and it.step == 5
        np.testing.assert_array_equal(next(it)["inputs"], _batch_at(ds, 5))


# --------------------------------------------------------------------------- resuming the old run
OLD_LOSS_STEP_5 = 4.756786346435547  # tests/data/old_run/metrics.jsonl: the old run's loss at step 5


def _summary_last_step(out: str) -> int:
    line = next(ln for ln in out.splitlines() if ln.startswith("train loss:"))
    return int(line.rsplit("(step ", 1)[1].split(")")[0])


def test_old_run_resumes_where_it_left_off_and_reads_as_one_history(tmp_path, capsys):
    """Written by 586d482 (another data-pipeline version, absolute paths): `--resume` continues at its
    data position (one process: the same batches) with its own settings; the rows of its lost steps 5-6
    give way to the resumed run's in the summary and metrics."""
    from pldr_jax.cli import main
    from pldr_jax.train import read_metrics
    run = _place_run(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--workdir", str(run), "--resume", "--steps", "5", "--no-progress", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "changed by the flags given: steps 6 -> 5" in out and "trained steps 4 -> 5" in out, out
    assert _summary_last_step(out) == 5
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["loss"] == pytest.approx(OLD_LOSS_STEP_5, abs=1e-4)  # the old run's batch 5 (not batch 0)
    conf = json.loads((run / "run_config.json").read_text())
    assert conf["tokenizer"] == "tokenizer.model"  # relative: the folder can move


def test_old_run_with_other_data_settings_needs_a_data_state_choice(tmp_path, capsys):
    from pldr_jax.cli import main
    run = _place_run(tmp_path / "run")
    before = (run / "run_config.json").read_text()
    argv = ["train", "--workdir", str(run), "--resume", "--steps", "5", "--seq-len", "16", "--no-progress",
            "--no-plot"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-state restart" in err[0] and "--data-state skip" in err[0], err
    assert (run / "run_config.json").read_text() == before  # nothing written on a refused resume
    assert main([*argv, "--data-state", "skip"]) == 0
    out = capsys.readouterr().out
    assert "data continues after its first 4 batches" in out and "trained steps 4 -> 5" in out, out
