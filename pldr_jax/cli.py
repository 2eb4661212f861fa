"""`pldr-jax` command line: one sub-command per workflow, each defined in its own module.

Each module in `COMMANDS` provides `add_parser(subparsers)` (registering its sub-command, whose
parser sets `func`) and does its imports lazily so `pldr-jax --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

COMMANDS = {
    "train": "pldr_jax.train.cli",
    "generate": "pldr_jax.decode.cli",
    "convert": "pldr_jax.io.cli",
    "eval": "pldr_jax.eval.cli",
    "analyze": "pldr_jax.analysis.cli",
    "data": "pldr_jax.data.cli",
    "compile": "pldr_jax.aot_cli",
    "kernels": "pldr_jax.kernels.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pldr-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a workflow whose module is absent in this build
            if e.name != module:
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: configs, prompts, files, checkpoints
        print(f"pldr-jax {args.command}: error: {e}", file=sys.stderr)
        _exit_now_if_multiprocess(2)
        return 2
    except FloatingPointError as e:  # training stopped on non-finite values (last good state saved)
        print(f"pldr-jax {args.command}: error: {e}", file=sys.stderr)
        _exit_now_if_multiprocess(3)
        return 3
    except (RuntimeError, TimeoutError) as e:  # resume impossible, a save failed, a cross-process wait timed out
        if not isinstance(e, _run_failures()):
            if _distributed_started():
                traceback.print_exc()
                _exit_now_if_multiprocess(1)
            raise
        print(f"pldr-jax {args.command}: error: {e}", file=sys.stderr)
        _exit_now_if_multiprocess(4, e)
        return 4
    except Exception:  # a bug or an unforeseen failure: the traceback, and no hang of the other processes
        if _distributed_started():
            traceback.print_exc()
            _exit_now_if_multiprocess(1)
        raise


def _exit_now_if_multiprocess(code: int, error: BaseException | None = None) -> None:
    """In a multi-process run, exit at once: orbax threads stuck on a failed collective save would
    keep the interpreter from exiting, and the other processes learn of this one's end from the
    coordination service's heartbeat (they stop with "another task died").  An error that every
    process raised together (`raised_on_every_process`, e.g. a failed checkpoint save) is first
    waited out at a short timed barrier, so that process 0, which hosts the coordination service,
    does not end the others before they have printed it."""
    if _distributed_started():
        sys.stdout.flush()
        sys.stderr.flush()
        if getattr(error, "raised_on_every_process", False):
            from .train import multihost
            try:
                multihost.barrier("pldr_exit_on_error", _EXIT_BARRIER_S)
            except Exception:  # a process already gone: leave anyway
                pass
        os._exit(code)


_EXIT_BARRIER_S = 30.0  # how long a process waits for the others to report an error raised on every process


def _distributed_started() -> bool:
    """Whether this process joined a multi-process run (`jax.distributed.initialize` was called); never
    initialises a backend itself."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    from jax._src import distributed
    return distributed.global_state.client is not None and jax.process_count() > 1


def _run_failures() -> tuple:
    """The failures of a run that are reported as a message and exit code 4 (not a traceback)."""
    from .train.checkpoint import CheckpointTimeout
    from .train.loop import CheckpointSaveError
    from .train.multihost import CrossProcessTimeout
    from .train.resume import ResumeError
    return ResumeError, CheckpointSaveError, CrossProcessTimeout, CheckpointTimeout


def console_main() -> int:
    """The `pldr-jax` console script: re-executes itself once with huge-page malloc for XLA:CPU's
    large per-step buffers (see `pldr_jax.train.host_memory`; PLDR_JAX_NO_HUGE_PAGES=1 opts out),
    then runs `main`."""
    from .train.host_memory import reexec_with_huge_pages
    reexec_with_huge_pages(["-c", "import sys; from pldr_jax.cli import main; sys.exit(main())", *sys.argv[1:]])
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
