"""`pldr-jax train` from the command line: preset defaults, one-line refusals before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("preset", ["tiny", "tiny-g", "small", "small-g", "v51-110m", "v51-dag-110m",
                                    "v51g-106m", "v51-1b", "v51-8b"])
def test_every_preset_has_defaults_that_fit_it(preset, capsys):
    from pldr_jax import PRESETS
    from pldr_jax.cli import main
    assert preset in PRESETS
    assert main(["train", "--preset", preset, "--print-config"]) == 0
    conf = json.loads(capsys.readouterr().out)
    assert conf["train"]["seq_len"] <= conf["model"]["max_seq_len"]
    assert conf["train"]["batch_size"] % conf["train"]["grad_accum"] == 0


def test_all_presets_are_covered():
    from pldr_jax import PRESETS
    params = test_every_preset_has_defaults_that_fit_it.pytestmark[0].args[1]
    assert sorted(PRESETS) == sorted(params)


def test_seq_len_beyond_the_model_is_refused_before_any_work(tmp_path, capsys):
    from pldr_jax.cli import main
    work = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--seq-len", "128", "--workdir", str(work), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seq-len 128 exceeds the model's max_seq_len 64" in err[0], err
    assert not work.exists()  # no tokenizer trained, nothing written


def test_train_preset_tiny_with_default_flags(tmp_path):
    """`pldr-jax train --preset tiny` with its defaults (only the number of steps cut) trains."""
    work = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "pldr_jax.cli", "train", "--preset", "tiny", "--steps", "2",
                        "--workdir", str(work), "--no-progress", "--no-plot"],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained steps 0 -> 2" in r.stdout
    conf = json.loads((work / "run_config.json").read_text())
    assert conf["train"]["seq_len"] == 64 and conf["train"]["batch_size"] == 16


# --------------------------------------------------------------------------- --resume and run records
RUN_FLAGS = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--lr", "2e-3", "--warmup-steps", "1",
             "--save-every", "2", "--log-every", "1", "--eval-every", "0", "--eval-batches", "1", "--no-progress",
             "--no-plot"]


def _train_rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "train"' in line]


@pytest.fixture(scope="module")
def non_default_run(tmp_path_factory):
    """A 4-step run with non-default settings (lr 2e-3, save every 2, seq_len 32, batch 4)."""
    from pldr_jax.cli import main
    work = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", *RUN_FLAGS, "--steps", "4", "--workdir", str(work)]) == 0
    return work


def test_resume_alone_continues_with_the_runs_own_settings(non_default_run, tmp_path, capsys):
    from pldr_jax.cli import main
    work = tmp_path / "run"
    shutil.copytree(non_default_run, work)
    straight = {r["step"]: r for r in _train_rows(work / "metrics.jsonl")}
    shutil.rmtree(work / "checkpoints" / "4")  # as if the run had died after saving step 2
    capsys.readouterr()
    assert main(["train", "--workdir", str(work), "--resume", "--no-progress", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "resume: the run's stored model and training settings" in out and "changed" not in out, out
    assert "trained steps 2 -> 4" in out
    resumed = {r["step"]: r for r in _train_rows(work / "metrics.jsonl")[len(straight):]}
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):
        assert resumed[s]["loss"] == straight[s]["loss"] and resumed[s]["lr"] == straight[s]["lr"], s  # bitwise
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_resume_flags_override_and_say_so_impossible_changes_refused(non_default_run, capsys):
    from pldr_jax.cli import main
    work = str(non_default_run)
    capsys.readouterr()
    assert main(["train", "--workdir", work, "--resume", "--lr", "1e-3", "--steps", "6", "--print-config"]) == 0
    got = capsys.readouterr()
    conf = json.loads(got.out)
    assert conf["train"]["learning_rate"] == 1e-3 and conf["train"]["save_every"] == 2
    assert conf["train"]["seq_len"] == 32 and conf["model"]["max_seq_len"] == 64
    assert "learning_rate 0.002 -> 0.001" in got.err and "steps 4 -> 6" in got.err
    for argv, words in ((["--preset", "small"], "the model differs from the run's (num_layers: run 2, given 4"),
                        (["--set", "num_layers=3"], "num_layers: run 2, given 3"),
                        (["--batch-size", "8"], "global batch size is 4, not 8")):
        assert main(["train", "--workdir", work, "--resume", *argv, "--print-config"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_run_config_file_gives_its_settings_and_unknown_keys_are_errors(non_default_run, tmp_path, capsys):
    from pldr_jax.cli import main
    record = json.loads((non_default_run / "run_config.json").read_text())
    capsys.readouterr()
    assert main(["train", "--config", str(non_default_run / "run_config.json"), "--print-config"]) == 0
    conf = json.loads(capsys.readouterr().out)
    assert conf["train"]["learning_rate"] == 2e-3 and conf["train"]["save_every"] == 2
    assert conf["model"] == record["model"]
    for where, bad in (("train", {**record, "train": {**record["train"], "lr": 1e-3}}),
                       ("model", {**record, "model": {**record["model"], "layers": 3}}),
                       ("top", {**record, "trian": {}})):
        f = tmp_path / f"{where}.json"
        f.write_text(json.dumps(bad))
        assert main(["train", "--config", str(f), "--print-config"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("'lr'" in err[0] or "'layers'" in err[0] or "'trian'" in err[0]), err
