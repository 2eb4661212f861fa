"""Hardening: configs from files, mesh / batch checks, G_LM arguments, non-finite steps, checkpoint
directory preflight, corrupted checkpoints (detection, fallback to the previous good one), and
the training loop using all of them.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pldr_jax
from pldr_jax import PLDRConfig
from pldr_jax.train import faults
from pldr_jax.train.faults import (CheckpointDirError, FaultPolicy, NonFiniteError, NonFiniteMonitor,
                                   apply_gradients_guarded, estimate_checkpoint_bytes, preflight_checkpoint_dir)

TINY = PLDRConfig.preset("tiny")
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# reading a deliberately truncated checkpoint leaves orbax read coroutines that report on teardown
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# =========================================================================== configs from files
def test_config_from_json_file_round_trips_all_formats(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(TINY.to_json())
    assert PLDRConfig.from_json_file(p) == TINY
    assert PLDRConfig.from_json_file(p, max_seq_len=32) == TINY.replace(max_seq_len=32)
    run = tmp_path / "run_config.json"
    run.write_text(json.dumps({"model": TINY.to_dict(), "train": {}}))
    assert PLDRConfig.from_json_file(run) == TINY
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"hyperparameters": dict(num_layers=2, d_model=32, num_heads=4, dff=85, A_dff=16,
                                                        num_reslayerA=2, num_denseA=2, input_vocab_size=101,
                                                        max_seq_len=64)}))
    assert PLDRConfig.from_json_file(ref) == TINY


@pytest.mark.parametrize("content,match", [
    (b"{not json", "not valid UTF-8 JSON"),
    (b'{"num_layers": "\xff"}', "not valid UTF-8 JSON"),
    (b"[1, 2]", "must hold a JSON object"),
    (b'{"num_layers": 2}', r"lacks required fields: \['d_model'"),
    (b'{"num_layer": 2}', r"unknown PLDRConfig fields: \['num_layer'\]"),
])
def test_config_file_errors_name_the_file(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        PLDRConfig.from_json_file(p)
    assert "bad.json" in str(e.value)


@pytest.mark.parametrize("field,value,match", [
    ("num_heads", 0, "num_heads must be a positive int"), ("d_model", 30, "divisible by num_heads"),
    ("vocab_size", 2, "vocab_size must be >= 4"), ("dtype", "float64", "dtype must be one of"),
    ("rope_theta", 0.5, "rope_theta must be a finite number > 1"), ("max_seq_len", -1, "max_seq_len"),
])
def test_config_file_out_of_range_names_field_and_file(tmp_path, field, value, match):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({**TINY.to_dict(), field: value}))
    with pytest.raises(ValueError, match=match) as e:
        PLDRConfig.from_json_file(p)
    assert "cfg.json" in str(e.value) and field in str(e.value)


def test_config_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        PLDRConfig.from_json_file(tmp_path / "nope.json")


# =========================================================================== mesh / batch, G_LM
class _FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


@pytest.mark.parametrize("batch,accum,shape,match", [
    (6, 1, dict(data=4, fsdp=1, tensor=1), "not divisible by the 4 batch shards"),
    (8, 3, dict(data=1, fsdp=1, tensor=1), "grad_accum=3"),
    (8, 2, dict(data=2, fsdp=4, tensor=1), "micro-batch 4 .* 8 batch shards"),
])
def test_batch_that_does_not_split_over_the_mesh(batch, accum, shape, match):
    from pldr_jax.train.sharding import check_batch_size
    with pytest.raises(ValueError, match=match):
        check_batch_size(batch, _FakeMesh(**shape), accum)
    check_batch_size(16, _FakeMesh(data=2, fsdp=2, tensor=1), 2)


def test_g_lm_given_as_nested_list_is_validated():
    from pldr_jax.model import normalize_g_lm
    with pytest.raises(ValueError, match="g_lm has shape"):
        normalize_g_lm(TINY, [[1.0, 0.0], [0.0, 1.0]])
    g = normalize_g_lm(TINY, np.zeros((2, 4, 8, 8)).tolist())
    assert g.shape == (2, 1, 4, 8, 8) and g.dtype == jnp.float32


# =========================================================================== non-finite steps
def test_fault_policy_validation():
    assert FaultPolicy().nonfinite == "skip" and FaultPolicy().guard
    assert not FaultPolicy("off").guard and FaultPolicy("stop").per_step_check
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        FaultPolicy("ignore")
    with pytest.raises(ValueError, match="max_skipped"):
        FaultPolicy("skip", max_skipped=-1)


@pytest.fixture(scope="module")
def guarded_step():
    """A jitted step of the real model whose loss is scaled by batch["scale"] (inf -> non-finite)."""
    from pldr_jax.train import create_train_state, make_optimizer
    from pldr_jax.train.step import loss_terms
    cfg = PLDRConfig(num_layers=1, d_model=16, num_heads=2, dff=24, vocab_size=20, max_seq_len=8, A_dff=4,
                     num_reslayerA=1, num_denseA=1)
    tx = make_optimizer(1e-2, 1, 10)
    state = create_train_state(cfg, tx, 0)

    @jax.jit
    def step(state, batch):
        def obj(p):
            t = loss_terms(cfg, p, batch["inputs"], batch["targets"])
            return t["ce_sum"] / jnp.maximum(t["count"], 1.0) * batch["scale"]
        loss, grads = jax.value_and_grad(obj)(state.params)
        new, ok = apply_gradients_guarded(state, grads, tx, loss)
        return new, {"loss": loss, "nonfinite": 1.0 - ok.astype(jnp.float32)}

    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(1, 20, (2, 8)), jnp.int32),
             "targets": jnp.asarray(rng.integers(1, 20, (2, 8)), jnp.int32)}
    return step, state, batch


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_step_is_skipped_and_counted(guarded_step, bad):
    step, state0, batch = guarded_step
    s1, m1 = step(state0, {**batch, "scale": jnp.float32(1.0)})
    assert float(m1["nonfinite"]) == 0.0 and int(s1.step) == 1
    s2, m2 = step(s1, {**batch, "scale": jnp.float32(bad)})
    assert float(m2["nonfinite"]) == 1.0 and not np.isfinite(float(m2["loss"]))
    assert int(s2.step) == 2  # the batch is consumed ...
    for a, b in zip(jax.tree_util.tree_leaves((s1.params, s1.opt_state)),
                    jax.tree_util.tree_leaves((s2.params, s2.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # ... the update is not applied
    s3, m3 = step(s2, {**batch, "scale": jnp.float32(1.0)})
    assert float(m3["nonfinite"]) == 0.0 and faults.tree_all_finite(s3.params)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree_util.tree_leaves(s2.params), jax.tree_util.tree_leaves(s3.params)))


def test_nonfinite_monitor_policies():
    logs = []
    m = NonFiniteMonitor(FaultPolicy("skip"), log=logs.append)
    assert [m.observe(s, ok) for s, ok in [(1, True), (2, False), (3, 1.0), (4, 0.0)]] == [False] * 4
    assert m.skipped == 2 and m.skipped_steps == [2, 4] and "step 2" in logs[0] and "skipped" in logs[0]
    m = NonFiniteMonitor(FaultPolicy("skip", max_skipped=1), log=logs.append)
    assert not m.observe(1, False) and m.observe(2, False)
    with pytest.raises(NonFiniteError, match="more than max_skipped=1"):
        m.raise_stop("ckpt/2")
    m = NonFiniteMonitor(FaultPolicy("stop"), log=logs.append)
    assert not m.observe(1, True) and m.observe(2, jnp.bool_(False))
    with pytest.raises(NonFiniteError, match=r"step 2 \(policy 'stop'\); the last good state was saved as "
                                             r"checkpoint ckpt/2"):
        m.raise_stop("ckpt/2")
    assert not NonFiniteMonitor(FaultPolicy("off")).observe(1, False)


# =========================================================================== preflight
def test_preflight_ok_and_estimate(tmp_path):
    from pldr_jax.train import make_optimizer
    from pldr_jax.train.state import create_train_state
    d = preflight_checkpoint_dir(tmp_path / "a" / "b", required_bytes=1000)
    assert d.is_dir() and list(d.iterdir()) == []  # the probe is gone
    abstract = jax.eval_shape(lambda: create_train_state(TINY, make_optimizer(1e-3, 1, 10), 0))
    n = estimate_checkpoint_bytes(abstract)
    assert 3 * 4 * pldr_jax.count_params(TINY) <= n <= 3 * 4 * pldr_jax.count_params(TINY) + 1024


def test_preflight_errors(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointDirError, match="exists and is not a directory"):
        preflight_checkpoint_dir(f)
    with pytest.raises(CheckpointDirError, match="cannot create checkpoint directory"):
        preflight_checkpoint_dir(f / "ckpt")
    with pytest.raises(CheckpointDirError, match="cannot create|not writable"):
        preflight_checkpoint_dir("/proc/pldr_ckpt_test")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(faults.shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=10 * 2**20))
    with pytest.raises(CheckpointDirError, match=r"not enough free disk space .* 10.0 MiB free.*100.0 MiB"):
        preflight_checkpoint_dir(tmp_path / "small", required_bytes=100 * 2**20)
    monkeypatch.undo()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(faults.os, "write", full)
    with pytest.raises(CheckpointDirError, match="not writable: the disk is full"):
        preflight_checkpoint_dir(tmp_path / "full")
    monkeypatch.undo()
    assert not any(p.name.startswith(".pldr_write_probe") for p in (tmp_path / "full").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_preflight_read_only_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(CheckpointDirError, match="permission denied"):
            preflight_checkpoint_dir(d)
    finally:
        d.chmod(0o700)


# =========================================================================== corrupted checkpoints
@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """A 4-step straight run, and a run of the same 4 steps (checkpoints 2, 3, 4 kept)."""
    from pldr_jax.train.loop import train
    from .test_checkpoint import setup_run
    root = tmp_path_factory.mktemp("hard")
    cfg, tc, tok, docs = setup_run(root)
    tc = tc.replace(steps=4, eval_every=0, validation_fraction=0.0, keep_checkpoints=3, async_checkpoint=False)
    kw = dict(tokenizer=tok, documents=docs, compiler_options=FAST_COMPILE, log=lambda *a, **k: None)
    straight = train(cfg, tc.replace(workdir=str(root / "straight")), **kw)
    return dict(root=root, cfg=cfg, tc=tc, kw=kw, straight=straight)


def _fresh_copy(small_runs, name):
    src = Path(small_runs["straight"].paths["workdir"])
    dst = small_runs["root"] / name
    shutil.copytree(src, dst)
    return dst


def _array_files(step_dir: Path) -> list[Path]:
    return sorted((Path(p) for p in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)),
                  key=lambda p: p.stat().st_size)


def _truncate_biggest_array_file(step_dir: Path):
    big = _array_files(step_dir)[-1]
    with open(big, "r+b") as fh:
        fh.truncate(big.stat().st_size // 2)


def _flip_bytes(path: Path, n: int = 1, at: float = 0.5):
    b = bytearray(path.read_bytes())
    for i in range(int(len(b) * at), int(len(b) * at) + n):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def _resume(small_runs, wd, **kw):
    from pldr_jax.train.loop import train
    return train(small_runs["cfg"], small_runs["tc"].replace(workdir=str(wd), resume=True, **kw), **small_runs["kw"])


def _assert_exact_continuation(small_runs, r, start):
    s = small_runs["straight"]
    assert (r.start_step, r.end_step) == (start, 4) and r.losses == s.losses[start:]
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(r.state.params)),
                    jax.tree_util.tree_leaves(jax.device_get(s.state.params))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["truncate_array", "delete_array", "truncate_metadata", "remove_state",
                                    "garbage_config", "remove_orbax_metadata", "flip_bytes"])
def test_resume_quarantines_proven_corruption_and_falls_back(small_runs, damage):
    """Each kind of damage to the newest checkpoint (written by train(), so with a digest) is proven
    corruption: the step is moved to checkpoints.corrupt/ (not deleted), reported in the result, and the
    run resumes from the previous step, ending bitwise where the uninterrupted run ended."""
    wd = _fresh_copy(small_runs, f"damage_{damage}")
    ck = wd / "checkpoints"
    shutil.rmtree(ck / "4")  # as if killed after checkpoint 3 ...
    d = ck / "3"             # ... which is then damaged
    want = {"truncate_array": "state arrays unreadable", "delete_array": "state arrays unreadable",
            "truncate_metadata": "state metadata unreadable", "remove_state": "item 'state' missing",
            "garbage_config": "config item unreadable", "remove_orbax_metadata": "orbax checkpoint metadata missing",
            "flip_bytes": "do not match the digest"}[damage]
    if damage == "truncate_array":
        _truncate_biggest_array_file(d)
    elif damage == "delete_array":
        _array_files(d)[-1].unlink()
    elif damage == "truncate_metadata":
        (d / "state" / "_METADATA").write_text((d / "state" / "_METADATA").read_text()[:50])
    elif damage == "remove_state":
        shutil.rmtree(d / "state")
    elif damage == "garbage_config":
        (d / "config" / "metadata").write_text("{garbage")
    elif damage == "remove_orbax_metadata":
        (d / "_CHECKPOINT_METADATA").unlink()
    else:  # a single flipped byte inside the largest array file: orbax reads it without complaint
        _flip_bytes(_array_files(d)[-1], n=1, at=0.6)
    r = _resume(small_runs, wd)
    _assert_exact_continuation(small_runs, r, 2)
    assert r.resumed_from == 2 and [q["step"] for q in r.quarantined] == [3]
    assert any(want in p for p in r.quarantined[0]["problems"]), r.quarantined
    moved = list((wd / "checkpoints.corrupt").iterdir())
    assert [m.name.split("-")[0] for m in moved] == ["3"] and str(moved[0]) == r.quarantined[0]["moved_to"]
    recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any(x.get("kind") == "resume" and x["quarantined"][0]["step"] == 3 for x in recs)


def test_digest_is_written_by_train_and_matches_the_saved_state(small_runs):
    from pldr_jax.train.integrity import DIGEST_ALGORITHM, tree_digest
    from pldr_jax.train.resume import restore_state
    from pldr_jax.train.sharding import abstract_train_state, make_mesh
    ck = Path(small_runs["straight"].paths["checkpoints"])
    conf = json.loads((ck / "4" / "config" / "metadata").read_text())
    assert conf["digest"]["algorithm"] == DIGEST_ALGORITHM
    tx, _ = small_runs["tc"].optimizer()
    state = restore_state(ck / "4" / "state", abstract_train_state(small_runs["cfg"], tx, make_mesh(1, 1, 1)))
    assert tree_digest(state) == conf["digest"]["leaves"] == tree_digest(small_runs["straight"].state)
    assert len(conf["digest"]["leaves"]) == len(jax.tree_util.tree_leaves(state))


def test_checkpoint_without_digest_is_accepted_with_a_note(small_runs):
    wd = _fresh_copy(small_runs, "no_digest")
    ck = wd / "checkpoints"
    shutil.rmtree(ck / "4")
    meta = ck / "3" / "config" / "metadata"
    conf = json.loads(meta.read_text())
    conf.pop("digest")
    meta.write_text(json.dumps(conf))
    r = _resume(small_runs, wd)
    _assert_exact_continuation(small_runs, r, 3)
    assert not r.quarantined and any("no digest" in n for n in r.notes)


def test_failures_that_are_not_corruption_move_nothing(small_runs, monkeypatch):
    """A changed optimiser structure, or a read that times out, stops the resume with a message;
    no checkpoint is moved and nothing starts from step 0."""
    from pldr_jax.train import resume as resume_mod
    from pldr_jax.train.resume import ResumeError
    wd = _fresh_copy(small_runs, "not_corrupt")
    ck = wd / "checkpoints"
    before = sorted(p.name for p in ck.iterdir())
    with pytest.raises(ResumeError, match="different model config"):
        _resume(small_runs, wd, dtype="bfloat16")
    for exc, match in ((TimeoutError("DEADLINE_EXCEEDED: reading took too long"), "TimeoutError"),
                       (ValueError("restore item and on-disk metadata tree structures do not match"),
                        "not proof of corruption")):
        def fail(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(resume_mod, "restore_state", fail)
        with pytest.raises(ResumeError, match=match):
            _resume(small_runs, wd)
    assert sorted(p.name for p in ck.iterdir()) == before and not (wd / "checkpoints.corrupt").exists()


def test_every_checkpoint_corrupt_refuses_to_start_from_zero(small_runs):
    from pldr_jax.train.resume import ResumeError
    wd = _fresh_copy(small_runs, "all_corrupt")
    for step in (2, 3, 4):
        _truncate_biggest_array_file(wd / "checkpoints" / str(step))
    with pytest.raises(ResumeError, match="no usable checkpoint"):
        _resume(small_runs, wd)
    assert sorted(p.name.split("-")[0] for p in (wd / "checkpoints.corrupt").iterdir()) == ["2", "3", "4"]


def test_is_corruption_tells_data_errors_from_the_rest():
    from pldr_jax.train.integrity import is_corruption

    def chained(outer, inner):
        try:
            try:
                raise inner
            except BaseException as e:
                raise outer from e
        except BaseException as e:
            return e
    assert is_corruption(chained(Exception("Encountered error while reading array index"),
                                 ValueError("DATA_LOSS: Error reading ... checksum mismatch")))
    assert is_corruption(ValueError('OUT_OF_RANGE: Error reading "w/0.0": Requested byte range'))
    assert is_corruption(ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream"))
    assert is_corruption(json.JSONDecodeError("x", "{", 0))
    for e in (AssertionError("sync_global_devices name mismatch"), ValueError("Topology mismatch"),
              TimeoutError("DEADLINE_EXCEEDED"), ImportError("no module named tensorstore"),
              ValueError("PERMISSION_DENIED: open failed"), ValueError("UNAVAILABLE: Connection reset"),
              MemoryError(), ValueError("User-provided restore item and on-disk value metadata tree structures "
                                        "do not match")):
        assert not is_corruption(e), e


def test_loop_skips_nonfinite_steps(small_runs):
    from pldr_jax.train.loop import train
    root = small_runs["root"] / "nonfinite"
    r = train(small_runs["cfg"], small_runs["tc"].replace(workdir=str(root), learning_rate=1e30, steps=3,
                                                          warmup_steps=0, clip_value=None),
              **small_runs["kw"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(jax.device_get(r.state.params)))
    assert sum(m.get("nonfinite", 0.0) for m in r.step_metrics) >= 1


def test_loop_reports_unusable_checkpoint_dir_before_training(small_runs):
    from pldr_jax.train.loop import train
    f = small_runs["root"] / "a_file"
    f.write_text("x")
    with pytest.raises(CheckpointDirError):
        train(small_runs["cfg"], small_runs["tc"].replace(workdir=str(f / "run")), **small_runs["kw"])


def test_loop_stop_policy_saves_last_good_state_then_raises(small_runs):
    from pldr_jax.train.checkpoint import load_params
    from pldr_jax.train.loop import train
    root = small_runs["root"] / "nonfinite_stop"
    with pytest.raises(NonFiniteError, match="non-finite loss or gradients at step") as e:
        train(small_runs["cfg"], small_runs["tc"].replace(workdir=str(root), learning_rate=1e30, steps=3,
                                                          warmup_steps=0, clip_value=None, nonfinite="stop"),
              **small_runs["kw"])
    assert "saved as checkpoint" in str(e.value)
    cfg, params, _ = load_params(root / "checkpoints")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
