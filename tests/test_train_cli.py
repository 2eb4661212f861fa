"""`pldr-jax train` from the command line: preset defaults, one-line refusals before any work."""

from __future__ import annotations

import json
import os
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
