"""SIGKILL a real training process at a random moment after its first checkpoint, resume it, and get
exactly the uninterrupted run: the same per-step losses and the same final parameters, bitwise.

There is no ``pldr-jax train`` sub-command yet, so each run is a subprocess executing this file as a
script (``python tests/test_kill_resume.py WORKDIR TOKENIZER OUT.npz``), which calls the loop's
Python API (`pldr_jax.train.loop.train`) with ``resume=True`` whenever WORKDIR already holds
checkpoints.  With ``PLDR_SLOW_STEP=<seconds>`` every step sleeps that long (host side, outside
the compiled step) so that the kill lands mid-run.  Checkpoints are asynchronous, every step,
keep-last-3, so the kill can land in the middle of a checkpoint write.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STEPS = 10
FAST_COMPILE = {"xla_backend_optimization_level": 0}
HERE = Path(__file__).resolve()

try:
    from .process_faults import complete_checkpoint_steps, slow_steps_from_env, train_losses, wait_for_first_checkpoint
except ImportError:  # run as a worker script
    from process_faults import complete_checkpoint_steps, slow_steps_from_env, train_losses, wait_for_first_checkpoint


def _setup(workdir: Path, tok_path: str):
    import pldr_jax
    from pldr_jax.data import Tokenizer, default_corpus_documents
    from pldr_jax.train.loop import TrainConfig
    docs = default_corpus_documents()[:60]
    tok = Tokenizer.load(tok_path)
    cfg = pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=tok.vocab_size,
                              max_seq_len=32, A_dff=8, num_reslayerA=1, num_denseA=1)
    tc = TrainConfig(workdir=str(workdir), steps=STEPS, seq_len=16, batch_size=8, learning_rate=1e-2,
                     warmup_steps=1, log_every=1, eval_every=0, save_every=1, keep_checkpoints=3,
                     validation_fraction=0.0, async_checkpoint=True, progress=False, plot=False,
                     tensorboard=False)
    return cfg, tc, tok, docs


def _script(workdir: str, tok_path: str, out: str) -> None:
    import jax
    import pldr_jax.train.loop as loop
    wd = Path(workdir)
    cfg, tc, tok, docs = _setup(wd, tok_path)
    slow_steps_from_env()
    resume = (wd / "checkpoints").is_dir() and any(p.name.isdigit() for p in (wd / "checkpoints").iterdir())
    r = loop.train(cfg, tc.replace(resume=resume), tokenizer=tok, documents=docs,
                   compiler_options=FAST_COMPILE, log=lambda *a, **k: print(*a, flush=True))
    flat = {jax.tree_util.keystr(kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_leaves_with_path(jax.device_get(r.state.params))}
    np.savez(out, losses=np.asarray(r.losses, np.float64), steps=np.asarray([m["step"] for m in r.step_metrics]),
             start=r.start_step, end=r.end_step, **{"p" + k: v for k, v in flat.items()})


def _run(args, env=None, timeout=120):
    e = dict(os.environ, PYTHONHASHSEED="0", **(env or {}))
    return subprocess.run([sys.executable, str(HERE), *map(str, args)], env=e, capture_output=True, text=True,
                          timeout=timeout)


def test_sigkill_at_random_moment_then_resume_is_exact(tmp_path):
    from pldr_jax.data import Tokenizer, default_corpus_documents
    tok = Tokenizer.train(default_corpus_documents()[:60], tmp_path / "tok", 128)
    tok_path = str(tmp_path / "tok.model")
    assert Path(tok_path).exists() and tok.vocab_size == 128

    # 1. the uninterrupted reference run
    straight = _run([tmp_path / "straight", tok_path, tmp_path / "straight.npz"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    ref = np.load(tmp_path / "straight.npz")
    assert list(ref["steps"]) == list(range(1, STEPS + 1)) and np.isfinite(ref["losses"]).all()

    # 2. the run that gets SIGKILLed at a random moment after its first complete checkpoint
    wd = tmp_path / "killed"
    ckpt = wd / "checkpoints"
    delay = random.Random(20261129).uniform(0.0, 0.6)  # seeded: the same kill moment every run
    proc = subprocess.Popen([sys.executable, str(HERE), str(wd), tok_path, str(tmp_path / "killed.npz")],
                            env=dict(os.environ, PYTHONHASHSEED="0", PLDR_SLOW_STEP="0.25"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_first_checkpoint(ckpt, [proc], lambda: proc.stderr.read()[-3000:])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.npz").exists()
    at_kill = complete_checkpoint_steps(ckpt)
    assert at_kill and max(at_kill) < STEPS, f"kill landed after the end (steps {at_kill})"
    before = train_losses(wd / "metrics.jsonl")

    # 3. resume (a fresh process; the script passes resume=True because checkpoints exist)
    resumed = _run([wd, tok_path, tmp_path / "resumed.npz"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = np.load(tmp_path / "resumed.npz")
    start = int(res["start"])
    assert 1 <= start <= max(at_kill) and int(res["end"]) == STEPS, (start, at_kill)
    # the continued steps have exactly the uninterrupted losses ...
    assert list(res["steps"]) == list(range(start + 1, STEPS + 1))
    np.testing.assert_array_equal(res["losses"], ref["losses"][start:])
    # ... and so had the steps logged before the kill
    for s, loss in before.items():
        assert loss == ref["losses"][s - 1], (s, loss)
    # the final parameters are bitwise those of the uninterrupted run
    keys = [k for k in ref.files if k.startswith("p")]
    assert keys and sorted(keys) == sorted(k for k in res.files if k.startswith("p"))
    for k in keys:
        np.testing.assert_array_equal(res[k], ref[k], err_msg=k)


if __name__ == "__main__":
    _script(*sys.argv[1:4])
