"""`pldr-jax finetune RUN_OR_HF_FOLDER --task {seq-cls,token-cls,qa,sft} --train FILE --workdir DIR`.

The source is a `pldr-jax train` run (orbax), a Hugging Face pldrllm folder (an LM or a task-head
folder, e.g. one of the authors' fine-tuned models) or any format `pldr-jax convert` reads; its
tokenizer comes from the run / folder or --tokenizer.  `--train embedded` uses the small task
set of the embedded corpus (`pldr_jax.finetune.tasks`).  Defaults are the authors' recipe (lr
7e-5, 20 warm-up steps, clip 1.0, 2 epochs, cosine to 1 % of lr, right padding, EOS appended).
Everything is checked (task, fields, labels, spans, empty data) before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from .data import TASKS

_CKPT = "checkpoints"


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model: task heads (seq-cls, token-cls, qa) or SFT",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a pldr-jax train run, a Hugging Face pldrllm folder, or a checkpoint file")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--train", required=True, help="training data: .jsonl / .json / .parquet / a saved "
                   "Hugging Face dataset folder, or 'embedded' (the embedded corpus's task set)")
    p.add_argument("--valid", help="validation data (default: --valid-fraction of --train held out)")
    p.add_argument("--valid-fraction", type=float, default=0.2)
    p.add_argument("--workdir", required=True, help="run folder: checkpoints/, metrics.jsonl, hf/ (export)")
    p.add_argument("--tokenizer", help="sentencepiece model (default: the source's own)")
    p.add_argument("--config", help="model config for a bare checkpoint file (preset name or JSON)")
    for f, d in (("text", "text"), ("label", "label"), ("tokens", "tokens"), ("tags", "tags"),
                 ("question", "question"), ("context", "context"), ("answers", "answers"),
                 ("prompt", "prompt"), ("response", "response")):
        p.add_argument(f"--{f}-field", default=d, help=f"record field of the {f} (default {d!r})")
    p.add_argument("--problem-type", choices=["single_label_classification", "multi_label_classification",
                                              "regression"], help="seq-cls: override the kind found in the labels")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence, EOS included (default 128)")
    p.add_argument("--lr", type=float, default=7e-5)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--min-lr-ratio", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: each epoch)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the epochs')")
    p.add_argument("--freeze-decoder", action="store_true", help="train the head only")
    p.add_argument("--fixed-g", action="store_true",
                   help="compute each layer's G_LM once from the starting model (the G-cache of the first training "
                        "sequence, as decoding caches it) and train with it as a constant operator; the metric "
                        "learner stays frozen (learned-G models)")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="mesh axis sizes as pretraining's --mesh, one may be -1 (default -1,1,1: data parallel "
                        "over all devices; write --mesh=-1,2,1)")
    p.add_argument("--nonfinite", choices=["skip", "stop", "off"], default="skip",
                   help="a step with a non-finite loss or gradient: skip it (default), stop, or no check")
    p.add_argument("--log-every", type=int, default=10, help="steps per metrics.jsonl train row (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no loss-curve PNG at the end")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events in WORKDIR/tensorboard")
    p.add_argument("--random-init", action="store_true",
                   help="the source's architecture and tokenizer with freshly initialised weights (a baseline)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the final metrics")
    p.set_defaults(func=run)


def _load_source(args):
    import jax
    from ..io.hf import load_hf_head
    from ..io.loading import detect_format, load_model, source_tokenizer
    src = Path(args.source)
    if not src.exists():
        raise FileNotFoundError(f"model not found: {src}")
    hcfg = head = None
    if detect_format(src) == "hf":
        cfg, params, g_lm, hcfg, head = load_hf_head(src)
    else:
        cfg, params, g_lm = load_model(src, args.config)
    if args.random_init:
        from ..params import init_params
        params = jax.device_get(init_params(cfg, jax.random.key(args.seed)))
        head = None
    tok_file = Path(args.tokenizer) if args.tokenizer else source_tokenizer(src)
    if tok_file is None or not Path(tok_file).is_file():
        raise FileNotFoundError(f"no tokenizer for {src}: pass --tokenizer FILE.model")
    return cfg, params, g_lm, hcfg, head, Path(tok_file)


def prepare(args):
    """Everything checked and encoded, nothing written: a dict for `loop.run_finetune`."""
    import jax
    from ..data.tokenizer import Tokenizer
    from ..heads import HeadConfig, init_head
    from . import data as D
    from ..train.sharding import parse_mesh_shape
    from .loop import Recipe, recipe_record
    from .tasks import embedded_records
    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; choose from {', '.join(TASKS)}")
    fields = D.Fields(**{k: getattr(args, f"{k}_field") for k in D.Fields.__dataclass_fields__})
    if args.train == "embedded":
        records, where = embedded_records(args.task), "embedded"
    else:
        records, where = D.read_records(args.train), str(args.train)
    if not records:
        raise ValueError(f"{where}: no records (empty data)")
    if args.valid:
        v_records, v_where = D.read_records(args.valid), str(args.valid)
        if not v_records:
            raise ValueError(f"{v_where}: no records (empty data)")
    else:
        records, v_records = D.split_valid(records, args.valid_fraction, args.seed)
        v_where = f"{where} (held-out {args.valid_fraction:g})"
    cfg, params, g_lm, hcfg, head, tok_file = _load_source(args)
    tok = Tokenizer.load(tok_file)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_file} has {tok.vocab_size} pieces but the model's vocab_size is "
                         f"{cfg.vocab_size}")
    max_len = min(args.max_length, cfg.max_seq_len)
    if args.task == "sft":
        if hcfg is not None:
            raise ValueError(f"{args.source} is a {hcfg.architecture} folder (no LM head): SFT needs a causal LM")
        labels, problem_type = (), None
    else:
        labels, problem_type = D.label_space(args.task, records, fields, where)
        if args.problem_type:
            problem_type = args.problem_type
        if hcfg is not None:
            if hcfg.task != args.task:
                raise ValueError(f"{args.source} is a {hcfg.architecture} folder, not a {args.task} model")
            if hcfg.labels and args.task != "qa":
                labels = hcfg.labels   # the folder's id2label decides; labels outside it are errors
            problem_type = hcfg.problem_type or problem_type
        n = 2 if args.task == "qa" else len(labels)
        hcfg = HeadConfig(args.task, n, problem_type if args.task == "seq-cls" else None, 0,
                          labels if args.task != "qa" else ())
        if head is None:
            head = jax.device_get(init_head(cfg, hcfg, jax.random.key(args.seed + 1)))
        if "final" in params:
            params = {k: v for k, v in params.items() if k != "final"}
    embedded = args.train == "embedded"
    train = D.encode(args.task, records, tok, max_len, fields, labels, problem_type, where, drop_long=embedded)
    valid = D.encode(args.task, v_records, tok, max_len, fields, labels, problem_type, v_where,
                     drop_long=embedded and not args.valid)
    if args.fixed_g and not cfg.learned_g:
        raise ValueError(f"--fixed-g needs a learned-G model; {args.source} already uses a predefined G_LM "
                         f"(custom_G_type={cfg.custom_G_type!r})")
    recipe = Recipe(learning_rate=args.lr, warmup_steps=args.warmup_steps, clip_norm=args.clip_norm,
                    epochs=args.epochs, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                    batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every,
                    save_every=args.save_every, freeze_decoder=args.freeze_decoder, fixed_g=args.fixed_g,
                    nonfinite=args.nonfinite, max_steps=args.max_steps, mesh=parse_mesh_shape(args.mesh),
                    log_every=args.log_every, progress=not args.no_progress, plot=not args.no_plot,
                    tensorboard=not args.no_tensorboard)
    if recipe.batch_size < 1 or recipe.epochs <= 0 or recipe.learning_rate <= 0 or recipe.log_every < 1:
        raise ValueError("--batch-size, --epochs, --lr and --log-every must be > 0")
    if args.freeze_decoder and args.task == "sft":
        raise ValueError("--freeze-decoder trains a task head only; SFT has none (use --fixed-g, or another task)")
    digest = hashlib.sha256(train.tokens.tobytes()).hexdigest()[:16]
    rec = recipe_record(recipe)
    run_config = {"task": args.task, "labels": list(labels), "problem_type": problem_type, "recipe": rec,
                  "train_digest": digest, "source": str(args.source)}
    return dict(cfg=cfg, task=args.task, params=params, head=head, hcfg=hcfg if args.task != "sft" else None,
                train=train, valid=valid, labels=tuple(labels), problem_type=problem_type, recipe=recipe,
                run_config=run_config, tokenizer_file=tok_file, g_lm=g_lm, decode=tok.decode)


def run(args) -> int:
    from .loop import run_finetune
    job = prepare(args)
    workdir = Path(args.workdir)
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / _CKPT).is_dir():
        raise ValueError(f"--workdir {workdir} exists and is not a fine-tuning run; pick an empty or new folder")
    workdir.mkdir(parents=True, exist_ok=True)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    log(f"finetune {args.task}: {len(job['train'])} train / {len(job['valid'])} valid records, "
        f"labels {list(job['labels'])[:10]}")
    res = run_finetune(workdir=workdir, log=log, **job)
    log(res["summary"])
    if args.json:
        print(json.dumps({k: res[k] for k in ("step", "valid", "export")}))
    else:
        print(f"valid: {res['valid']}\nexported: {res['export']}")
    return 0
