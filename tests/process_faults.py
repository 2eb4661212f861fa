"""Helpers of the tests that run training in real subprocesses and kill, slow down or starve them
(`test_kill_resume.py`, `test_multihost_faults.py`).  Importable from a test module and from those
modules run as worker scripts; nothing here imports JAX at import time."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence


def slow_steps_from_env() -> None:
    """With ``PLDR_SLOW_STEP=<seconds>``, make every training step of this process sleep that long
    (host side, outside the compiled step) so that a kill lands mid-run."""
    slow = float(os.environ.get("PLDR_SLOW_STEP", "0"))
    if not slow:
        return
    import pldr_jax.train.steploop as steploop
    orig = steploop.shard_batch

    def slow_shard(batch, mesh):
        time.sleep(slow)
        return orig(batch, mesh)
    steploop.shard_batch = slow_shard


def complete_checkpoint_steps(ckpt: Path) -> list[int]:
    """Steps of `ckpt` whose orbax save finished (unfinished saves lack _CHECKPOINT_METADATA)."""
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def train_losses(metrics: Path) -> dict[int, float]:
    """step -> loss of the train records of a metrics.jsonl whose writer may have been killed mid-line
    (the last record of a step wins: a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("kind") == "train":
            out[r["step"]] = r["loss"]
    return out


def wait_for_first_checkpoint(ckpt: Path, procs: Sequence, describe: Callable[[], str],
                              timeout_s: float = 150.0) -> None:
    """Poll until `ckpt` holds a complete checkpoint; fail (with `describe()`, e.g. a log tail) if a
    process of `procs` (subprocess.Popen) ends first or none appears within `timeout_s`."""
    t0 = time.monotonic()
    while not complete_checkpoint_steps(ckpt):
        assert all(p.poll() is None for p in procs), f"training ended before its first checkpoint: {describe()}"
        assert time.monotonic() - t0 < timeout_s, f"no checkpoint appeared within {timeout_s:.0f} s"
        time.sleep(0.02)


def failing_background_write_from_env() -> None:
    """With ``PLDR_FAIL_WRITE=<process index>:<step>``, make that process's background (asynchronous)
    orbax write of checkpoint <step> fail with ENOSPC after its array files are written, i.e. in the
    primary's metadata write that follows the commits -- the one-sided failure a full disk can cause
    (the other processes' writes succeed and wait for this one in orbax's barriers)."""
    spec = os.environ.get("PLDR_FAIL_WRITE")
    if not spec:
        return
    process, step = (int(x) for x in spec.split(":"))
    import errno
    import jax
    from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler as bph
    orig = bph.BasePyTreeCheckpointHandler._write_metadata_after_commits

    async def failing(self, commit_futures, *, param_infos, **kw):
        import asyncio
        leaves = jax.tree.leaves(param_infos)
        step_dir = leaves[0].parent_dir.parent.name if leaves else ""  # "<step>.orbax-checkpoint-tmp-..." or "<step>"
        if jax.process_index() == process and step_dir.split(".")[0] == str(step):
            for f in commit_futures:
                await asyncio.to_thread(f.result)
            raise OSError(errno.ENOSPC, f"No space left on device (injected into the write of step {step})")
        return await orig(self, commit_futures, param_infos=param_infos, **kw)
    bph.BasePyTreeCheckpointHandler._write_metadata_after_commits = failing


def traced_orbax_barriers_from_env() -> None:
    """With ``PLDR_TRACE_BARRIERS=1``, every barrier of orbax's asynchronous saves prints
    ``[test] process P waits at barrier KEY`` (stderr) when this process reaches it.  With
    ``PLDR_STALL_WRITE=<process index>:<step>`` as well, that process's background write of checkpoint
    <step> never reaches orbax's commit barrier (``_async_write_complete.<step>``: it sleeps there until
    the process is killed, a write that hangs), so the other processes wait in that barrier for it."""
    if not os.environ.get("PLDR_TRACE_BARRIERS"):
        return
    stall = os.environ.get("PLDR_STALL_WRITE")
    stall_process, stall_key = None, None
    if stall:
        process, step = (int(x) for x in stall.split(":"))
        stall_process, stall_key = process, f"_async_write_complete.{step}"
    from orbax.checkpoint._src.multihost import multihost
    orig = multihost.get_barrier_sync_fn

    def get_barrier_sync_fn(**kw):
        fn = orig(**kw)

        def traced(*, key, timeout_ms):
            import jax
            me = jax.process_index()
            if me == stall_process and key.split("/")[-1] == stall_key:
                print(f"[test] process {me}: the write stalls before barrier {key}", file=sys.stderr, flush=True)
                time.sleep(3600)
            print(f"[test] process {me} waits at barrier {key}", file=sys.stderr, flush=True)
            return fn(key=key, timeout_ms=timeout_ms)
        return traced
    multihost.get_barrier_sync_fn = get_barrier_sync_fn


def finish_processes(procs: Sequence, timeout: float = 240) -> list[str]:
    """Wait for every subprocess.Popen of `procs` (text stdout, stderr merged), killing any still
    running on the way out; assert each exited 0 (with the end of its log); their logs."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-5000:]
    return logs
