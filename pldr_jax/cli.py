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
    "serve": "pldr_jax.serve.cli",
    "finetune": "pldr_jax.finetune.cli",
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
    use_cpu_without_accelerator()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: configs, prompts, files, checkpoints
        _print_error(args, e)
        _exit_now_if_multiprocess(2)
        return 2
    except FloatingPointError as e:  # training stopped on non-finite values (last good state saved)
        _print_error(args, e)
        _exit_now_if_multiprocess(3)
        return 3
    except (RuntimeError, TimeoutError) as e:  # resume impossible, a save failed, a cross-process wait timed out
        _exit_if_lost_peer(args, e)  # also a failed save or wait whose cause is a dead process
        if not isinstance(e, _run_failures()):
            if _distributed_started():
                traceback.print_exc()
                _exit_now_if_multiprocess(1)
            raise
        _print_error(args, e)
        _exit_now_if_multiprocess(4, e)
        return 4
    except Exception as e:  # a bug or an unforeseen failure: the traceback, and no hang of the other processes
        _exit_if_lost_peer(args, e)
        if _distributed_started():
            traceback.print_exc()
            _exit_now_if_multiprocess(1)
        raise


def _exit_now_if_multiprocess(code: int, error: BaseException | None = None) -> None:
    """In a multi-process run, exit at once: orbax threads stuck on a failed collective save would
    keep the interpreter from exiting, and the other processes learn of this one's end from their
    failing collectives or the coordination service's heartbeat (they stop with the lost-peer line,
    `train.peerwatch`).  An error that every
    process raised together (`raised_on_every_process`, e.g. a failed checkpoint save) is first
    waited out at a short timed barrier, so that process 0, which hosts the coordination service,
    does not end the others before they have printed it."""
    if _distributed_started():
        sys.stdout.flush()
        sys.stderr.flush()
        _tell_peer_watch()
        if getattr(error, "raised_on_every_process", False):
            from .train import multihost
            try:
                multihost.barrier("pldr_exit_on_error", _EXIT_BARRIER_S)
            except Exception:  # a process already gone: leave anyway
                pass
        os._exit(code)


def _print_error(args, error) -> None:
    """The command's final error line.  In multi-process training it goes through the lost-peer
    watcher (`train.peerwatch.report`), so that exactly one final line comes out when the JAX runtime
    aborts this process meanwhile (the watcher then prints its own line instead)."""
    line = f"pldr-jax {args.command}: error: {error}"
    sys.stdout.flush()
    sys.stderr.flush()
    peerwatch = sys.modules.get("pldr_jax.train.peerwatch")
    if peerwatch is None or not peerwatch.report(line):
        print(line, file=sys.stderr)


def _tell_peer_watch() -> None:
    """This process printed its final error (a traceback, or its line): the lost-peer watcher
    (`train.peerwatch`, started in multi-process training) adds none of its own if the JAX runtime
    aborts the process on the way out."""
    peerwatch = sys.modules.get("pldr_jax.train.peerwatch")
    if peerwatch is not None:
        peerwatch.reported()


def _exit_if_lost_peer(args, error: BaseException) -> None:
    """A multi-process run stopped because another process died: one line naming the newest complete
    checkpoint and how to resume (`train.faults.peer_failure_message`), not a page of collective
    errors; then exit 4 at once."""
    if not _distributed_started():
        return
    from pathlib import Path

    from .train.faults import is_peer_failure, peer_failure_message
    if not is_peer_failure(error):
        return
    from .train.cli import DEFAULT_WORKDIR
    workdir = getattr(args, "workdir", None) or DEFAULT_WORKDIR
    _print_error(args, peer_failure_message(error, Path(workdir) / 'checkpoints'))
    _exit_now_if_multiprocess(4)


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


_TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID",
            "CLOUD_TPU_TASK_ID", "TPU_PROCESS_ADDRESSES")
_ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*",  # TPU VMs (v2-v4: accel, v5e and later: vfio)
                        "/dev/nvidia[0-9]*", "/dev/kfd")     # NVIDIA and AMD GPUs


def use_cpu_without_accelerator(environ=os.environ) -> bool:
    """Set JAX_PLATFORMS=cpu when this machine has no accelerator, so that installed accelerator
    plugins (libtpu from the test extra, CUDA wheels) do not print their failed initialisation on
    every command.  Left alone: a JAX_PLATFORMS the user set, a TPU or GPU device file, TPU
    environment settings, or JAX backends already started.  Returns whether it set it."""
    import glob
    if environ.get("JAX_PLATFORMS") or any(environ.get(k) for k in _TPU_ENV):
        return False
    if any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES) or _pci_tpu_chips() > 0:
        return False
    jax = sys.modules.get("jax")
    if jax is not None:  # imported (pldr_jax imports it) but maybe not started: the config decides
        from jax._src import xla_bridge
        if xla_bridge.backends_are_initialized():
            return False
        jax.config.update("jax_platforms", "cpu")
    environ["JAX_PLATFORMS"] = "cpu"
    return True


def _pci_tpu_chips() -> int:
    """TPU chips on the PCI bus, as JAX's own TPU start-up counts them (0 when that helper is absent)."""
    try:
        from jax._src import hardware_utils
        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # another JAX version: the device files above still decide
        return 0


def console_main() -> int:
    """The `pldr-jax` console script: re-executes itself once with huge-page malloc for XLA:CPU's
    large per-step buffers (see `pldr_jax.train.host_memory`; PLDR_JAX_NO_HUGE_PAGES=1 opts out),
    then runs `main`."""
    use_cpu_without_accelerator()
    from .train.host_memory import reexec_with_huge_pages
    reexec_with_huge_pages(["-c", "import sys; from pldr_jax.cli import main; sys.exit(main())", *sys.argv[1:]])
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
