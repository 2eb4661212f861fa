"""`pldr-jax train`: pretrain a PLDR-LLM (presets + overrides), or the README's main job.

Examples::

    pldr-jax train --main-job                                  # small model, embedded corpus, CPU, minutes
    pldr-jax train --preset small --steps 2000 --workdir runs/small
    pldr-jax train --preset v51-110m --data jsonl:data.jsonl:text --tokenizer paper.model \\
        --mesh=-1,8,1 --batch-size 32 --seq-len 1024         # the paper's recipe (AdamW, warm-up 2000, ...)
    pldr-jax train --preset v51g-106m --g-source external:G.npz   # v510G ablation with a given G_LM
    pldr-jax train --preset small --set num_layers=2 --set A_dff=32 --dtype bfloat16 --resume

Model: ``--preset`` (see ``pldr_jax.PRESETS``) or ``--config FILE.json``, then ``--set key=value``
overrides of `PLDRConfig` fields.  Training: a recipe (``--recipe``, default from the preset:
"paper" for the 110M presets, "paper-dag" for v51-dag-110m, "cpu" for the small ones) whose fields
the other flags override.  Multi-host: pass ``--coordinator-address host:port --num-processes N
--process-id i`` on every process (or nothing on TPU pods / SLURM, where JAX finds them itself
with ``--distributed``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .recipes import PRESET_RECIPE as _PRESET_RECIPE
from .recipes import RECIPES

__all__ = ["add_parser", "run", "RECIPES", "MAIN_JOB_MODEL", "MAIN_JOB_RECIPE", "main_job"]

#: The README main job's model: 4 layers, d_model 192, 6 heads (dk 32), learned G with a
#: 1-unit x 2-GLU metric learner, a 2000-piece tokenizer trained on the embedded corpus.
MAIN_JOB_MODEL = dict(num_layers=4, d_model=192, num_heads=6, dff=512, vocab_size=2000, max_seq_len=256,
                      A_dff=48, num_reslayerA=1, num_denseA=2)
MAIN_JOB_RECIPE = dict(steps=300, learning_rate=2e-3, warmup_steps=30, alpha=0.1, weight_decay=0.1,
                       clip_value=1.0, batch_size=16, seq_len=128, vocab_size=2000, validation_fraction=0.05,
                       log_every=10, eval_every=50, eval_batches=8, save_every=100, keep_checkpoints=2,
                       data="builtin")
MAIN_JOB_PROMPTS = ("The for statement", "A module is", "Return the", "The default value of")


def _bool_or_none(p, name, help):
    g = p.add_mutually_exclusive_group()
    g.add_argument(f"--{name}", dest=name.replace("-", "_"), action="store_true", default=None, help=help)
    g.add_argument(f"--no-{name}", dest=name.replace("-", "_"), action="store_false", default=None)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="pretrain a PLDR-LLM (or --main-job: the README demo)",
                              description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--main-job", action="store_true",
                   help="train a small PLDR-LLM on the embedded corpus (CPU, a few minutes), save a checkpoint, "
                        "generate text from it with the KV- and G-cache, print a summary")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default=None, help="model preset (default 'small'; see pldr_jax.PRESETS)")
    m.add_argument("--config", default=None, metavar="FILE.json", help="model config JSON instead of a preset")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a PLDRConfig field (repeatable), e.g. --set num_layers=2")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of the matmul path (master weights and deductive path stay float32)")
    t = p.add_argument_group("training")
    t.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="training defaults (see RECIPES)")
    t.add_argument("--workdir", default=None, help="outputs: checkpoints/, metrics.jsonl, loss_curve.png, ...")
    t.add_argument("--steps", type=int, default=None, help="optimiser updates in total")
    t.add_argument("--batch-size", type=int, default=None, help="global batch (all processes)")
    t.add_argument("--seq-len", type=int, default=None)
    t.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=None, help="peak LR")
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--total-steps", type=int, default=None, help="end of the cosine decay (default --steps)")
    t.add_argument("--alpha", type=float, default=None, help="final LR = alpha x peak")
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--clip-value", type=float, default=None, help="clip gradients by value (reference: 1.0)")
    t.add_argument("--no-clip-value", action="store_true", help="no clipping by value")
    t.add_argument("--clip-norm", type=float, default=None, help="clip gradients by global norm")
    t.add_argument("--dag", default=None, metavar="cA,cP,cG", help="DAG regulariser coefficients")
    t.add_argument("--grad-accum", type=int, default=None, help="micro-batches per update")
    _bool_or_none(t, "remat", "rematerialise layers in the backward pass (less memory)")
    _bool_or_none(t, "unroll-layers", "unrolled layer loop (default on CPU, faster there) or, with --no-unroll-layers, "
                                      "lax.scan (compile time flat in depth; default on accelerators)")
    _bool_or_none(t, "pad-aware-A", "mask padding out of the metric tensor A (the reference does not)")
    t.add_argument("--g-source", default=None,
                   help="predefined-G models: identity | random_normal[:scale] | uniform[:lo:hi] | external:FILE.npz")
    t.add_argument("--seed", type=int, default=None)
    d = p.add_argument_group("data")
    d.add_argument("--data", action="append", default=None,
                   help="documents: builtin (embedded corpus), a path, jsonl:PATH:FIELD, "
                        "parquet:PATH:COLUMN, hf:NAME[:FIELD[:SPLIT]] (tokenized in memory); "
                        "tokens:DIR (made by pldr-jax data prepare; rows read in place); "
                        "stream:SPEC (tokenized on the fly; needs --tokenizer).  Repeat as SPEC@WEIGHT to mix "
                        "several sources by weight (pldr_jax.data.mixture)")
    d.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: tokens:DIR's own, else train one "
                                                     "on the data)")
    d.add_argument("--vocab-size", type=int, default=None, help="size of a trained tokenizer")
    d.add_argument("--data-mode", choices=("pack", "pad", "nopad"), default=None)
    d.add_argument("--validation-fraction", type=float, default=None)
    d.add_argument("--data-seed", type=int, default=None)
    d.add_argument("--data-state", choices=("restart", "skip"), default=None,
                   help="--resume when the checkpoint's data position cannot be continued exactly (other data "
                        "settings, an older data pipeline): restart the data, or skip the batches already seen")
    r = p.add_argument_group("mesh, logging, checkpoints")
    r.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="mesh axis sizes, one may be -1 (write --mesh=-1,8,1)")
    r.add_argument("--log-every", type=int, default=None)
    r.add_argument("--eval-every", type=int, default=None, help="0: validate only at the end")
    r.add_argument("--eval-batches", type=int, default=None)
    r.add_argument("--save-every", type=int, default=None, help="0: checkpoint only at the end")
    r.add_argument("--keep", dest="keep_checkpoints", type=int, default=None, help="checkpoints kept")
    r.add_argument("--sync-checkpoints", action="store_true", help="save synchronously")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --workdir")
    r.add_argument("--overwrite", action="store_true", help="delete a previous run's outputs in --workdir")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-plot", action="store_true", help="no loss-curve PNG at the end")
    r.add_argument("--nonfinite", choices=("skip", "stop", "off"), default=None,
                   help="a step with a non-finite loss/gradient: skip it (default), stop after saving the "
                        "last good state, or off (no check, as the reference)")
    r.add_argument("--max-skipped", type=int, default=None, help="with --nonfinite skip: stop after this many")
    r.add_argument("--backend-option", dest="backend_option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a backend choice of the platform (repeatable; a pldr_jax.backend.BackendChoices "
                        "field), e.g. --backend-option kernels=xla --backend-option attention_block=128")
    r.add_argument("--print-config", action="store_true", help="print the resolved configs as JSON and exit")
    g = p.add_argument_group("main job")
    g.add_argument("--prompt", action="append", default=None, help="prompt(s) for the main job's samples")
    g.add_argument("--max-new-tokens", type=int, default=40)
    x = p.add_argument_group("multi-process")
    x.add_argument("--coordinator-address", default=None, metavar="HOST:PORT")
    x.add_argument("--num-processes", type=int, default=None)
    x.add_argument("--process-id", type=int, default=None)
    x.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, ...)")
    x.add_argument("--heartbeat-timeout", type=int, default=None, metavar="S",
                   help="seconds without heartbeats after which a process is declared dead and the others stop "
                        "(default 45)")
    x.add_argument("--sync-timeout", dest="sync_timeout_s", type=float, default=None, metavar="S",
                   help="longest wait across processes (barriers, agreeing on the checkpoint to resume from) "
                        "before the run stops with a message (default 900)")
    _add_operations_flags(p)
    p.set_defaults(func=run)
    return p


def _add_operations_flags(p: argparse.ArgumentParser) -> None:
    """Watching, stopping and steering a run: preemption, profiles, TensorBoard, dynamics, in-loop evaluation."""
    o = p.add_argument_group("operations")
    o.add_argument("--max-runtime", default=None, metavar="DURATION",
                   help="stop with a checkpoint after this long (2h, 90m, 1h30m, seconds), as on SIGTERM; "
                        "--resume continues")
    o.add_argument("--profile-steps", default=None, metavar="A:B",
                   help="jax.profiler trace of steps A..B into WORKDIR/profile (TensorBoard's Profile tab)")
    o.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events in WORKDIR/tensorboard")
    o.add_argument("--dynamics-every", type=int, default=None, metavar="N",
                   help="every N steps: order parameter, G_LM drift and determinant decimals of cached vs "
                        "recomputed G_LM on a fixed probe batch (learned-G models; 0 = off)")
    o.add_argument("--dynamics-rows", type=int, default=None, metavar="R", help="probe rows (default 4)")
    o.add_argument("--dynamics-prompt-len", type=int, default=None, metavar="P",
                   help="probe tokens whose G_LM is cached (default seq_len / 2)")
    o.add_argument("--eval-tasks", action="append", default=None, metavar="TASK[,TASK]",
                   help="lm-evaluation-harness tasks (names or YAML paths of local tasks) run on the in-memory "
                        "parameters while training")
    o.add_argument("--eval-tasks-every", type=int, default=None, metavar="N", help="0: at the end only")
    o.add_argument("--eval-tasks-limit", type=int, default=None, metavar="K", help="examples per task")


def _operations_fields(args) -> dict:
    """TrainConfig fields of the operations flags (and of a repeated --data: a mixture)."""
    from ..data.mixture import parse_mixture
    from .preemption import parse_duration
    from .profiling import parse_profile_steps
    kw: dict = {}
    data = getattr(args, "data", None)
    if isinstance(data, list):
        if len(data) == 1 and "@" not in data[0]:
            kw["data"] = data[0]
        elif data:
            kw["data_mixture"] = parse_mixture(data)
    if getattr(args, "max_runtime", None) is not None:
        kw["max_runtime_s"] = parse_duration(args.max_runtime)
    if getattr(args, "profile_steps", None) is not None:
        kw["profile_steps"] = parse_profile_steps(args.profile_steps)
    if getattr(args, "no_tensorboard", False):
        kw["tensorboard"] = False
    for f in ("dynamics_every", "dynamics_rows", "dynamics_prompt_len", "eval_tasks_every", "eval_tasks_limit"):
        if getattr(args, f, None) is not None:
            kw[f] = getattr(args, f)
    if getattr(args, "eval_tasks", None):
        kw["eval_tasks"] = tuple(t.strip() for item in args.eval_tasks for t in item.split(",") if t.strip())
    return kw


# --------------------------------------------------------------------------- config building
def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return None if v.lower() == "none" else v


def _model_overrides(args) -> dict:
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = _parse_value(v.strip())
    if args.dtype:
        overrides["dtype"] = args.dtype
    return overrides


def model_config(args, base: dict | None = None):
    from ..config import PLDRConfig
    overrides = _model_overrides(args)
    if base is not None:
        return PLDRConfig.from_dict({**base, **overrides})
    if args.config and args.preset:
        raise ValueError("give --preset or --config, not both")
    if args.config:
        record = read_run_record(args.config)
        if record is not None:
            return PLDRConfig.from_dict({**record["model"], **overrides})
        return PLDRConfig.from_json_file(args.config, **overrides)
    return PLDRConfig.preset(args.preset or "small", **overrides)


DEFAULT_WORKDIR = "runs/pldr"
_FLAG_FIELDS = ("workdir", "steps", "batch_size", "seq_len", "learning_rate", "warmup_steps", "total_steps", "alpha",
                "weight_decay", "clip_norm", "grad_accum", "remat", "unroll_layers", "pad_aware_A", "g_source", "seed", "data",
                "tokenizer", "vocab_size", "data_mode", "validation_fraction", "data_seed", "data_state", "log_every",
                "eval_every", "eval_batches", "save_every", "keep_checkpoints", "nonfinite", "max_skipped",
                "sync_timeout_s")


def train_config(args, recipe: dict, cfg):
    from ..backend import parse_backend_options
    from .config import TrainConfig
    from .sharding import parse_mesh_shape
    kw = dict(recipe)
    for f in _FLAG_FIELDS:
        v = getattr(args, f, None)
        if v is not None and f != "data":
            kw[f] = v
    kw.update(_operations_fields(args))
    if args.clip_value is not None:
        kw["clip_value"] = args.clip_value
    if args.no_clip_value:
        kw["clip_value"] = None
    if args.dag is not None:
        vals = [float(x) for x in args.dag.split(",")]
        if len(vals) != 3:
            raise ValueError(f"--dag expects three comma-separated numbers cA,cP,cG, got {args.dag!r}")
        kw["dag_coeffs"] = tuple(vals)
    if args.mesh is not None:
        kw["mesh"] = parse_mesh_shape(args.mesh)
    if args.backend_option:
        kw["backend_options"] = {**dict(kw.get("backend_options", ())), **parse_backend_options(args.backend_option)}
    kw.setdefault("workdir", DEFAULT_WORKDIR)
    kw.setdefault("vocab_size", cfg.vocab_size)
    if "steps" in kw and "total_steps" not in kw and kw.get("warmup_steps", 100) > kw["steps"]:
        kw["warmup_steps"] = max(kw["steps"] // 10, 0)
    kw.update(resume=args.resume, overwrite=args.overwrite, async_checkpoint=not args.sync_checkpoints,
              progress=not args.no_progress, plot=not args.no_plot)
    return TrainConfig(**kw)


# --------------------------------------------------------------------------- run settings: config files, --resume
#: Entries of a run record (run_config.json, a checkpoint's config item).
RUN_RECORD_KEYS = ("model", "train", "tokenizer", "g_lm", "mesh", "process_count", "digest", "recipe",
                   "throughput")
#: TrainConfig fields that belong to this invocation, never taken from a stored run.
_INVOCATION_FIELDS = ("workdir", "resume", "overwrite", "progress", "plot", "async_checkpoint", "data_state",
                      "max_runtime_s", "profile_steps")
#: PLDRConfig fields a resumed run may change (the compute dtype; the stored weights stay float32).
_RESUMABLE_MODEL_FIELDS = ("dtype",)


def read_run_record(path) -> dict | None:
    """A run record ({"model": ..., "train": ...}: a run_config.json, a --print-config output) from a
    JSON file, its keys checked (ValueError naming an unknown one, in the record or in its "train"
    section); None when the file is a plain model config."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {p} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not ("model" in d and isinstance(d["model"], dict) or "train" in d):
        return None
    unknown = sorted(set(d) - set(RUN_RECORD_KEYS))
    if unknown:
        raise ValueError(f"config file {p}: unknown key(s) {unknown}; a run record holds {list(RUN_RECORD_KEYS)}")
    _check_record(d, str(p))
    return d


def _check_record(d: dict, where: str) -> None:
    from ..config import PLDRConfig, reject_unknown_fields
    from .config import TrainConfig
    for section, cls in (("model", PLDRConfig), ("train", TrainConfig)):
        if section in d and not isinstance(d[section], dict):
            raise ValueError(f"{where}: {section!r} must be a JSON object")
        try:
            reject_unknown_fields(cls, d.get(section) or {})
        except ValueError as e:
            raise ValueError(f"{where}: {section!r} section: {e}") from None


def stored_run(workdir) -> dict | None:
    """The settings a run in `workdir` was trained with: the config saved with its newest
    checkpoint whose config reads (a damaged one is left to the resume's own checks), else its
    run_config.json; None when it has neither."""
    from ..io.orbax_params import checkpoint_steps, read_run_config
    ckpt = Path(workdir) / "checkpoints"
    where = d = None
    for step in reversed(checkpoint_steps(ckpt)):
        try:
            where, d = f"{ckpt}/{step}/config", read_run_config(ckpt, step)
            break
        except Exception:  # noqa: BLE001 -- unreadable: the previous checkpoint's record
            continue
    if d is None and (Path(workdir) / "run_config.json").is_file():
        where, d = str(Path(workdir) / "run_config.json"), json.loads((Path(workdir) / "run_config.json").read_text())
    if d is None:
        return None
    if not isinstance(d.get("model"), dict) or not isinstance(d.get("train"), dict):
        raise ValueError(f"{where}: not a pldr-jax run record (no 'model' / 'train' sections)")
    _check_record(d, where)
    return d


def _model_flags_given(args) -> bool:
    return bool(args.preset or args.config)


def run_settings(args):
    """(model config, TrainConfig, recipe name) of this invocation.

    Fresh runs: the preset / --config model, the recipe's defaults (a run record given with --config
    provides the training settings instead), then the flags.  ``--resume`` of a run that has a
    stored record (`stored_run`): the stored model and training settings, then the flags given
    (explicitly) -- each difference printed; a different model shape or global batch is refused."""
    stored = stored_run(_workdir_arg(args)) if args.resume else None
    record = read_run_record(args.config) if args.config else None
    if stored is None:
        cfg = model_config(args)
        if record is not None and "train" in record:
            name, base = "--config", {k: v for k, v in record["train"].items() if k not in _INVOCATION_FIELDS}
            if args.recipe:
                name, base = args.recipe, {**base, **RECIPES[args.recipe]}
            return cfg, train_config(args, base, cfg), name
        name, recipe = preset_recipe(args, cfg)
        return cfg, train_config(args, recipe, cfg), name
    from ..config import PLDRConfig
    stored_cfg = PLDRConfig.from_dict(stored["model"])
    cfg = model_config(args) if _model_flags_given(args) else model_config(args, base=stored_cfg.to_dict())
    changed_model = [k for k in stored_cfg.to_dict() if getattr(cfg, k) != getattr(stored_cfg, k)]
    shape = [k for k in changed_model if k not in _RESUMABLE_MODEL_FIELDS]
    if shape:
        raise ValueError("--resume: the model differs from the run's ("
                         + ", ".join(f"{k}: run {getattr(stored_cfg, k)!r}, given {getattr(cfg, k)!r}" for k in shape)
                         + "); a checkpoint cannot change the model: leave out --preset/--config/--set, or start a "
                           "new run (another --workdir, or --overwrite)")
    base = {k: v for k, v in stored["train"].items() if k not in _INVOCATION_FIELDS}
    if (Path(_workdir_arg(args)) / "tokenizer.model").is_file():
        base["tokenizer"] = None  # the run's own copy (a recorded path may be gone with a moved run)
    name = "the run's"
    if args.recipe:
        name, base = args.recipe, {**base, **RECIPES[args.recipe]}
    tcfg = train_config(args, base, cfg)
    old = stored["train"]
    if tcfg.batch_size != old.get("batch_size", tcfg.batch_size):
        raise ValueError(f"--resume: the run's global batch size is {old['batch_size']}, not {tcfg.batch_size}: its data "
                         f"position counts global batches of {old['batch_size']} rows; resume with --batch-size "
                         f"{old['batch_size']} (or leave it out), or start a new run")
    changes = [f"{k} {getattr(stored_cfg, k)!r} -> {getattr(cfg, k)!r}" for k in changed_model]
    changes += [f"{k} {old[k]!r} -> {v!r}" for k, v in tcfg.to_dict().items()
                if k in old and k not in _INVOCATION_FIELDS and _jsonish(old[k]) != _jsonish(v)
                and not (k == "tokenizer" and args.tokenizer is None)]  # the run's own copy: not a change
    _say("resume: the run's stored model and training settings" + (f", changed by the flags given: "
                                                                    f"{'; '.join(changes)}" if changes else ""),
         to_stderr=args.print_config)
    return cfg, tcfg, name


def _jsonish(v):
    return json.loads(json.dumps(v))


def _workdir_arg(args) -> str:
    return args.workdir if args.workdir is not None else DEFAULT_WORKDIR


def _say(line: str, to_stderr: bool = False) -> None:
    import sys

    import jax
    if jax.process_index() == 0:
        print(line, file=sys.stderr if to_stderr else sys.stdout, flush=True)


# --------------------------------------------------------------------------- preset defaults
def preset_recipe(args, cfg) -> tuple[str, dict]:
    """(recipe name, its TrainConfig defaults fitted to the model): the recipe of ``--recipe``, else
    the preset's (`_PRESET_RECIPE`, "cpu" otherwise), with its sequence length cut to the model's
    ``max_seq_len`` so that ``pldr-jax train --preset NAME`` runs with no other flag."""
    name = args.recipe or _PRESET_RECIPE.get(args.preset or "", "cpu")
    recipe = dict(RECIPES[name])
    if "seq_len" in recipe:
        recipe["seq_len"] = min(recipe["seq_len"], cfg.max_seq_len)
    return name, recipe


def check_fits_model(cfg, tcfg) -> None:
    """Settings the model cannot take, refused in one line before any work (tokenizer training,
    data, compilation)."""
    if tcfg.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {tcfg.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}: pass "
                         f"--seq-len {cfg.max_seq_len} or less, or --set max_seq_len={tcfg.seq_len}")


def _init_distributed(args):
    from .multihost import DEFAULT_HEARTBEAT_S, init_distributed
    hb = args.heartbeat_timeout if args.heartbeat_timeout is not None else DEFAULT_HEARTBEAT_S
    if args.distributed:  # auto-detected cluster: JAX finds the coordinator itself
        init_distributed(None, None, None, heartbeat_timeout_s=hb, auto_detect=True)
    elif args.coordinator_address or (args.num_processes or 1) > 1:
        init_distributed(args.coordinator_address, args.num_processes, args.process_id, heartbeat_timeout_s=hb)
    else:
        return
    import jax
    if jax.process_count() > 1:  # a lost peer can abort this process from C++: its one line still comes
        from . import peerwatch
        peerwatch.start("pldr-jax train", Path(_workdir_arg(args)) / "checkpoints")


# --------------------------------------------------------------------------- commands
def run(args) -> int:
    if args.main_job:
        return main_job(args)
    _init_distributed(args)
    from .faults import quiet_background_save_errors
    quiet_background_save_errors()
    cfg, tcfg, recipe_name = run_settings(args)
    check_fits_model(cfg, tcfg)
    if args.print_config:
        print(json.dumps({"model": cfg.to_dict(), "train": tcfg.to_dict(), "recipe": recipe_name}, indent=2))
        return 0
    import jax
    from .loop import train
    if tcfg.tokenizer is None and cfg.vocab_size != tcfg.vocab_size:
        cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tcfg.vocab_size))
    res = train(cfg, tcfg)
    if jax.process_index() == 0:
        print(_summary(res))
    return 0


def _summary(res) -> str:
    from .reporting import run_summary
    return run_summary(res)


def main_job(args) -> int:
    """Train the small main-job model on the embedded corpus, save it, reload it from the
    checkpoint and generate text from it with the KV- and G-cache."""
    t0 = time.perf_counter()
    import jax
    from ..decode.text import generate_text
    from ..kernels.cli import build_and_report
    from .checkpoint import load_params
    from .loop import train
    recipe = dict(MAIN_JOB_RECIPE, workdir="runs/main-job")
    cfg = model_config(args, base=MAIN_JOB_MODEL)
    if args.vocab_size is not None and "vocab_size" not in {s.split("=", 1)[0] for s in args.set}:
        cfg = cfg.replace(vocab_size=args.vocab_size)
    tcfg = train_config(args, recipe, cfg)
    check_fits_model(cfg, tcfg)
    if not tcfg.resume:
        tcfg = tcfg.replace(overwrite=True)  # the demo starts afresh unless --resume
    if args.print_config:
        print(json.dumps({"model": cfg.to_dict(), "train": tcfg.to_dict()}, indent=2))
        return 0
    print(f"pldr-jax main job: a {cfg.num_layers}-layer PLDR-LLM (d_model {cfg.d_model}, {cfg.num_heads} heads, "
          f"learned G) on the embedded corpus, {tcfg.steps} steps of {tcfg.batch_size} x {tcfg.seq_len} tokens "
          f"on {jax.device_count()} {jax.devices()[0].platform.upper()} device(s)", flush=True)
    build_and_report(platform=jax.default_backend())   # the native CPU kernels: built or reused, visibly
    res = train(cfg, tcfg)
    print(_summary(res), flush=True)

    # reload from the checkpoint (what a user would do later) and generate with KV- and G-cache
    ck = Path(res.paths["checkpoints"])
    cfg2, params, _ = load_params(ck)
    prompts = args.prompt or list(MAIN_JOB_PROMPTS)
    t1 = time.perf_counter()
    out = generate_text(cfg2, params, res.paths["tokenizer"], prompts, max_new_tokens=args.max_new_tokens,
                        kv_cache=True, g_cache=True, temperature=0.8, top_k=20, seed=0)
    gen_s = time.perf_counter() - t1
    n_new = int(sum(out.output.num_generated))
    print(f"\nsamples (KV- and G-cache, top-k 20, temperature 0.8; {n_new} tokens in {gen_s:.1f} s):")
    for prm, txt in zip(prompts, out.texts):
        print(f"  > {prm}{txt if txt[:1] in (' ', ',', '.', ':', ';') else ' ' + txt}".replace("\n", " ")[:400])
    print(f"\nfiles: {res.paths['workdir']}/  (checkpoints/, metrics.jsonl, loss_curve.png, tokenizer.model, "
          f"run_config.json)")
    print(f"  generate again:  pldr-jax generate {res.paths['workdir']} --prompt 'The for statement'")
    print(f"main job done in {time.perf_counter() - t0:.0f} s")
    return 0
