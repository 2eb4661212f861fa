"""Resuming a run: the newest checkpoint that every process can restore and that matches its digest.

`restore_latest_good(directory, abstract_state, ...)` is collective: every process of the run calls
it (with one process nothing is exchanged).  For each step directory, newest first:

1. every process checks the step's files (`integrity.check_step_files`) and restores the state onto
   `abstract_state` -- the *current* mesh, whatever mesh or process count wrote it -- with orbax's
   handler directly (no orbax barrier: a process whose read fails cannot leave another waiting in
   one), and reads its data-iterator state (re-sharded when the process count changed: see
   `data_state_for`);
2. the processes exchange what they found (`multihost.all_gather_json`, timed) so that all of them
   take the same decision;
3. a failure that is not proven corruption (`integrity.is_corruption`: a timeout, a different
   model or optimiser structure, a missing library, permissions, memory, an iterator that cannot be
   re-sharded) raises `ResumeError` on every process -- nothing is moved, the run does not start;
4. otherwise, when every process restored the state, the digest saved with it is recomputed on the
   restored arrays (`integrity.tree_digest`, sharding-independent, identical on every process);
5. a step proven corrupt (unreadable files or a digest mismatch) is moved by process 0 to
   ``<directory>.corrupt/`` (never deleted), reported, and the previous step is tried.

If checkpoints existed but none was good, `ResumeError` says so: a resumed run never silently
starts from step 0.  With no checkpoint at all, `restore_latest_good` returns None.

In `train`: `decide_resume(run)` (collective) restores the newest good checkpoint, or refuses a
workdir that holds checkpoints when the run was not asked to resume; `restore_position(run)` puts
the restored state and the data iterator's position into the run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax

from . import multihost
from .integrity import check_step_files, digest_mismatches, error_summary, is_corruption, quarantine

__all__ = ["ResumeError", "ResumePoint", "restore_latest_good", "checkpoint_steps", "data_state_for",
           "restore_state", "decide_resume", "restore_position"]


class ResumeError(ValueError):
    """Resuming is impossible for a reason that is not corruption; nothing on disk was changed
    (except checkpoints proven corrupt, listed in the message)."""


@dataclasses.dataclass
class ResumePoint:
    """step: the restored step.  state: the TrainState on the current mesh.  config: the JSON record
    saved with it.  data_state: this process's data-iterator state (None when none was saved).
    quarantined: [{"step", "moved_to", "problems"}] of newer steps proven corrupt (moved aside).
    notes: what the caller should tell the user (no digest, data re-sharded)."""
    step: int
    state: Any
    config: dict
    data_state: dict | None
    quarantined: list
    notes: list


def checkpoint_steps(directory: str | Path) -> list[int]:
    """Steps of the finished checkpoints in `directory`, ascending (orbax's unfinished
    ``*.orbax-checkpoint-tmp-*`` directories, left by a killed save, are not steps)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def restore_state(state_dir: str | Path, abstract_state: Any) -> Any:
    """The orbax state item in `state_dir` restored onto `abstract_state` (shapes, dtypes and
    target shardings, e.g. `sharding.abstract_train_state(cfg, tx, mesh)`), reading only this
    process's shards, with no cross-process barrier."""
    import orbax.checkpoint as ocp
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.restore(Path(state_dir), args=ocp.args.StandardRestore(abstract_state))
    finally:
        handler.close()


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def data_state_for(step_dir: str | Path, process_index: int, process_count: int) -> tuple[dict | None, str | None]:
    """(this process's data-iterator state, a note or None) from a checkpoint's ``data`` item.

    Written by the same process count: process i's own file.  Written by another count: the states
    of all writers must be equal -- true of `pldr_jax.data.PretrainDataset` iterators, whose state
    is the index of the next *global* batch (every process reads its slice of the same global
    batches, so the sequence of global batches does not depend on the process count) -- and that
    state is used by every process; otherwise `ResumeError` (the iterator cannot be re-sharded).
    """
    d = Path(step_dir) / "data"
    files = {}
    for f in sorted(d.glob("process_*-of-*.json")) if d.is_dir() else []:
        m = _DATA_FILE.search(f.name)
        files[(int(m.group(1)), int(m.group(2)))] = f
    if not files:
        return None, None
    counts = {n for _, n in files}
    if (process_index, process_count) in files:
        return json.loads(files[(process_index, process_count)].read_text()), None
    if len(counts) != 1:
        raise ResumeError(f"{d} mixes data-iterator states of different process counts {sorted(counts)}")
    saved = counts.pop()
    if len(files) != saved:
        missing = sorted(set(range(saved)) - {i for i, _ in files})
        raise ResumeError(f"{d} lacks the data-iterator states of processes {missing} of {saved}")
    states = [json.loads(files[(i, saved)].read_text()) for i in range(saved)]
    if any(s != states[0] for s in states[1:]):
        raise ResumeError(
            f"checkpoint {Path(step_dir).name} was written by {saved} processes whose data-iterator states differ "
            f"({states[:4]}{' ...' if saved > 4 else ''}); this iterator cannot be re-sharded onto {process_count} "
            f"processes. Resume with {saved} processes, or use in-memory or tokens:DIR data (their position is "
            "global; a stream: position is per process)")
    return states[0], (f"data position re-sharded: checkpoint written by {saved} process(es), resumed on "
                       f"{process_count}; every process continues at the same global batch ({states[0]})")


def _probe(step_dir: Path, abstract_state, expect_model: dict | None, want_data: bool):
    """This process's findings about one step: (report dict, state, config, data_state, note)."""
    problems, config = check_step_files(step_dir)
    report: dict = {"problems": problems, "error": None}
    if problems:
        return report, None, config, None, None
    if config is not None and expect_model is not None and config.get("model") not in (None, expect_model):
        report["error"] = (f"checkpoint {step_dir.name} was trained with a different model config:\n"
                           f"  saved:   {config['model']}\n  current: {expect_model}")
        return report, None, config, None, None
    data_state = note = None
    try:
        if want_data:
            data_state, note = data_state_for(step_dir, jax.process_index(), jax.process_count())
        state = restore_state(step_dir / "state", abstract_state)
    except ResumeError as e:
        report["error"] = str(e)
        return report, None, config, None, None
    except Exception as e:  # classify: only proven corruption may move the checkpoint
        if is_corruption(e):
            report["problems"] = [f"state arrays unreadable ({error_summary(e)})"]
        else:
            report["error"] = (f"restoring checkpoint {step_dir} failed ({error_summary(e)}); this is not proof "
                               "of corruption, so the checkpoint was left in place")
        return report, None, config, None, None
    return report, state, config, data_state, note


def restore_latest_good(directory: str | Path, abstract_state: Any, *, expect_model: dict | None = None,
                        want_data: bool = True, timeout_s: float = multihost.DEFAULT_TIMEOUT_S,
                        log: Callable[[str], Any] = print) -> ResumePoint | None:
    """The newest good checkpoint of `directory`, restored (see the module docstring).

    expect_model: the current `PLDRConfig.to_dict()`; a checkpoint of another model is a
    `ResumeError`.  want_data: also read this process's data-iterator state.  log: warnings
    (quarantines) and notes, on every process (pass a process-0-only function to print once)."""
    root = Path(directory).absolute()
    steps = checkpoint_steps(root)
    seen = multihost.all_gather_json("resume/steps", steps, timeout_s)
    if any(s != steps for s in seen):
        raise ResumeError(f"the processes see different checkpoints in {root}: "
                          + "; ".join(f"process {i}: {s}" for i, s in enumerate(seen))
                          + ". Every process must see the same checkpoint directory (a shared file system)")
    quarantined: list[dict] = []
    notes: list[str] = []
    for step in reversed(steps):
        report, state, config, data_state, note = _probe(root / str(step), abstract_state, expect_model, want_data)
        reports = multihost.all_gather_json(f"resume/probe/{step}", report, timeout_s)
        errors = [(i, r["error"]) for i, r in enumerate(reports) if r["error"]]
        if errors:
            moved = f" (checkpoints proven corrupt and moved aside: {quarantined})" if quarantined else ""
            raise ResumeError("cannot resume from " + str(root / str(step)) + ": "
                              + "; ".join(f"process {i}: {e}" for i, e in errors) + moved)
        problems = sorted({p for r in reports for p in r["problems"]})
        if not problems:
            digest = (config or {}).get("digest")
            if isinstance(digest, dict) and isinstance(digest.get("leaves"), dict):
                bad = digest_mismatches(digest["leaves"], state)  # collective on every process, same result
                if bad:
                    problems = [f"state arrays do not match the digest saved with them ({len(bad)} leaves, e.g. "
                                f"{bad[:3]}): corrupted bytes"]
            else:
                notes.append(f"checkpoint {step} carries no digest (written before digests existed): its arrays "
                             "were read back but could not be checked for flipped bytes")
        if not problems:
            if note:
                notes.append(note)
            for n in notes:
                log("note: " + n)
            return ResumePoint(step=step, state=state, config=config or {}, data_state=data_state,
                               quarantined=quarantined, notes=notes)
        del state
        dest = str(quarantine(root, step)) if jax.process_index() == 0 else None
        dest = multihost.all_gather_json(f"resume/quarantine/{step}", dest, timeout_s)[0]
        quarantined.append({"step": step, "moved_to": dest, "problems": problems})
        log(f"warning: checkpoint {root / str(step)} is corrupted: {'; '.join(problems)}; moved to {dest}; "
            "trying the previous checkpoint")
    if steps:
        raise ResumeError(f"no usable checkpoint in {root}: every one was proven corrupt and moved aside "
                          f"({quarantined}). Nothing to resume from: inspect them, or start again without "
                          "--resume (--overwrite)")
    return None


def decide_resume(run) -> ResumePoint | None:
    """The checkpoint `run` (a `setup.TrainRun`) resumes from: with ``resume`` the newest good one
    (None when there is none), without it None -- and a checkpoint directory that already holds
    checkpoints is refused.  Collective: every process restores, all agree on the step (or all
    raise `ResumeError`); quarantine moves are done when it returns."""
    tcfg, ckpt_dir = run.tcfg, run.ckpt_dir
    point = None
    if tcfg.resume:
        point = restore_latest_good(ckpt_dir, run.abstract, expect_model=run.model_cfg.to_dict(),
                                    timeout_s=tcfg.sync_timeout_s, log=run.log)
    elif checkpoint_steps(ckpt_dir):
        raise ValueError(f"{ckpt_dir} already holds checkpoints (latest step {checkpoint_steps(ckpt_dir)[-1]}); "
                         "pass resume=True (--resume) to continue, overwrite=True (--overwrite) to start again, "
                         "or another workdir")
    multihost.barrier("pldr_resume_decided", tcfg.sync_timeout_s)  # before orbax lists the steps
    return point


def restore_position(run) -> None:
    """The restored state into `run`, and its data iterator moved to the checkpoint's position (a
    checkpointable iterator without a saved position is refused: it would repeat data silently)."""
    point, ckpt_dir = run.resume_point, run.ckpt_dir
    if run.checkpointable_data and point.data_state is not None:
        run.batches.set_state(point.data_state)
    elif run.checkpointable_data:
        raise ResumeError(f"checkpoint {ckpt_dir / str(point.step)} holds no data-iterator state but this "
                          "run's data is checkpointable: resuming would repeat data silently; resume with the "
                          "data the checkpoint was written with")
    else:
        run.log("warning: the training data has no get_state()/set_state(); it restarts from its beginning")
    run.state = point.state
    run.log(f"resumed from {ckpt_dir / str(point.step)} (step {int(run.state.step)})")
    run.start_step = run.step = int(run.state.step)
