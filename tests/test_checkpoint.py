"""Orbax checkpoints through the training loop: exact resume, keep-last-N, configs, other meshes.

* 2N steps straight == N steps, stop, `resume`, N steps: the same per-step losses and the same
  final parameters, bitwise (same compiled step, restored params / optimiser state / step / RNG
  and data-iterator position), with asynchronous saves every step and keep-last-2.
* A checkpoint written on one device restores onto an 8-device (data 2, fsdp 2, tensor 2) mesh in
  a subprocess (values bitwise equal, arrays sharded) and training continues there; the
  continuation matches continuing on one device (losses 1e-5 relative, parameters as in
  tests/test_sharding.py).

Run as a script (``python tests/test_checkpoint.py WORKDIR OUT.npz``) it is that subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

N = 2
FAST_COMPILE = {"xla_backend_optimization_level": 0}
LR_SUM = 1e-2 * 2 * N  # an upper bound of the summed learning rate of the continued steps


def setup_run(tok_dir: Path):
    """(model cfg, TrainConfig, tokenizer, documents): a small model on part of the embedded corpus."""
    import pldr_jax
    from pldr_jax.data import Tokenizer, default_corpus_documents
    from pldr_jax.train.loop import TrainConfig
    docs = default_corpus_documents()[:60]
    tok_file = tok_dir / "tok.model"
    tok = Tokenizer.load(tok_file) if tok_file.exists() else Tokenizer.train(docs, tok_dir / "tok", 128)
    cfg = pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=tok.vocab_size,
                              max_seq_len=32, A_dff=8, num_reslayerA=1, num_denseA=1)
    tc = TrainConfig(workdir=str(tok_dir / "unused"), steps=2 * N, total_steps=10, seq_len=16, batch_size=8,
                     learning_rate=1e-2,
                     warmup_steps=1, log_every=1, eval_every=N, eval_batches=2, save_every=1, keep_checkpoints=2,
                     validation_fraction=0.1, progress=False, plot=False, tensorboard=False)
    return cfg, tc, tok, docs


def _flat(tree):
    import jax
    return {jax.tree_util.keystr(kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(
        jax.device_get(tree))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pldr_jax.train.loop import train
    root = tmp_path_factory.mktemp("ckpt")
    cfg, tc, tok, docs = setup_run(root)
    kw = dict(tokenizer=tok, documents=docs, compiler_options=FAST_COMPILE, log=lambda *a, **k: None)
    straight = train(cfg, tc.replace(workdir=str(root / "straight"), plot=True), **kw)
    first = train(cfg, tc.replace(workdir=str(root / "resumed"), steps=N), **kw)
    second = train(cfg, tc.replace(workdir=str(root / "resumed"), resume=True), **kw)
    return dict(root=root, cfg=cfg, tc=tc, tok=tok, docs=docs, straight=straight, first=first, second=second)


def test_resume_is_exact(runs):
    s, a, b = runs["straight"], runs["first"], runs["second"]
    assert (a.start_step, a.end_step, b.start_step, b.end_step) == (0, N, N, 2 * N)
    assert len(s.losses) == 2 * N and all(np.isfinite(s.losses))
    assert a.losses + b.losses == s.losses  # bitwise
    fs, fb = _flat(s.state.params), _flat(b.state.params)
    for k in fs:
        np.testing.assert_array_equal(fb[k], fs[k], err_msg=k)
    for x, y in zip(_flat(s.state.opt_state).values(), _flat(b.state.opt_state).values()):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(np.asarray(s.state.rng), np.asarray(b.state.rng))
    assert int(b.state.step) == 2 * N
    # the logs read as one run
    from pldr_jax.train.loop import read_metrics
    rs = [r for r in read_metrics(s.paths["metrics"]) if r["kind"] == "train"]
    rb = [r for r in read_metrics(b.paths["metrics"]) if r["kind"] == "train"]
    assert [r["loss"] for r in rs] == [r["loss"] for r in rb] == s.losses
    assert {"lr", "accuracy", "tokens_per_s", "grad_norm"} <= set(rs[0])
    evals = [r for r in read_metrics(s.paths["metrics"]) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [N, 2 * N]
    assert evals[-1]["val_perplexity"] == pytest.approx(np.exp(evals[-1]["val_loss"]))
    assert Path(s.paths["plot"]).stat().st_size > 1000


def test_keep_last_n_and_saved_items(runs):
    from pldr_jax.train.checkpoint import CheckpointManager, load_params, read_config
    s = runs["straight"]
    ck = Path(s.paths["checkpoints"])
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [2 * N - 1, 2 * N]  # keep-last-2
    step_dir = ck / str(2 * N)
    assert {"state", "data", "config"} <= {p.name for p in step_dir.iterdir()}
    data_state = json.loads((step_dir / "data" / "process_0-of-1.json").read_text())
    assert data_state["next_index"] == 2 * N  # the iterator position is saved with the state
    conf = read_config(ck)
    assert conf["model"] == runs["cfg"].to_dict() and conf["train"]["steps"] == 2 * N
    cfg, params, _ = load_params(ck)
    assert cfg == runs["cfg"]
    for k, v in _flat(s.state.params).items():
        np.testing.assert_array_equal(_flat(params)[k], v)
    with CheckpointManager(ck, async_save=False) as m, pytest.raises(FileNotFoundError):
        m.restore_config(step=123)


def test_params_only_restore_ignores_training_config(runs, tmp_path):
    """`pldr_jax.io` restores only the params of a `train()` checkpoint: a saved TrainConfig with
    an unknown field (and an optimiser this code cannot build) still loads, and nothing but the
    params subtree is read (no optimiser moments: the restored tree is the params, 1/3 of the
    saved state's floats)."""

    import jax

    import pldr_jax
    from pldr_jax.io.orbax_params import read_run_config, restore_params
    from pldr_jax.train.checkpoint import CheckpointManager, load_params
    s = runs["straight"]
    work = tmp_path / "old_run"
    shutil.copytree(Path(s.paths["workdir"]), work)
    ck = work / "checkpoints"
    for step_dir in (p for p in ck.iterdir() if p.name.isdigit()):
        f = step_dir / "config" / "metadata"
        conf = json.loads(f.read_text())
        conf["train"]["a_field_from_another_version"] = 1
        conf["train"]["learning_rate"] = "no longer a number"
        f.write_text(json.dumps(conf))
    with pytest.raises((TypeError, ValueError)):  # the training config itself no longer parses
        pldr_jax.TrainConfig.from_dict(read_run_config(ck)["train"])

    cfg, params, conf = restore_params(ck)
    assert cfg == runs["cfg"] and conf["train"]["a_field_from_another_version"] == 1
    want = _flat(s.state.params)
    assert _flat(params).keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(_flat(params)[k], v)
    n_params = pldr_jax.count_params(cfg)
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) == n_params
    with CheckpointManager(ck, async_save=False) as m:  # what the full state would have held
        raw = m.restore_raw_state()
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(raw["opt_state"])) >= 2 * n_params
    # the loaders built on it: io.load_model (format "orbax") and train.checkpoint.load_params
    from pldr_jax.train.sharding import make_mesh
    mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    for loaded in (pldr_jax.load_model(work)[1], load_params(ck)[1], load_params(ck, mesh=mesh)[1]):
        for k, v in want.items():
            np.testing.assert_array_equal(_flat(loaded)[k], v)


def test_io_never_imports_train():
    """`pldr_jax.io` sits below `pldr_jax.train`: no import of it anywhere in io, functions included."""
    import ast

    import pldr_jax.io
    io_dir = Path(pldr_jax.io.__file__).parent
    for f in io_dir.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert not (mod.startswith("..train") or mod.startswith("pldr_jax.train")), (f.name, mod)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("pldr_jax.train") for a in node.names), f.name


def test_existing_run_needs_resume_or_overwrite(runs):
    from pldr_jax.train.loop import train
    cfg, tc = runs["cfg"], runs["tc"]
    kw = dict(tokenizer=runs["tok"], documents=runs["docs"], compiler_options=FAST_COMPILE,
              log=lambda *a, **k: None)
    work = runs["root"] / "again"
    train(cfg, tc.replace(workdir=str(work), steps=1, validation_fraction=0.0, save_every=0), **kw)
    with pytest.raises(ValueError, match="resume"):
        train(cfg, tc.replace(workdir=str(work), steps=1), **kw)
    with pytest.raises(ValueError, match="different model config"):
        train(cfg.replace(dff=40), tc.replace(workdir=str(work), steps=2, resume=True), **kw)
    r = train(cfg, tc.replace(workdir=str(work), steps=1, overwrite=True, validation_fraction=0.0, save_every=0),
              **kw)
    assert r.start_step == 0 and r.end_step == 1


def test_restore_onto_a_different_mesh(runs, tmp_path):
    from pldr_jax.train.loop import train
    cfg, tc = runs["cfg"], runs["tc"]
    # two copies of the straight run (written on one device), reduced to its newest checkpoint
    one, eight = tmp_path / "one", tmp_path / "eight"
    base = Path(runs["straight"].paths["workdir"])
    for dst in (one, eight):
        shutil.copytree(base, dst)
        for p in (dst / "checkpoints").iterdir():  # keep only the newest checkpoint (step 2N)
            if p.name.isdigit() and int(p.name) != 2 * N:
                shutil.rmtree(p)
    shutil.copy(runs["root"] / "tok.model", eight / "tok.model")
    out = tmp_path / "eight.npz"
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=8").strip(),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, str(eight), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    z = np.load(out)
    # restored on 8 devices: bitwise the saved values, and really sharded
    for k, v in _flat(runs["straight"].state.params).items():
        np.testing.assert_array_equal(z["restored" + k], v, err_msg=k)
    assert tuple(z["shard['layers']['ffn']['w1']['kernel']"]) == (1, 16, 24)
    # continuing there == continuing on one device
    kw = dict(tokenizer=runs["tok"], documents=runs["docs"], compiler_options=FAST_COMPILE,
              log=lambda *a, **k: None)
    cont = train(cfg, tc.replace(workdir=str(one), steps=3 * N, resume=True), **kw)
    assert cont.start_step == 2 * N and len(cont.losses) == N
    np.testing.assert_allclose(z["losses"], cont.losses, rtol=1e-5)
    for k, v in _flat(cont.state.params).items():
        assert float(np.abs(z["final" + k] - v).max()) <= 1e-3 * (float(np.abs(v).max()) + LR_SUM), k


def _worker(workdir: str, out: str):
    import jax
    from pldr_jax.train.checkpoint import CheckpointManager
    from pldr_jax.train.loop import train
    from pldr_jax.train.sharding import abstract_train_state, make_mesh
    assert len(jax.devices()) == 8
    work = Path(workdir)
    cfg, tc, tok, docs = setup_run(work)
    tc = tc.replace(workdir=str(work), mesh=(2, 2, 2))
    mesh = make_mesh(2, 2, 2)
    tx, _ = tc.optimizer()
    with CheckpointManager(work / "checkpoints", async_save=False) as m:
        state, conf = m.restore(abstract_train_state(cfg, tx, mesh))
    assert conf["model"] == cfg.to_dict()
    restored = _flat(state.params)
    shards = {jax.tree_util.keystr(kp): np.array(x.addressable_shards[0].data.shape)
              for kp, x in jax.tree_util.tree_leaves_with_path(state.params)}
    cont = train(cfg, tc.replace(steps=3 * N, resume=True), tokenizer=tok, documents=docs, val_data=[],
                 compiler_options=FAST_COMPILE, log=lambda *a, **k: None)  # no validation: less to compile
    assert cont.start_step == 2 * N
    np.savez(out, losses=np.array(cont.losses), **{"restored" + k: v for k, v in restored.items()},
             **{"final" + k: v for k, v in _flat(cont.state.params).items()},
             **{"shard" + k: v for k, v in shards.items()})


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
