"""The multi-host fault table, with real processes (`pldr-jax train`, jax.distributed on 127.0.0.1,
one CPU device per process, mesh fsdp = process count):

| fault                                              | expected                                              |
|----------------------------------------------------|-------------------------------------------------------|
| clean stop at step 8, `--resume` to 12 (2 procs)   | losses of steps 9-12 bitwise those of a 12-step run   |
| resume a 2-process run with 1 process              | continues from step 8 to 12, nothing quarantined      |
| resume a 2-process run with 4 processes            | continues (params re-sharded, data position global)   |
| newest checkpoint corrupted in process 1's files   | both processes agree on step 4; step 8 moved aside    |
| kill -9 of every process (seeded random moment)    | resume is exact (bitwise losses, same final step)     |
| kill -9 of one process                             | the other stops within a minute with one line naming  |
|                                                    | the newest complete checkpoint and --resume (no       |
|                                                    | traceback); resume (4 processes) continues            |
| disk full while saving step 8 (2 procs, tmpfs)     | both exit non-zero naming the failed save; step 4     |
|                                                    | intact; resume after freeing space is exact           |
| kill -9 of one process while the other waits in    | the survivor, aborted by the JAX runtime (at once /   |
| orbax's commit barrier (the victim's write hangs)  | after the heartbeat timeout), still ends with the one |
|                                                    | line (printed by its `peerwatch`), no C++ stack       |
| only process 0's write of step 8 fails (injected   | both stop within seconds naming the failed save       |
| ENOSPC after its arrays are written)               | (process 1's write waits in orbax's barriers); step 4 |
|                                                    | intact                                                |

Every subprocess has a hard timeout.  Run as a script (``python tests/test_multihost_faults.py
CLI-ARGS...``) it is one `pldr-jax` process; with ``PLDR_SLOW_STEP=<s>`` every step sleeps that long
(host side) so that a kill lands mid-run.  ``python tests/test_multihost_faults.py --full-disk SPEC``
runs the processes of one run inside a mount namespace whose workdir is a small tmpfs (``unshare``:
no privileges needed where unprivileged user namespaces are enabled) and copies the workdir out.
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

try:
    from .process_faults import (complete_checkpoint_steps, failing_background_write_from_env, slow_steps_from_env,
                                 traced_orbax_barriers_from_env, train_losses,
                                 wait_for_first_checkpoint)
except ImportError:  # run as a worker script
    from process_faults import (complete_checkpoint_steps, failing_background_write_from_env, slow_steps_from_env,
                                traced_orbax_barriers_from_env, train_losses,
                                wait_for_first_checkpoint)
HEARTBEAT_S = 8
# reading a deliberately damaged checkpoint leaves orbax read coroutines that report on teardown
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(slow: float = 0.0, fail_write: str | None = None, stall_write: str | None = None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PLDR_JAX_NO_HUGE_PAGES": "1", "PYTHONHASHSEED": "0",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one CPU device per process, quick compiles
    if slow:
        env["PLDR_SLOW_STEP"] = str(slow)
    if fail_write:
        env["PLDR_FAIL_WRITE"] = fail_write
    if stall_write:
        env["PLDR_STALL_WRITE"], env["PLDR_TRACE_BARRIERS"] = stall_write, "1"
    return env


def _args(data, wd: Path, steps: int, extra=()) -> list[str]:
    return ["train", "--preset", "tiny", "--set", "vocab_size=200", "--set", "num_layers=1", "--tokenizer", str(data["tok"]), "--data",
            str(data["docs"]), "--validation-fraction", "0", "--batch-size", "8", "--seq-len", "32",
            "--steps", str(steps), "--total-steps", "12", "--warmup-steps", "2", "--save-every", "4", "--keep", "3",
            "--log-every", "1", "--eval-every", "0", "--no-progress", "--no-plot", "--workdir", str(wd),
            "--heartbeat-timeout", str(HEARTBEAT_S), "--sync-timeout", "120", *extra]


def _start(data, wd: Path, nproc: int, steps: int, extra=(), slow: float = 0.0, fail_write: str | None = None,
           stall_write: str | None = None):
    port = _free_port()
    procs = []
    for pid in range(nproc):
        cmd = [sys.executable, str(HERE), *_args(data, wd, steps, extra), f"--mesh=1,{nproc},1"]
        if nproc > 1:
            cmd += ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(nproc), "--process-id",
                    str(pid)]
        log = open(_log_path(wd, pid), "w")
        procs.append(subprocess.Popen(cmd, env=_env(slow, fail_write, stall_write), stdout=log, stderr=subprocess.STDOUT))
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
    return train_losses(wd / "metrics.jsonl")


def _resume_records(wd: Path) -> list[dict]:
    from pldr_jax.train import read_metrics  # skips lines torn by a kill or a full disk
    return [r for r in read_metrics(wd / "metrics.jsonl") if r.get("kind") == "resume"]


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
    assert complete_checkpoint_steps(stopped / "checkpoints") == [4, 8]
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
    assert not (wd / "checkpoints.corrupt").exists() and complete_checkpoint_steps(wd / "checkpoints")[-1] == 12


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
    try:
        wait_for_first_checkpoint(wd / "checkpoints", procs, lambda: _log(wd)[-3000:])
        time.sleep(delay)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        _wait(procs, 30)
    at_kill = complete_checkpoint_steps(wd / "checkpoints")
    assert at_kill and max(at_kill) < 12
    _run(data, wd, 2, 12, ["--resume"])
    got = _losses(wd)
    assert [got[s] for s in range(1, 13)] == [runs["ref"][s] for s in range(1, 13)]
    assert not (wd / "checkpoints.corrupt").exists()


def test_kill_one_process_stops_the_other_then_resume_on_four(runs, data):
    wd = data["root"] / "killed_one"
    procs = _start(data, wd, 2, 12, slow=0.4)
    try:
        wait_for_first_checkpoint(wd / "checkpoints", procs, lambda: _log(wd)[-3000:])
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        procs[0].wait(timeout=HEARTBEAT_S + 60)  # bounded: no hang
        stopped_after = time.monotonic() - t_kill
    finally:
        _wait(procs, 5)
    assert procs[0].returncode != 0 and stopped_after < 60
    out = _log(wd, 0)
    err = [ln for ln in out.splitlines() if ln.startswith("pldr-jax train: error:")]
    assert len(err) == 1 and "another process of this run died" in err[0], out[-3000:]
    assert "the newest complete checkpoint is step" in err[0] and "--resume" in err[0], err[0]
    assert "Traceback" not in out, out[-3000:]
    ck = complete_checkpoint_steps(wd / "checkpoints")
    assert ck and max(ck) < 12
    _run(data, wd, 4, 12, ["--resume"])
    got = _losses(wd)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [runs["ref"][s] for s in range(1, 13)], rtol=2e-5)
    assert _resume_records(wd)[-1]["process_count"] == 4 and not (wd / "checkpoints.corrupt").exists()


@pytest.mark.parametrize("victim", [1, 0], ids=["peer-killed", "coordinator-killed"])
def test_kill_one_process_while_the_other_waits_in_the_commit_barrier(data, victim):
    """The victim's write of checkpoint 4 hangs before orbax's commit barrier, the survivor's waits in it
    (and its main thread for the save): the survivor learns of the kill -9 only from the coordination
    service, whose client aborts the process from C++ (at once when process 0, which hosts the service,
    died; after the heartbeat timeout otherwise).  It still ends with the one line naming checkpoint 2
    and --resume, in time, without the runtime's C++ stack."""
    survivor = 1 - victim
    wd = data["root"] / f"barrier_killed{victim}"
    procs = _start(data, wd, 2, 4, ["--save-every", "2"], stall_write=f"{victim}:4")
    try:
        t0 = time.monotonic()
        while not ("the write stalls" in _log(wd, victim)
                   and "waits at barrier _async_write_complete.4" in _log(wd, survivor)):
            assert all(p.poll() is None for p in procs), "\n".join(_log(wd, i)[-3000:] for i in range(2))
            assert time.monotonic() - t0 < 240, "the processes did not reach the commit barrier of step 4"
            time.sleep(0.05)
        time.sleep(0.3)
        procs[victim].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        procs[survivor].wait(timeout=HEARTBEAT_S + 60)  # bounded: no hang
        stopped_after = time.monotonic() - t_kill
    finally:
        _wait(procs, 5)
    assert procs[survivor].returncode not in (0, None) and stopped_after < 60, (procs[survivor].returncode,
                                                                              stopped_after)
    t0 = time.monotonic()  # the line may come from the survivor's watcher process: give it a moment
    while "pldr-jax train: error:" not in _log(wd, survivor) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    out = _log(wd, survivor)
    err = [ln for ln in out.splitlines() if "pldr-jax train: error:" in ln]
    assert len(err) == 1 and err[0].startswith("pldr-jax train: error: another process of this run died"), out[-3000:]
    assert f"the newest complete checkpoint is step 2 in {wd / 'checkpoints'}" in err[0] and "--resume" in err[0]
    for noise in ("Check failure stack trace", "Terminating process", "terminate called", "Traceback", "    @ "):
        assert noise not in out, out[-3000:]
    assert complete_checkpoint_steps(wd / "checkpoints") == [2]


def test_peer_watch_replaces_the_runtime_abort_with_one_line(tmp_path):
    """The watcher's filter on the lines the JAX runtime writes when it aborts a survivor (as logged by
    jaxlib 0.10 on the host of the coordination service), without processes."""
    from pldr_jax.train.peerwatch import _LINE, _REPORTED, HOLD_S, LineFilter
    ckpt = tmp_path / "checkpoints"
    (ckpt / "4").mkdir(parents=True)
    (ckpt / "4" / "_CHECKPOINT_METADATA").write_text("{}")
    (ckpt / "8.orbax-checkpoint-tmp-1").mkdir()
    abort = [b"[Gloo] Rank 0 is connected to 1 peer ranks.\n",
             b"E1207 01:07:01.251860 21689 coordination_service.cc:1549] [1] Use error polling to propagate the "
             b"following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending "
             b"heartbeats):\n", b"1\n", b"The tasks have crashed. [type.googleapis.com/tensorflow.X='']\n",
             b"E1207 01:07:01.252082 21700 coordination_service_agent.cc:289] Polled an error from coordination "
             b"service (this can be an error from this or another task).\n",
             b"F1207 01:07:01.252184 21700 client.h:80] Terminating process because the JAX distributed service "
             b"detected fatal errors. This most likely indicates that another task died. absl::Status: "
             b"UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n", b"1\n",
             b"*** Check failure stack trace: ***\n", b"    @     0x7f01d0058634  absl::LogMessage::SendToLog()\n"]
    now = [0.0]
    f = LineFilter("pldr-jax train", ckpt, clock=lambda: now[0])
    out = b"".join(f.feed(line) for line in abort) + f.eof()
    assert out.decode().splitlines() == [
        "[Gloo] Rank 0 is connected to 1 peer ranks.",
        "pldr-jax train: error: another process of this run died or became unreachable (JAX coordination service: "
        "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats): 1); the newest complete "
        f"checkpoint is step 4 in {ckpt}. Start every process again with the same command plus --resume (it "
        "continues from that step)"]
    # the process printed its own final error (a traceback) first: nothing added, the runtime's lines dropped
    f = LineFilter("pldr-jax train", ckpt, clock=lambda: now[0])
    assert b"".join(f.feed(line) for line in [abort[0], _REPORTED, *abort[1:]]) + f.eof() == abort[0]
    # the process's own line and the abort race: whichever comes first is the one line
    own = _LINE + b"pldr-jax train: error: another process ... (Gloo: Connection reset by peer)\x1fsecond line\n"
    f = LineFilter("pldr-jax train", ckpt, clock=lambda: now[0])
    out = b"".join(f.feed(line) for line in [abort[0], own, *abort[1:]]) + f.eof()
    assert out == abort[0] + own[len(_LINE):].replace(b"\x1f", b"\n") and f.ack
    f = LineFilter("pldr-jax train", ckpt, clock=lambda: now[0])
    out = b"".join(f.feed(line) for line in [*abort[:-2], own, *abort[-2:]]) + f.eof()
    assert out.decode().splitlines()[1].startswith("pldr-jax train: error: another process of this run died or "
                                                   "became unreachable (JAX coordination service: ") and f.ack
    assert len(out.decode().splitlines()) == 2
    # error lines without the fatal one: released after HOLD_S, or at the end of the process
    f = LineFilter("pldr-jax train", ckpt, clock=lambda: now[0])
    assert f.feed(abort[4]) == b"" and f.timeout() == b"" and f.feed(b"later\n") == b""
    now[0] += HOLD_S
    assert f.timeout() == abort[4] + b"later\n" and f.feed(b"next\n") == b"next\n"
    assert f.feed(abort[4]) == b"" and f.eof() == abort[4]
    # any other fatal error (a bug) passes unchanged
    f = LineFilter("pldr-jax train", ckpt, clock=lambda: now[0])
    bug = [b"F1207 00:00:00.0 1 foo.cc:1] Check failed: x == y\n", b"*** Check failure stack trace: ***\n"]
    assert b"".join(f.feed(line) for line in bug) + f.eof() == b"".join(bug)


def _unshare_tmpfs_reason(probe_dir: Path) -> str | None:
    """None when a tmpfs can be mounted in a fresh user + mount namespace here, else why not."""
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    probe_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', str(probe_dir)],
                       capture_output=True, text=True, timeout=60)
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()[:200]}"


def _du_bytes(path: Path) -> int:
    """Bytes the files under `path` occupy in whole 4 KiB pages (as a tmpfs counts them)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 + 4096 for f in path.rglob("*") if f.is_file())


def test_disk_full_while_saving_errors_and_keeps_the_previous_checkpoint(runs, data):
    reason = _unshare_tmpfs_reason(data["root"] / "probe")
    if reason:
        pytest.skip(reason)
    stopped = runs["stopped"]
    # room for the whole run's files with one checkpoint (step 4) and half of a second: the save of step 8
    # runs out of space on both processes (every process writes its shards into the same tmpfs)
    size = _du_bytes(stopped) - _du_bytes(stopped / "checkpoints" / "8") // 2
    wd, out = data["root"] / "diskfull", data["root"] / "diskfull.out"
    wd.mkdir()
    spec = {"size_kib": size // 1024, "wd": str(wd), "out": str(out), "nproc": 2, "steps": 12,
            "data": {k: str(v) for k, v in data.items()}}
    launcher = subprocess.run(["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size="$1"k tmpfs "$2" && exec "$0" "$3" --full-disk "$4"',
                               sys.executable, str(spec["size_kib"]), str(wd), str(HERE), json.dumps(spec)],
                              capture_output=True, text=True, timeout=400)
    logs = "\n".join(_log(wd, i)[-3000:] for i in range(2) if _log_path(wd, i).exists())
    assert launcher.returncode == 0, launcher.stdout[-2000:] + launcher.stderr[-2000:] + logs
    rcs = json.loads(Path(str(out) + ".rcs.json").read_text())
    assert all(rc not in (0, None) for rc in rcs), (rcs, logs)  # neither process hung or claimed success
    _assert_failed_save_of_step_8(wd, out / "checkpoints")
    # space freed (the copy lives on the real disk): resume continues from step 4, exactly
    _run(data, out, 2, 12, ["--resume"])
    got = _losses(out)
    assert [got[s] for s in range(1, 13)] == [runs["ref"][s] for s in range(1, 13)]
    assert _resume_records(out)[-1]["step"] == 4


def _assert_failed_save_of_step_8(wd: Path, ckpt: Path, *also: str) -> None:
    """Both processes' logs end with the error naming the failed save of step 8 (a full disk) and the
    intact step 4 (and each of `also`); step 4 is the only complete checkpoint; nothing quarantined."""
    for i in range(2):
        err = [ln for ln in _log(wd, i).splitlines() if ln.startswith("pldr-jax train: error:")]
        assert err and "the save of step 8" in err[0] and "the disk is full" in err[0], _log(wd, i)[-3000:]
        assert "step 4, is intact" in err[0] and "--resume" in err[0] and all(a in err[0] for a in also)
        log = _log(wd, i)  # the one line, not the libraries' pages (orbax tracebacks, asyncio's closed loop)
        assert "Event loop is closed" not in log and "Traceback" not in log, log[-3000:]
    assert complete_checkpoint_steps(ckpt) == [4]
    assert not (ckpt.parent / "checkpoints.corrupt").exists()


def test_one_process_background_write_failing_stops_every_process(data):
    """Only process 0's background write of step 8 fails (after its array files are written, in its
    metadata write; process 1's write succeeds and waits for it in orbax's barriers, as in a disk-full run
    seen in CI): both processes stop promptly, naming the failed save; step 4 stays the intact newest."""
    wd = data["root"] / "onesided"
    t0 = time.monotonic()
    rcs = _wait(_start(data, wd, 2, 12, fail_write="0:8"), timeout=200)
    took = time.monotonic() - t0
    logs = "\n".join(_log(wd, i)[-3000:] for i in range(2))
    assert all(rc not in (0, None, -9) for rc in rcs), (rcs, logs)  # neither hung (killed) nor claimed success
    _assert_failed_save_of_step_8(wd, wd / "checkpoints", "process 0:")
    assert took < 150, f"the processes took {took:.0f} s to stop"


def test_lost_peer_message_names_the_checkpoint_to_resume_from(tmp_path):
    """The classification and the line behind the kill -9 test, without processes."""
    import jax

    from pldr_jax.train.faults import is_peer_failure, peer_failure_message
    ckpt = tmp_path / "checkpoints"
    for step, done in ((4, True), (8, True), (12, False)):  # 12: a save cut off (no metadata written)
        (ckpt / str(step)).mkdir(parents=True)
        if done:
            (ckpt / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
    gloo = jax.errors.JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error: Connection reset by peer")
    try:
        try:
            raise gloo
        except Exception as inner:
            raise RuntimeError("while reading the metrics") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert is_peer_failure(gloo) and is_peer_failure(wrapped)
    assert not is_peer_failure(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"))
    assert not is_peer_failure(ValueError("Gloo"))
    line = peer_failure_message(wrapped, ckpt)
    assert "\n" not in line and "Connection reset by peer" in line and "--resume" in line
    assert f"the newest complete checkpoint is step 8 in {ckpt}" in line


def test_closed_event_loop_noise_is_dropped(capsys):
    import sys

    from pldr_jax.train.faults import quiet_background_save_errors
    saved = sys.excepthook, sys.unraisablehook
    try:
        quiet_background_save_errors()
        sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
        assert capsys.readouterr().err == ""
        sys.excepthook(RuntimeError, RuntimeError("something else"), None)
        assert "something else" in capsys.readouterr().err
    finally:
        sys.excepthook, sys.unraisablehook = saved


def _full_disk_launch(spec: dict) -> int:
    """Inside the mount namespace (the workdir is the small tmpfs): run the processes, copy the workdir out."""
    data = {k: Path(v) for k, v in spec["data"].items()}
    wd, out = Path(spec["wd"]), Path(spec["out"])
    rcs = _wait(_start(data, wd, spec["nproc"], spec["steps"]), timeout=240)
    shutil.copytree(wd, out)
    Path(str(out) + ".rcs.json").write_text(json.dumps(rcs))
    return 0


def _worker(argv: list[str]) -> int:
    slow_steps_from_env()
    failing_background_write_from_env()
    traced_orbax_barriers_from_env()
    from pldr_jax.cli import main
    return main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--full-disk"]:
        sys.exit(_full_disk_launch(json.loads(sys.argv[2])))
    sys.exit(_worker(sys.argv[1:]))
