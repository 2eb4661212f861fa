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
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "RECIPES", "MAIN_JOB_MODEL", "MAIN_JOB_RECIPE", "main_job"]

#: Training recipes: TrainConfig field defaults (flags override them).
RECIPES: dict[str, dict[str, Any]] = {
    # the paper's: AdamW(0.9, 0.95, eps 1e-5, wd 0.1), clip by value 1.0, warm-up 2000, cosine to 10% at 250k
    "paper": dict(learning_rate=1e-3, warmup_steps=2000, total_steps=250_000, steps=250_000, alpha=0.1,
                  weight_decay=0.1, clip_value=1.0, batch_size=32, seq_len=1024, data_mode="pack",
                  log_every=100, eval_every=12_000, eval_batches=2000, save_every=4000, keep_checkpoints=3),
    # the authors' DAG-regularised v510 training script: lr 1.5e-3 and DAG coefficients 0.05 each
    "paper-dag": dict(learning_rate=1.5e-3, warmup_steps=2000, total_steps=250_000, steps=250_000, alpha=0.1,
                      weight_decay=0.1, clip_value=1.0, batch_size=32, seq_len=1024, data_mode="pack",
                      dag_coeffs=(0.05, 0.05, 0.05), log_every=100, eval_every=12_000, eval_batches=2000,
                      save_every=4000, keep_checkpoints=3),
    # small models on a CPU
    "cpu": dict(learning_rate=1e-3, warmup_steps=50, steps=1000, alpha=0.1, weight_decay=0.1, clip_value=1.0,
                batch_size=16, seq_len=128, log_every=10, eval_every=100, eval_batches=20, save_every=250,
                keep_checkpoints=3),
}
_PRESET_RECIPE = {"v51-110m": "paper", "v51-dag-110m": "paper-dag", "v51g-106m": "paper"}

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
    d.add_argument("--data", default=None, help="documents: builtin (embedded corpus), a path, jsonl:PATH:FIELD, "
                                                "parquet:PATH:COLUMN, hf:NAME[:FIELD[:SPLIT]] (tokenized in memory); "
                                                "tokens:DIR (made by pldr-jax data prepare; rows read in place); "
                                                "stream:SPEC (tokenized on the fly; needs --tokenizer)")
    d.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: tokens:DIR's own, else train one "
                                                     "on the data)")
    d.add_argument("--vocab-size", type=int, default=None, help="size of a trained tokenizer")
    d.add_argument("--data-mode", choices=("pack", "pad", "nopad"), default=None)
    d.add_argument("--validation-fraction", type=float, default=None)
    d.add_argument("--data-seed", type=int, default=None)
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
                        "(default 100)")
    x.add_argument("--sync-timeout", dest="sync_timeout_s", type=float, default=None, metavar="S",
                   help="longest wait across processes (barriers, agreeing on the checkpoint to resume from) "
                        "before the run stops with a message (default 900)")
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------- config building
def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return None if v.lower() == "none" else v


def model_config(args, base: dict | None = None):
    from ..config import PLDRConfig
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = _parse_value(v.strip())
    if args.dtype:
        overrides["dtype"] = args.dtype
    if base is not None:
        return PLDRConfig(**{**base, **overrides})
    if args.config and args.preset:
        raise ValueError("give --preset or --config, not both")
    if args.config:
        return PLDRConfig.from_json_file(args.config, **overrides) if hasattr(PLDRConfig, "from_json_file") \
            else PLDRConfig.from_dict({**json.loads(Path(args.config).read_text()), **overrides})
    return PLDRConfig.preset(args.preset or "small", **overrides)


_FLAG_FIELDS = ("workdir", "steps", "batch_size", "seq_len", "learning_rate", "warmup_steps", "total_steps", "alpha",
                "weight_decay", "clip_norm", "grad_accum", "remat", "unroll_layers", "pad_aware_A", "g_source", "seed", "data",
                "tokenizer", "vocab_size", "data_mode", "validation_fraction", "data_seed", "log_every",
                "eval_every", "eval_batches", "save_every", "keep_checkpoints", "nonfinite", "max_skipped",
                "sync_timeout_s")


def train_config(args, recipe: dict, cfg):
    from ..backend import parse_backend_options
    from .config import TrainConfig
    from .sharding import parse_mesh_shape
    kw = dict(recipe)
    for f in _FLAG_FIELDS:
        v = getattr(args, f, None)
        if v is not None:
            kw[f] = v
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
    kw.setdefault("workdir", "runs/pldr")
    kw.setdefault("vocab_size", cfg.vocab_size)
    if "steps" in kw and "total_steps" not in kw and kw.get("warmup_steps", 100) > kw["steps"]:
        kw["warmup_steps"] = max(kw["steps"] // 10, 0)
    kw.update(resume=args.resume, overwrite=args.overwrite, async_checkpoint=not args.sync_checkpoints,
              progress=not args.no_progress, plot=not args.no_plot)
    return TrainConfig(**kw)


def _init_distributed(args):
    from .multihost import DEFAULT_HEARTBEAT_S, init_distributed
    hb = args.heartbeat_timeout if args.heartbeat_timeout is not None else DEFAULT_HEARTBEAT_S
    if args.distributed:  # auto-detected cluster: JAX finds the coordinator itself
        init_distributed(None, None, None, heartbeat_timeout_s=hb, auto_detect=True)
    elif args.coordinator_address or (args.num_processes or 1) > 1:
        init_distributed(args.coordinator_address, args.num_processes, args.process_id, heartbeat_timeout_s=hb)


# --------------------------------------------------------------------------- commands
def run(args) -> int:
    if args.main_job:
        return main_job(args)
    _init_distributed(args)
    cfg = model_config(args)
    recipe_name = args.recipe or _PRESET_RECIPE.get(args.preset or "", "cpu")
    tcfg = train_config(args, RECIPES[recipe_name], cfg)
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
    from .loop import read_metrics
    recs = read_metrics(res.paths["metrics"])
    tr = [r for r in recs if r.get("kind") == "train"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    lines = [f"trained steps {res.start_step} -> {res.end_step} in {res.wall_s:.1f} s"]
    if tr:
        tps = [r["tokens_per_s"] for r in tr[1:] if math.isfinite(r.get("tokens_per_s", float("nan")))]
        lines.append(f"train loss: {tr[0]['loss']:.3f} (step {tr[0]['step']}) -> {tr[-1]['loss']:.3f} "
                     f"(step {tr[-1]['step']}), min {min(r['loss'] for r in tr):.3f}"
                     + (f"; {sorted(tps)[len(tps) // 2]:.0f} tokens/s (median)" if tps else ""))
    if ev:
        lines.append("validation: " + ", ".join(f"step {r['step']}: loss {r['val_loss']:.3f} ppl "
                                                 f"{r['val_perplexity']:.1f}" for r in ev[-4:]))
    if res.resumed_from is not None:
        lines.append(f"resumed from checkpoint {res.resumed_from}")
    for q in res.quarantined:
        lines.append(f"quarantined: checkpoint {q['step']} (corrupt: {'; '.join(q['problems'])}) moved to "
                     f"{q['moved_to']}")
    for n in res.notes:
        lines.append(f"note: {n}")
    for k in ("checkpoints", "metrics", "plot", "tokenizer"):
        if res.paths.get(k):
            lines.append(f"{k + ':':13s}{res.paths[k]}")
    return "\n".join(lines)


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
