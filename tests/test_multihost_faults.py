"""The multi-host fault table, with real processes (`pldr-jax train`, jax.distributed on 127.0.0.1,
one CPU device per process, mesh fsdp = process count):

| fault                                              | expected                                              |
|----------------------------------------------------|-------------------------------------------------------|
| clean stop at step 8, `--resume` to 12 (2 procs)   | losses of steps 9-12 bitwise those of a 12-step run   |
| resume a 2-process run with 1 process              | continues from step 8 to 12, nothing quarantined      |
| resume a 2-process run with 4 processes            | continues (params re-sharded, data position global)   |
| newest checkpoint corrupted in process 1's files   | both processes agree on step 4; step 8 moved aside    |
| kill -9 of every process (seeded random moment)    | resume is exact (bitwise losses, same final step)     |
| kill -9 of one process                             | the other stops within the heartbeat timeout, with a  |
|                                                    | message; resume (4 processes) continues               |

Every subprocess has a hard timeout.  Run as a script (``python tests/test_multihost_faults.py
CLI-ARGS...``) it is one `pldr-jax` process; with ``PLDR_SLOW_STEP=<s>`` every step sleeps that long
(host side) so that a kill lands mid-run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
HEARTBEAT_S = 8
# reading a deliberately damaged checkpoint leaves orbax read coroutines that report on teardown
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(slow: float = 0.0) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PLDR_JAX_NO_HUGE_PAGES": "1", "PYTHONHASHSEED": "0",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one CPU device per process, quick compiles
    if slow:
        env["PLDR_SLOW_STEP"] = str(slow)
    return env


def _args(data, wd: Path, steps: int, extra=()) -> list[str]:
    return ["train", "--preset", "tiny", "--set", "vocab_size=200", "--set", "num_layers=1", "--tokenizer", str(data["tok"]), "--data",
            str(data["docs"]), "--validation-fraction", "0", "--batch-size", "8", "--seq-len", "32",
            "--steps", str(steps), "--total-steps", "12", "--warmup-steps", "2", "--save-every", "4", "--keep", "3",
            "--log-every", "1", "--eval-every", "0", "--no-progress", "--no-plot", "--workdir", str(wd),
            "--heartbeat-timeout", str(HEARTBEAT_S), "--sync-timeout", "120", *extra]


def _start(data, wd: Path, nproc: int, steps: int, extra=(), slow: float = 0.0):
    port = _free_port()
    procs = []
    for pid in range(nproc):
        cmd = [sys.executable, str(HERE), *_args(data, wd, steps, extra), f"--mesh=1,{nproc},1"]
        if nproc > 1:
            cmd += ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(nproc), "--process-id",
                    str(pid)]
        log = open(_log_path(wd, pid), "w")
        procs.append(subprocess.Popen(cmd, env=_env(slow), stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, timeout: float = 240) -> list[int]:
    t0 = time.monotonic()
    try:
        for p in procs:
            p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def _log_path(wd: Path, pid: int) -> Path:
    return wd.parent / f"{wd.name}.p{pid}.log"


def _log(wd: Path, pid: int = 0) -> str:
    return _log_path(wd, pid).read_text(errors="replace")


def _run(data, wd: Path, nproc: int, steps: int, extra=(), ok: bool = True):
    rcs = _wait(_start(data, wd, nproc, steps, extra))
    if ok:
        assert rcs == [0] * nproc, "\n".join(_log(wd, i)[-3000:] for i in range(nproc))
    return rcs


def _losses(wd: Path) -> dict[int, float]:
    """step -> loss of the train records of metrics.jsonl (the last record of a step wins: a resumed run
    logs the steps after its checkpoint again)."""
    out = {}
    for line in (wd / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if r.get("kind") == "train":
            out[r["step"]] = r["loss"]
    return out


def _resume_records(wd: Path) -> list[dict]:
    recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines() if x.strip().startswith("{")]
    return [r for r in recs if r.get("kind") == "resume"]


def _complete_steps(ckpt: Path) -> list[int]:
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pldr_jax.data import Tokenizer, default_corpus_documents
    root = tmp_path_factory.mktemp("mh")
    docs = default_corpus_documents()[:80]
    Tokenizer.train(docs, root / "tok", 200)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"root": root, "tok": root / "tok.model", "docs": root / "docs.jsonl"}


@pytest.fixture(scope="module")
def runs(data):
    """The uninterrupted 12-step 2-process run, and a 2-process run stopped cleanly at step 8."""
    root = data["root"]
    straight, stopped = root / "straight", root / "stopped"
    _run(data, straight, 2, 12)
    _run(data, stopped, 2, 8)
    ref = _losses(straight)
    assert sorted(ref) == list(range(1, 13)) and all(np.isfinite(list(ref.values())))
    assert _complete_steps(stopped / "checkpoints") == [4, 8]
    return {"straight": straight, "stopped": stopped, "ref": ref}


def _copy(runs, data, name) -> Path:
    dst = data["root"] / name
    shutil.copytree(runs["stopped"], dst)
    return dst


def test_two_process_resume_is_bitwise_exact(runs, data):
    wd = _copy(runs, data, "resumed2")
    _run(data, wd, 2, 12, ["--resume"])
    got = _losses(wd)
    assert [got[s] for s in range(9, 13)] == [runs["ref"][s] for s in range(9, 13)]
    assert [got[s] for s in range(1, 9)] == [runs["ref"][s] for s in range(1, 9)]
    assert "resumed from checkpoint 8" in _log(wd) and not (wd / "checkpoints.corrupt").exists()
    assert _resume_records(wd)[-1]["step"] == 8


def test_resume_with_one_process_continues(runs, data):
    wd = _copy(runs, data, "resumed1")
    _run(data, wd, 1, 12, ["--resume"])
    got, ref = _losses(wd), runs["ref"]
    assert sorted(got) == list(range(1, 13))
    # the same global batches (data position re-sharded), the reductions in another order
    np.testing.assert_allclose([got[s] for s in range(9, 13)], [ref[s] for s in range(9, 13)], rtol=2e-5)
    rec = _resume_records(wd)[-1]
    assert rec["step"] == 8 and rec["quarantined"] == [] and rec["process_count"] == 1
    assert any("re-sharded" in n for n in rec["notes"])
    assert not (wd / "checkpoints.corrupt").exists() and _complete_steps(wd / "checkpoints")[-1] == 12


def test_corrupt_newest_checkpoint_in_one_hosts_files_all_agree_on_fallback(runs, data):
    wd = _copy(runs, data, "corrupt1")
    files = sorted((wd / "checkpoints" / "8" / "state").glob("ocdbt.process_1/d/*"), key=lambda p: p.stat().st_size)
    assert files, "process 1 wrote no array file"
    b = bytearray(files[-1].read_bytes())
    b[len(b) * 3 // 5] ^= 0x01  # one flipped bit in process 1's largest array file
    files[-1].write_bytes(bytes(b))
    _run(data, wd, 2, 12, ["--resume"])
    recs = _resume_records(wd)
    assert recs[-1]["step"] == 4 and [q["step"] for q in recs[-1]["quarantined"]] == [8]
    assert "resumed from checkpoint 4" in _log(wd, 0) and "quarantined: checkpoint 8" in _log(wd, 0)
    moved = list((wd / "checkpoints.corrupt").iterdir())
    assert [m.name.split("-")[0] for m in moved] == ["8"]  # moved once (by process 0), not deleted
    got = _losses(wd)
    assert [got[s] for s in range(5, 13)] == [runs["ref"][s] for s in range(5, 13)]


def test_kill_all_processes_at_a_random_moment_then_resume_exact(runs, data):
    wd = data["root"] / "killed_all"
    procs = _start(data, wd, 2, 12, slow=0.4)
    delay = random.Random(11).uniform(0.0, 2.0)  # seeded: the same moment relative to checkpoint 4 every run
    t0 = time.monotonic()
    try:
        while not _complete_steps(wd / "checkpoints"):
            assert all(p.poll() is None for p in procs), _log(wd)[-3000:]
            assert time.monotonic() - t0 < 150, "no checkpoint within 150 s"
            time.sleep(0.05)
        time.sleep(delay)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        _wait(procs, 30)
    at_kill = _complete_steps(wd / "checkpoints")
    assert at_kill and max(at_kill) < 12
    _run(data, wd, 2, 12, ["--resume"])
    got = _losses(wd)
    assert [got[s] for s in range(1, 13)] == [runs["ref"][s] for s in range(1, 13)]
    assert not (wd / "checkpoints.corrupt").exists()


def test_kill_one_process_stops_the_other_then_resume_on_four(runs, data):
    wd = data["root"] / "killed_one"
    procs = _start(data, wd, 2, 12, slow=0.4)
    t0 = time.monotonic()
    try:
        while not _complete_steps(wd / "checkpoints"):
            assert all(p.poll() is None for p in procs), _log(wd)[-3000:]
            assert time.monotonic() - t0 < 150, "no checkpoint within 150 s"
            time.sleep(0.05)
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        procs[0].wait(timeout=HEARTBEAT_S + 60)  # bounded: no hang
        stopped_after = time.monotonic() - t_kill
    finally:
        _wait(procs, 5)
    assert procs[0].returncode != 0 and stopped_after < HEARTBEAT_S + 60
    out = _log(wd, 0)
    assert "another task died" in out or "Gloo" in out or "heartbeat" in out, out[-3000:]
    ck = _complete_steps(wd / "checkpoints")
    assert ck and max(ck) < 12
    _run(data, wd, 4, 12, ["--resume"])
    got = _losses(wd)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [runs["ref"][s] for s in range(1, 13)], rtol=2e-5)
    assert _resume_records(wd)[-1]["process_count"] == 4 and not (wd / "checkpoints.corrupt").exists()


def _worker(argv: list[str]) -> int:
    slow = float(os.environ.get("PLDR_SLOW_STEP", "0"))
    if slow:
        import pldr_jax.train.loop as loop
        orig = loop.shard_batch

        def slow_shard(batch, mesh):
            time.sleep(slow)
            return orig(batch, mesh)
        loop.shard_batch = slow_shard
    from pldr_jax.cli import main
    return main(argv)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
