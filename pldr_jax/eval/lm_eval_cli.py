"""``pldr-jax eval harness RUN --tasks ...``: lm-evaluation-harness's own CLI, in-process, on a
pldr_jax checkpoint.

Everything after ``RUN`` that is not one of this command's options below goes to lm-eval's ``run``
command unchanged (``--tasks``, ``--num_fewshot``, ``--limit``, ``--batch_size``, ``--output_path``,
``--log_samples``, ``--use_cache``, ``--gen_kwargs``, ``--include_path``, ``--seed``, ...).  This
command adds:

* ``--model pldr_jax`` (`pldr_jax.eval.harness.PLDRLM`, registered after lm-eval's own models)
  with ``pretrained=RUN``; ``--model_args`` entries are merged in (and win);
* the run's tokenizer (`pldr_jax.io.run_tokenizer.resolve_tokenizer`; ``--tokenizer`` overrides);
* ``--batch_size``: unless given, the run's (`pldr_jax.eval.batch_size.run_batch_size`, else 8),
  not lm-eval's 1; ``auto`` / ``auto:N`` measures the largest batch that fits the memory budget
  (``--memory-budget-gb``; bounded by ``--max_batch_size``);
* the task configs shipped in ``pldr_jax/eval/tasks`` (``pldrllm_zeroshot``,
  ``pldrllm_tinybenchmarks``) on lm-eval's include path, beside any ``--include_path`` given.

lm-eval prints its results table (one row per task and metric: version, filter, n-shot, value,
stderr; then one per group) and, with ``--output_path``, writes ``results_<time>.json`` there.

lm-eval 0.4.13 discovers models only in its own package (no plugin entry points), so a bare
``lm_eval --model pldr_jax`` works only after ``import pldr_jax.eval.harness``; this command is
that, with the defaults above.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["TASKS_DIR", "add_harness_parser", "run_harness", "lm_eval_namespace"]

TASKS_DIR = Path(__file__).parent / "tasks"


def _own_parser() -> argparse.ArgumentParser:
    """This command's options (hyphenated, so none collides with lm-eval's underscored flags)."""
    from ..g_sources import G_SPEC_HELP
    from .multiple_choice import MODES

    p = argparse.ArgumentParser(prog="pldr-jax eval harness RUN", add_help=False, allow_abbrev=False)
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the run's own)")
    p.add_argument("--model-config", default=None, help="PLDRConfig JSON when the checkpoint lacks one")
    p.add_argument("--mode", choices=MODES, default=None, help="scoring mode (default: full)")
    p.add_argument("--g-source", default=None, help=f"fix G_LM; {G_SPEC_HELP} (not 'transfer')")
    p.add_argument("--max-gen-toks", type=int, default=None, help="default new-token limit of generation tasks")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="training directories: the checkpoint step to evaluate (default: the latest)")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="memory budget of --batch_size auto (default: 90%% of the accelerator's memory, "
                        "half the host's available memory on CPU)")
    return p


def add_harness_parser(sub) -> argparse.ArgumentParser:
    """Register ``harness`` under ``pldr-jax eval``."""
    own = _own_parser()
    h = sub.add_parser("harness", help="lm-evaluation-harness tasks (lm-eval's CLI with this model)",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1] + "\nthis command's options" + own.format_help()
                       .split("\noptions", 1)[-1], allow_abbrev=False)
    h.add_argument("model", metavar="RUN", help="training run directory, checkpoint or HF folder ('preset:<name>' "
                                                "for a random model)")
    h.add_argument("lm_eval_args", nargs=argparse.REMAINDER,
                   help="this command's options (below) and lm-eval's `run` options, e.g. --tasks arc_easy")
    h.set_defaults(func=_run)
    return h


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval._cli.run import Run
    except ImportError as e:
        raise ValueError(f"pldr-jax eval harness needs lm-evaluation-harness ({e}); install it with "
                         "pip install 'lm-eval==0.4.13'") from None
    return Run


def lm_eval_namespace(model: str, argv: list[str]) -> argparse.Namespace:
    """lm-eval ``run`` arguments (a Namespace of lm-eval's own parser) for evaluating ``model``
    with ``argv`` (this command's options and lm-eval's); see the module docstring."""
    Run = _import_lm_eval()
    from . import harness  # registers "pldr_jax" (after lm-eval's own models)
    from .batch_size import DEFAULT_BATCH_SIZE, parse_batch_size, run_batch_size

    if not harness.REGISTERED:
        raise ValueError("lm-eval is installed but its model registry could not be loaded")
    ours, rest = _own_parser().parse_known_args(argv)
    top = argparse.ArgumentParser(prog="pldr-jax eval harness RUN", allow_abbrev=False)
    Run.create(top.add_subparsers(dest="command"))
    ns = top.parse_args(["run", *rest])
    if ns.model not in (None, "pldr_jax"):
        raise ValueError(f"pldr-jax eval harness evaluates RUN with --model pldr_jax, got --model {ns.model}; "
                         "run lm_eval itself for other models")
    ns.model = "pldr_jax"
    extra = {"tokenizer": ours.tokenizer, "config": ours.model_config, "mode": ours.mode,
             "g_source": ours.g_source, "max_gen_toks": ours.max_gen_toks,
             "memory_budget_gb": ours.memory_budget_gb, "step": ours.step}
    ns.model_args = {"pretrained": str(model), **{k: v for k, v in extra.items() if v is not None},
                     **(getattr(ns, "model_args", None) or {})}
    harness.check_model_args(ns.model_args)  # before lm-eval loads any task
    if "batch_size" in ns.model_args:
        raise ValueError("give the batch size as --batch_size, not in --model_args")
    if getattr(ns, "batch_size", None) is None:
        ns.batch_size = run_batch_size(model) or DEFAULT_BATCH_SIZE
    else:
        ns.batch_size = parse_batch_size(ns.batch_size)
    user = getattr(ns, "include_path", None)
    ns.include_path = [str(TASKS_DIR)] + ([user] if user else [])
    return ns


def run_harness(model: str, argv: list[str]) -> int:
    """Run lm-eval's ``run`` command in-process on ``model`` (see the module docstring)."""
    ns = lm_eval_namespace(model, argv)
    from ..compile_cache import enable_compile_cache
    enable_compile_cache()  # as pldr-jax generate: $PLDR_JAX_COMPILE_CACHE=off turns it off
    from lm_eval.utils import setup_logging
    setup_logging()
    ns.func(ns)
    return 0


def _run(args) -> int:
    argv = list(args.lm_eval_args)
    if "-h" in argv or "--help" in argv:
        Run = _import_lm_eval()
        print(_own_parser().format_help())
        top = argparse.ArgumentParser(prog="pldr-jax eval harness RUN")
        Run.create(top.add_subparsers(dest="command"))
        top.parse_args(["run", "--help"])
        return 0
    if not argv:
        raise ValueError("give the tasks: pldr-jax eval harness RUN --tasks TASK[,TASK...] [lm-eval options]")
    return run_harness(args.model, argv)
