"""The experiments (``experiments/*.py --quick``) and the notebooks run end to end and write sane files.

Each experiment runs as a subprocess (as a user would run it) with XLA's backend optimisations off to
keep compile times short; the notebooks are committed executed (outputs and plots visible) and are
re-executed here top to bottom with nbclient (kernel "python3", installed for the user when missing)
from ``notebooks/``, in memory (the committed files are not rewritten), writing only into temporary
directories.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
NB = ROOT / "notebooks"
FAST_XLA = "--xla_backend_optimization_level=0"
MODES = ("kv_g", "kv", "g", "none")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if FAST_XLA not in flags:
        env["XLA_FLAGS"] = (flags + " " + FAST_XLA).strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_script(name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(EXP / name), "--quick", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


# --------------------------------------------------------------------------- CLI (no JAX)
def test_parse_config_quick_and_overrides():
    sys.path.insert(0, str(EXP))
    try:
        import ablation
        import cache_fidelity
        import decode_speed
    finally:
        sys.path.remove(str(EXP))
    cfg = ablation.parse_config(ablation.AblationConfig, ["--quick", "--steps", "5", "--variants",
                                                          "learned,identity", "--no-compile-cache"],
                                ablation.QUICK, "")
    assert cfg.quick and cfg.steps == 5 and cfg.variants == ("learned", "identity")
    assert cfg.d_model == ablation.QUICK["d_model"] and cfg.compile_cache is False and cfg.fast_compile
    default = ablation.parse_config(ablation.AblationConfig, [], ablation.QUICK, "")
    assert default == ablation.AblationConfig() and not default.quick
    cf = ablation.parse_config(cache_fidelity.CacheFidelityConfig, ["--prompts", "a, b|c"], cache_fidelity.QUICK, "")
    assert cf.prompts == ("a, b", "c")
    ds = ablation.parse_config(decode_speed.DecodeSpeedConfig, ["--batches", "1,2"], decode_speed.QUICK, "")
    assert ds.batches == (1, 2)
    with pytest.raises(SystemExit):
        ablation.parse_config(ablation.AblationConfig, ["--no-such-option", "1"], ablation.QUICK, "")


# --------------------------------------------------------------------------- experiments
@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ablation")
    out, wd = base / "results", base / "runs"
    run_script("ablation.py", "--out", out, "--workdir", wd)
    return out, wd


def test_ablation_quick(ablation_run):
    out, wd = ablation_run
    for name in ("metrics.json", "table.csv", "table.md", "curves.csv"):
        assert (out / name).is_file(), name
    assert is_png(out / "curves.png") and is_png(out / "transferred_G_LM.png")
    rows = read_csv(out / "table.csv")
    assert [r["variant"] for r in rows] == ["learned", "identity", "random_normal", "random_uniform", "transferred"]
    for r in rows:
        for k in ("final_train_loss", "final_train_accuracy", "val_loss", "val_accuracy", "val_perplexity", "wall_s"):
            assert math.isfinite(float(r[k])), (r["variant"], k, r[k])
        assert 0 < float(r["val_loss"]) < 10 and 0 <= float(r["val_accuracy"]) <= 1
        assert int(r["steps"]) > 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["runs"]) == {r["variant"] for r in rows}
    assert m["transfer"]["g_finite"] and len(m["transfer"]["prompt_ids"]) > 0
    # same budget and data for every variant
    assert len({r["tokens_seen"] for r in rows}) == 1
    # predefined-G variants have fewer parameters (no metric learner / PLGA weights)
    params = {r["variant"]: int(r["params"]) for r in rows}
    assert all(params[v] < params["learned"] for v in params if v != "learned")
    curves = read_csv(out / "curves.csv")
    assert {c["variant"] for c in curves} == set(params) and all(math.isfinite(float(c["loss"])) for c in curves)
    assert (wd / "learned" / "checkpoints").is_dir()


def test_cache_fidelity_quick(ablation_run, tmp_path):
    _, wd = ablation_run
    out = tmp_path / "cf"
    run_script("cache_fidelity.py", "--checkpoint", wd / "learned", "--out", out, "--workdir", tmp_path / "runs")
    for name in ("ids.json", "logit_deltas.csv", "modes.csv", "modes.md", "deductive_comparison.csv",
                 "deductive_comparison.md", "same_prefix_summary.csv", "fidelity.json"):
        assert (out / name).is_file(), name
    assert is_png(out / "g_lm_drift.png")
    res = json.loads((out / "fidelity.json").read_text())
    assert res["model"]["source"] == "checkpoint"
    modes = {r["mode"]: r for r in res["modes"]}
    assert tuple(modes) == MODES
    ids = json.loads((out / "ids.json").read_text())["modes"]
    assert set(ids) == set(MODES)
    # KV-only recomputes G from the cached prompt-time A: the same tokens and G as KV+G
    assert ids["kv"]["tokens"] == ids["kv_g"]["tokens"]
    assert modes["kv"]["max_G_LM_rmse_vs_kv_g"] < 1e-5 and modes["kv_g"]["max_logit_delta_all"] == 0
    assert modes["g"]["max_logit_delta_same_prefix"] < 1e-3
    for r in res["modes"]:
        assert all(finite(r[k]) for k in ("max_logit_delta_all", "max_G_LM_drift", "tokens_per_s")), r
    comp = read_csv(out / "deductive_comparison.csv")
    assert {(c["mode"], c["tensor"]) for c in comp} == {(m, t) for m in MODES for t in ("A_LM", "G_LM")}
    assert all(math.isfinite(float(c["max_rmse_vs_kv_g"])) for c in comp)
    deltas = read_csv(out / "logit_deltas.csv")
    assert {d["mode"] for d in deltas} == set(MODES)


def test_decode_speed_quick(tmp_path):
    out = tmp_path / "ds"
    run_script("decode_speed.py", "--out", out)
    for name in ("speed.json", "speed.csv", "speed_pivot.csv", "speed.md"):
        assert (out / name).is_file(), name
    assert is_png(out / "speed.png")
    rows = read_csv(out / "speed.csv")
    assert {(r["model"], int(r["batch"]), r["mode"]) for r in rows} == {("tiny", b, m) for b in (1, 4) for m in MODES}
    assert all(float(r["tokens_per_s"]) > 0 and math.isfinite(float(r["tokens_per_s"])) for r in rows)
    assert "kv_g / none" in (out / "speed.md").read_text()


def test_bench_decode_ablate_attention_quick():
    """bench_decode's row: step / floor measured in one process; with --ablate-attention the same
    configuration runs again in its own process without the decode attention (its tokens differ:
    the ablation reached the traced step) and the row gains that process's step / floor."""
    p = run_script("bench_decode.py", "--preset", "tiny", "--batches", "2", "--modes", "kv_g", "--dtypes", "float32",
                   "--max-tries", "1", "--prompt-len", "8", "--new-tokens", "8", "--ablate-attention", "--json")
    r = json.loads(p.stdout.strip().splitlines()[-1])["details"][0]
    assert r["batch"] == 2 and r["ablated_ids_differ"]
    for k in ("step_ms", "floor_ms", "step_ms_without_attention", "floor_ms_without_attention"):
        assert finite(r[k]) and r[k] > 0, k
    assert r["without_attention_over_floor"] == pytest.approx(r["step_ms_without_attention"] / r["floor_ms_without_attention"])
    # paired: one floor run after each timed decode run, the median of the per-run ratios
    assert len(r["paired_floor_ms"]) == len(r["paired_step_over_floor"]) >= 1
    assert all(finite(f) and f > 0 for f in r["paired_floor_ms"])
    assert r["step_over_floor_paired"] == pytest.approx(statistics.median(r["paired_step_over_floor"]))
    assert finite(r["without_attention_over_floor_paired"])


def test_bench_decode_attention_quick():
    """Every decode-attention form agrees with the batched dots the CPU step uses (the live-slot
    chunks too) and gets a time and a ratio; the bytes floor is positive."""
    p = run_script("bench_decode_attention.py", "--json")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["live"] < r["slots"] and r["bytes_floor_ms"] > 0
    forms = r["forms"]
    assert {"dots", "dots_kt", "reduce_kt", "reduce", "plga", "plga_chunks", "split2"} <= set(forms)
    for name, f in forms.items():
        if "error" in f:                      # an XLA option this jaxlib lacks is reported, not fatal
            assert name.startswith("dots+"), name
            continue
        assert finite(f["ms_per_step"]) and f["ms_per_step"] > 0 and f["max_abs_diff"] < 1e-5, (name, f)
    assert forms["dots"]["vs_dots"] == 1.0


def test_bench_eval_quick():
    """Every way of scoring (one at a time, packed, batched with and without shared contexts) gives
    one-at-a-time's scores (float32 rounding of other batch shapes aside); mode "full" never packs."""
    p = run_script("bench_eval.py", "--json", "--modes", "full,cached")
    rows = json.loads(p.stdout.strip().splitlines()[-1])["results"]
    assert [r["mode"] for r in rows] == ["full", "cached"]
    for r in rows:
        ways = {"one", "batched_unshared", "batched"} | ({"one_packed"} if r["mode"] == "cached" else set())
        assert r["requests"] == 16 and ways <= set(r)
        assert ("one_packed" in r) == (r["mode"] == "cached")
        for w in ways:
            x = r[w]
            assert x["same_is_greedy"] and x["max_rel_score_diff"] < 1e-4, (r["mode"], w, x)
            assert finite(x["req_per_s"]) and x["speedup"] > 0


def test_profile_decode_quick():
    """The decode-loop profile finds the step's operations and sorts every one into a category; the
    categorizer tells weight products from batched attention products."""
    p = run_script("profile_decode.py", "--json", "--top", "50")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    cats = res["thread_ms_per_step"]
    assert set(cats) == {"weight matmul", "attention dot", "softmax", "cache write", "native attention", "other"}
    assert res["steps"] >= 1 and finite(res["wall_ms_per_step"]) and res["thread_ms_total"] > 0
    assert cats["weight matmul"] > 0 and cats["cache write"] > 0
    assert all(o["category"] in cats and o["ms_per_step"] >= 0 for o in res["ops"])
    sys.path.insert(0, str(EXP))
    try:
        from profile_decode import categorize
    finally:
        sys.path.remove(str(EXP))
    comps = {"f": "  %d = f32[448,1,128]{2,1,0} dot(%a, %b), lhs_batch_dims={0}, lhs_contracting_dims={2}",
             "g": "  %d = f32[32,896]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}"}
    assert categorize("  %x = f32[448,1,128]{2,1,0} fusion(%p), kind=kCustom, calls=%f", comps, 448) == "attention dot"
    assert categorize("  %x = f32[32,896]{1,0} fusion(%p), kind=kCustom, calls=%g", comps, 448) == "weight matmul"
    assert categorize("  %s = f32[2,4,8,16]{3,2,1,0} scatter(%a, %i, %u)", {}, 448) == "cache write"
    exp = {"e": "  %e = f32[448,1,128]{2,1,0} exponential(%s)", "n": "  %r = f32[32,1]{1,0} reduce(%a, %z)\n"
           "  %a = f32[32,1,896]{2,1,0} multiply(%x, %x)"}
    assert categorize("  %x = f32[448,1,128]{2,1,0} fusion(%p), kind=kLoop, calls=%e", exp, 448) == "softmax"
    assert categorize("  %x = f32[32,1]{1,0} fusion(%p), kind=kLoop, calls=%n", exp, 448) == "other"
    native = ('  %c = (f32[32,14,64]{2,1,0}, bf16[32,14,128,64]{3,2,1,0}) custom-call(%q, %g), '
              'custom_call_target="pldr_decode_attention", api_version=API_VERSION_TYPED_FFI')
    assert categorize(native, {}, 448) == "native attention"
    packed = ('  %m = f32[32,2688]{1,0} custom-call(%x, %w, %b), custom_call_target="pldr_packed_matmul", '
              'api_version=API_VERSION_TYPED_FFI')
    assert categorize(packed, {}, 448) == "weight matmul"


def test_prefill_ablation_quick():
    """The prefill ablation times the built prefill, the one before issue 13's prefill changes and a
    removal beside the floor, in one process."""
    p = run_script("prefill_ablation.py", "--json", "--variants", "prefill,before,no_rope")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    rows = {r["variant"]: r for r in res["variants"]}
    assert set(rows) == {"prefill", "before", "no_rope"} and finite(res["floor_min_ms"]) and res["floor_min_ms"] > 0
    assert all(finite(r["min_ms"]) and r["min_ms"] > 0 and finite(r["over_floor"]) for r in rows.values())
    assert rows["prefill"]["minus_prefill_ms"] == 0.0


# --------------------------------------------------------------------------- notebooks
def _ensure_kernel() -> str:
    from jupyter_client.kernelspec import KernelSpecManager
    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True,
                       capture_output=True)
    return "python3"


@pytest.mark.parametrize("name", ["quickstart", "exploration"])
def test_notebook_runs(name, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = NB / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "notebook has no code cells"
    # committed executed, top to bottom, without errors and with its plots (what a reader sees online)
    assert [c.get("execution_count") for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name} must be committed executed in order (run it top to bottom and save)"
    committed = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in committed if o.get("output_type") == "error"], f"{path.name} has error outputs"
    assert [o for o in committed if "image/png" in o.get("data", {})], f"{path.name} is committed without plots"
    for c in code:  # re-executed here from scratch, in memory: the committed file is never rewritten
        c.outputs, c.execution_count = [], None
    for k, v in _env().items():   # the kernel inherits the environment: fast compiles, short training
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PLDR_QUICKSTART_STEPS", "20")
    monkeypatch.setenv("PLDR_EXPLORATION_STEPS", "20")
    monkeypatch.delenv("PLDR_QUICKSTART_CHECKPOINT", raising=False)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=_ensure_kernel(),
                                     resources={"metadata": {"path": str(NB)}})
    client.execute()   # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the notebook should draw plots"


def test_bench_packed_matmul_quick():
    """Both forms of the decode weight products run and agree with a float64 product; the ratio is
    printed, not asserted (a timing)."""
    p = run_script("bench_packed_matmul.py", "--preset", "tiny", "--rows", "1,9", "--dtypes", "float32,bfloat16",
                   "--json")
    res = json.loads(p.stdout.strip().splitlines()[-1])["results"]
    assert [(r["rows"], r["dtype"]) for r in res] == [(1, "float32"), (9, "float32"), (1, "bfloat16"), (9, "bfloat16")]
    for r in res:
        assert finite(r["xla_ms"]) and finite(r["packed_ms"]) and r["ratio"] == pytest.approx(r["xla_ms"] / r["packed_ms"])
        tol = 1e-5 if r["dtype"] == "float32" else 0.1
        assert r["max_err_packed"] < tol and r["max_err_xla"] < tol, r


def test_compare_commits_rounds_and_bad_base():
    """compare_commits: ABBA side order, ratios median / spread over rounds, and an unknown --base
    refused in one line with exit 2 (nothing run)."""
    sys.path.insert(0, str(EXP))
    try:
        import compare_commits as cc
    finally:
        sys.path.remove(str(EXP))
    assert [cc.side_order(i) for i in range(4)] == [("base", "head"), ("head", "base")] * 2
    rounds = [{"base": {"tokens_per_s": b}, "head": {"tokens_per_s": h}} for b, h in [(10, 11), (10, 9), (20, 21)]]
    s = cc.summarise(rounds)
    assert s["ratio_median"] == pytest.approx(1.05) and s["ratio_min"] == pytest.approx(0.9)
    assert s["within_noise"] and s["base_tokens_per_s"] == 10 and s["head_tokens_per_s"] == 11
    assert not cc.summarise(rounds[:1])["within_noise"]
    p = subprocess.run([sys.executable, str(EXP / "compare_commits.py"), "--base", "no-such-ref-xyz"],
                       capture_output=True, text=True)
    if subprocess.run(["git", "-C", str(EXP.parent), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert p.returncode == 2 and "no-such-ref-xyz" in p.stderr and len(p.stderr.strip().splitlines()) == 1
