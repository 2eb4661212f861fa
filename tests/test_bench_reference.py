"""experiments/bench_reference.py: the parts that need neither torch nor the authors' code (argument
checking, one-line errors, the x_reference table, the rounds' ABBA order and median of ratios, the
driver over faked subprocesses) and, only where `PLDR_REFERENCE_PYTHON` (a Python with
torch + torchtune) and `PLDR_REFERENCE_SRC` (the authors' `src`) are set, their side on a tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_reference.py"
sys.path.insert(0, str(ROOT / "experiments"))
import bench_reference as br  # noqa: E402


def _fake_src(tmp_path: Path, body: str = "") -> Path:
    src = tmp_path / "src"
    (src / "pldr_model_v510").mkdir(parents=True)
    (src / "pldr_model_v510" / "pldr_model_v510.py").write_text(body)
    return src


def test_resolve_reference_src(tmp_path):
    with pytest.raises(br.ReferenceError_, match="--reference-src DIR is required"):
        br.resolve_reference_src(None)
    with pytest.raises(br.ReferenceError_, match="is not a directory"):
        br.resolve_reference_src(str(tmp_path / "nope"))
    with pytest.raises(br.ReferenceError_, match="holds no pldr_model_v510"):
        br.resolve_reference_src(str(tmp_path))
    src = _fake_src(tmp_path)
    # their `src`, the repository root above it, or the model folder itself
    for given in (src, tmp_path, src / "pldr_model_v510"):
        assert br.resolve_reference_src(str(given)) == str(src)


def test_compare_rows_ratios_and_targets():
    ours = [{"batch": 1, "mode": "kv_g", "dtype": "float32", "tokens_per_s": 100.0, "clean_runs": 3},
            {"batch": 8, "mode": "kv_g", "dtype": "bfloat16", "tokens_per_s": 300.0, "clean_runs": 2},
            {"batch": 8, "mode": "kv", "dtype": "float32", "tokens_per_s": 100.0, "clean_runs": 0},
            {"batch": 32, "mode": "kv", "dtype": "float32", "tokens_per_s": 500.0, "clean_runs": 3}]
    ref = [{"batch": 1, "mode": "kv_g", "tokens_per_s": 40.0, "clean_runs": 3},
           {"batch": 8, "mode": "kv_g", "tokens_per_s": 100.0, "clean_runs": 1},
           {"batch": 8, "mode": "kv", "tokens_per_s": 80.0, "clean_runs": 3}]
    rows = br.compare_rows(ours, ref)         # one round (no "round" key): the ratio of that round
    assert [r["x_reference"] for r in rows] == [2.5, 3.0, 1.25, None]
    assert [r["target"] for r in rows] == [2.5, 2.4, 2.0, None]
    assert [r["meets_target"] for r in rows] == [True, True, False, None]   # >= target counts as met
    assert [r["clean"] for r in rows] == [True, True, False, None]           # a side without a clean run
    assert rows[1]["reference_tokens_per_s"] == 100.0                       # bf16 ours vs their float32
    text = br.format_row(rows[2])
    assert "1.25x" in text and "NOT met" in text and "CONTENDED" in text
    assert "CONTENDED" not in br.format_row(rows[0])
    assert "x_reference -" in br.format_row(rows[3])
    assert [r["n_rounds"] for r in rows] == [1] * 4 and rows[0]["x_min"] == rows[0]["x_max"] == 2.5
    ref[0]["clean_runs"] = 0
    assert br.compare_rows(ours[:1], ref)[0]["clean"] is False


def test_side_order_is_abba():
    seq = [side for rnd in range(4) for side in br.side_order(rnd)]
    assert seq == ["reference", "ours", "ours", "reference"] * 2
    with pytest.raises(ValueError, match="round_index"):
        br.side_order(-1)


def test_compare_rows_median_of_round_ratios():
    """x_reference is the median of the per-round ratios (not the ratio of the medians), over the
    clean rounds only; min/max and every round's tokens/s of both sides are kept."""
    ours = [{"batch": 1, "mode": "kv_g", "dtype": "float32", "tokens_per_s": t, "clean_runs": c, "round": i}
            for i, (t, c) in enumerate([(80.0, 3), (60.0, 3), (70.0, 3), (90.0, 0)])]
    ref = [{"batch": 1, "mode": "kv_g", "tokens_per_s": t, "clean_runs": 3, "round": i}
           for i, t in enumerate([40.0, 20.0, 35.0, 3.0])]
    (row,) = br.compare_rows(list(reversed(ours)), ref)      # rounds sorted whatever the input order
    assert [p["x_reference"] for p in row["rounds"]] == [2.0, 3.0, 2.0, 30.0]
    assert [p["clean"] for p in row["rounds"]] == [True, True, True, False]
    assert [p["reference_first"] for p in row["rounds"]] == [True, False, True, False]
    assert row["x_reference"] == 2.0                          # median of 2.0, 3.0, 2.0; the contended 30x left out
    assert (row["x_min"], row["x_max"]) == (2.0, 3.0)
    assert row["tokens_per_s"] == 70.0 and row["reference_tokens_per_s"] == 35.0   # 70 / 35 = 2.0 by chance only
    assert (row["n_rounds"], row["clean_rounds"], row["clean"]) == (4, 3, True)
    assert row["meets_target"] is False                       # target 2.5 for batch 1 float32
    text = br.format_row(row)
    assert "2.00x (median of 3 rounds' ratios, 2.00-3.00)" in text and "1 of 4 rounds contended" in text
    assert "ours first" in br.format_round(row["rounds"][1], 1, "kv_g", "float32", 4)
    # two rounds: the median is the mean of the two ratios; the ratio of the medians would differ
    (two,) = br.compare_rows(ours[:2], ref[:2])
    assert two["x_reference"] == 2.5 and two["tokens_per_s"] / two["reference_tokens_per_s"] == 70.0 / 30.0
    # no clean round: every round counts, and the row is marked not clean
    (bad,) = br.compare_rows([dict(o, clean_runs=0) for o in ours[:3]], ref[:3])
    assert bad["x_reference"] == 2.0 and bad["clean"] is False and bad["clean_rounds"] == 0
    assert "CONTENDED" in br.format_row(bad)


def test_driver_runs_rounds_in_abba_order(tmp_path, monkeypatch, capsys):
    """The driver over faked subprocesses: per round and (batch, mode) theirs and ours in each dtype
    of that batch, in side_order; every result tagged with its round; the JSON rows are compare_rows'."""
    import pldr_jax
    from pldr_jax.params import count_params
    n_params = count_params(pldr_jax.PLDRConfig.preset("tiny"))
    calls = []

    def fake_run_json(cmd, what):
        if "--ref-check" in cmd:
            return {"ok": True, "torch": "fake", "generate_text": True}
        k = sum(c[0] == ("R" if "--ref-one" in cmd else "O") for c in calls)    # distinct speeds per call
        if "--ref-one" in cmd:
            b, m = cmd[cmd.index("--ref-one") + 1].split(",")
            calls.append(("R", int(b), m))
            return {"batch": int(b), "mode": m, "dtype": "float32", "tokens_per_s": 10.0 + k, "clean_runs": 3,
                    "tokens_per_row": [4] * int(b), "num_parameters": n_params, "loop": "mirror",
                    "mirror_matches_generate_text": None}
        b, m, d = cmd[cmd.index("--one") + 1].split(",")
        calls.append(("O", int(b), m, d))
        return {"batch": int(b), "mode": m, "dtype": d, "tokens_per_s": 30.0 + k, "clean_runs": 3}

    monkeypatch.setattr(br, "_run_json", fake_run_json)
    rc = br.main(["--reference-src", str(_fake_src(tmp_path)), "--reference-python", sys.executable, "--preset",
                  "tiny", "--configs", "1:float32,8:float32,8:bfloat16", "--modes", "kv_g", "--rounds", "2",
                  "--new-tokens", "4", "--json"])
    assert rc == 0
    assert calls == [("R", 1, "kv_g"), ("O", 1, "kv_g", "float32"),
                     ("R", 8, "kv_g"), ("O", 8, "kv_g", "float32"), ("O", 8, "kv_g", "bfloat16"),
                     ("O", 1, "kv_g", "float32"), ("R", 1, "kv_g"),
                     ("O", 8, "kv_g", "float32"), ("O", 8, "kv_g", "bfloat16"), ("R", 8, "kv_g")]
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rounds"] == 2 and [r["round"] for r in out["reference"]] == [0, 0, 1, 1]
    assert [r["round"] for r in out["ours"]] == [0, 0, 0, 1, 1, 1]
    assert [(r["batch"], r["dtype"], r["n_rounds"]) for r in out["rows"]] == [(1, "float32", 2), (8, "float32", 2),
                                                                              (8, "bfloat16", 2)]
    assert out["rows"] == br.compare_rows(out["ours"], out["reference"])


def test_parse_configs_and_hparams():
    assert br.parse_configs("1:float32, 8:bfloat16") == [(1, "float32"), (8, "bfloat16")]
    for bad in ("8", "0:float32", "8:float16", "x:float32"):
        with pytest.raises(ValueError, match="bad --configs entry"):
            br.parse_configs(bad)
    import pldr_jax
    hp = br.reference_hparams(pldr_jax.PLDRConfig.preset("v51-110m").to_dict())
    assert hp == {"num_layers": 5, "d_model": 896, "num_heads": 14, "dff": 2389, "input_vocab_size": 32000,
                  "A_dff": 170, "num_reslayerA": 8, "num_denseA": 2, "max_seq_len": 1024, "save_type": "torch"}
    with pytest.raises(br.ReferenceError_, match="learned-G"):
        br.reference_hparams(pldr_jax.PLDRConfig.preset("tiny-g").to_dict())


def test_prompts_are_bench_decodes():
    p = br.make_prompts(3, 5, 101)
    assert len(p) == 3 and all(len(r) == 5 and all(4 <= t < 101 for t in r) for r in p)
    assert p == br.make_prompts(3, 5, 101) and p != br.make_prompts(3, 5, 101, seed=2)


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("case", ["no_src", "bad_src", "bad_python", "bad_mode", "bad_what", "bad_rounds",
                                  "model_import"])
def test_cli_errors_are_one_line(tmp_path, case):
    src = _fake_src(tmp_path, "raise ImportError('no torchtune here')\n")
    args = {"no_src": [],
            "bad_src": ["--reference-src", tmp_path / "nope"],
            "bad_python": ["--reference-src", src, "--reference-python", tmp_path / "python"],
            "bad_mode": ["--reference-src", src, "--modes", "kv_g,fast"],
            "bad_what": ["--reference-src", src, "--what", "decode,train"],
            "bad_rounds": ["--reference-src", src, "--rounds", "0"],
            # this Python: no torch (CI) or torch without the authors' model importable
            "model_import": ["--reference-src", src]}[case]
    p = _run(*args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("bench_reference.py: error: "), p.stderr
    want = {"no_src": "--reference-src DIR is required", "bad_src": "is not a directory",
            "bad_python": "is not an executable file", "bad_mode": "unknown mode 'fast'",
            "bad_what": "unknown --what 'train'", "bad_rounds": "--rounds must be >= 1, got 0",
            "model_import": ("cannot import torch", "no torchtune here")}[case]
    assert any(w in lines[0] for w in (want if isinstance(want, tuple) else (want,))), lines[0]


REF_PY, REF_SRC = os.environ.get("PLDR_REFERENCE_PYTHON"), os.environ.get("PLDR_REFERENCE_SRC")


@pytest.mark.skipif(not (REF_PY and REF_SRC), reason="PLDR_REFERENCE_PYTHON / PLDR_REFERENCE_SRC not set "
                    "(a Python with torch + torchtune and the authors' src)")
@pytest.mark.parametrize("batch", [1, 3])
def test_reference_side_tiny(batch):
    """Their model on the tiny preset's hyper-parameters: every row gets all new tokens (no EOS stop),
    the parameter count is ours, and at batch 1 the mirror loop gives generate_text's ids."""
    import pldr_jax
    from pldr_jax.params import count_params
    cfg = pldr_jax.PLDRConfig.preset("tiny")
    hp = br.reference_hparams(cfg.to_dict())
    p = subprocess.run([REF_PY, str(SCRIPT), "--ref-one", f"{batch},kv_g", "--reference-src",
                        br.resolve_reference_src(REF_SRC), "--ref-hparams", json.dumps(hp), "--prompt-len", "6",
                        "--new-tokens", "5", "--reps", "1", "--max-tries", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["tokens_per_row"] == [5] * batch and r["num_parameters"] == count_params(cfg)
    assert r["prompt_first_ids"] == br.make_prompts(batch, 6, cfg.vocab_size)[0][:4]
    if batch == 1 and r["loop"] == "generate_text":
        assert r["mirror_matches_generate_text"] is True


@pytest.mark.skipif(not (REF_PY and REF_SRC), reason="PLDR_REFERENCE_PYTHON / PLDR_REFERENCE_SRC not set")
def test_reference_scoring_tiny():
    import pldr_jax
    hp = br.reference_hparams(pldr_jax.PLDRConfig.preset("tiny").to_dict())
    p = subprocess.run([REF_PY, str(SCRIPT), "--ref-score", "--reference-src", br.resolve_reference_src(REF_SRC),
                        "--ref-hparams", json.dumps(hp), "--requests", "3", "--reps", "1", "--max-tries", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["requests"] == 3 and r["scores_finite"] and r["same_scores_each_run"] and r["requests_per_s"] > 0


def test_ours_scoring_tiny():
    """Our side of the scoring comparison (no torch needed): requests/s of a finite, batched pass."""
    p = subprocess.run([sys.executable, str(SCRIPT), "--ours-score", "--preset", "tiny", "--requests", "4",
                        "--reps", "1", "--max-tries", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu",
                            "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["side"] == "ours" and r["requests"] == 4 and r["scores_finite"] and r["requests_per_s"] > 0
