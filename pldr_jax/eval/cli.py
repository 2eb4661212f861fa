"""pldr-jax eval: perplexity, multiple-choice accuracy and lm-evaluation-harness tasks of a checkpoint.

Examples::

    pldr-jax eval perplexity runs/pldr --data valid.txt
    pldr-jax eval mc runs/pldr --data arc_easy.jsonl --mode full
    pldr-jax eval harness runs/pldr --tasks pldrllm_zeroshot --output_path results/

The tokenizer is the checkpoint's own (a training run's or HF folder's ``tokenizer.model``) unless
``--tokenizer`` is given.  ``harness`` runs lm-evaluation-harness (see `pldr_jax.eval.lm_eval_cli`).

``perplexity`` / ``mc`` print their results as JSON (and write them to ``--output`` when given), with a
progress bar on stderr (``--no-progress``: none); compiled programs are kept in the persistent
compilation cache (`pldr_jax.compile_cache`) as with ``generate``.  ``perplexity`` scores each
document as lm-evaluation-harness's rolling log-likelihood does (no EOS appended: its bits per byte
are the harness's); ``--eos`` appends EOS to each document, as in pretraining.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parser"]


def _load(args):
    import jax

    from ..compile_cache import enable_compile_cache
    from ..g_sources import load_model_spec, make_g

    enable_compile_cache(args.compile_cache, enabled=not args.no_compile_cache)

    cfg, params, g_lm = load_model_spec(args.model, args.config, step=args.step)
    if args.g_source:
        g_lm = make_g(cfg, args.g_source, jax.random.key(args.seed))
    from ..io.run_tokenizer import resolve_tokenizer
    tok = resolve_tokenizer(args.model, args.tokenizer)
    return cfg, params, g_lm, tok


def _progress(args, desc: str):
    """A factory of tqdm bars on stderr (``progress(total=rows)``), or None with --no-progress."""
    if args.no_progress:
        return None
    import sys

    from tqdm.auto import tqdm
    return lambda total: tqdm(total=total, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True)


def _emit(result: dict, args) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        p = Path(args.output)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")


def _run_ppl(args) -> int:
    from .perplexity import perplexity_of_file

    cfg, params, g_lm, tok = _load(args)
    res = perplexity_of_file(cfg, params, args.data, tok, split=args.split, max_docs=args.max_docs,
                             add_eos=args.eos, mode=args.mode, g_lm=g_lm, batch_size=args.batch_size,
                             stride=args.stride, progress=_progress(args, "perplexity"))
    _emit({"task": "perplexity", "data": str(args.data), "mode": args.mode, **res.summary()}, args)
    return 0


def _run_mc(args) -> int:
    from .multiple_choice import load_jsonl, score_multiple_choice

    cfg, params, g_lm, tok = _load(args)
    items = load_jsonl(args.data)
    if args.max_docs is not None:
        items = items[: args.max_docs]
    res = score_multiple_choice(cfg, params, items, tokenizer=tok, mode=args.mode, g_lm=g_lm,
                                batch_size=args.batch_size, target_delimiter=args.delimiter,
                                progress=_progress(args, "mc"))
    _emit({"task": "multiple_choice", "data": str(args.data), "mode": args.mode, **res.summary()}, args)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from ..g_sources import G_SPEC_HELP
    from .multiple_choice import MODES

    p.add_argument("model", help="checkpoint path (pldr_jax.io.load_model) or 'preset:<name>[:seed]' (random init)")
    p.add_argument("--data", required=True, help="data file")
    p.add_argument("--config", default=None, help="PLDRConfig JSON file when the checkpoint lacks one")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="training directories: the checkpoint step to evaluate (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the checkpoint's own, "
                                                     "e.g. a run's tokenizer.model; needed for text)")
    p.add_argument("--mode", choices=MODES, default="full",
                   help="full: one pass over context+continuation (as lm-eval with the authors' HF model); "
                        "cached: G_LM from the context only (KV+G-cache decoding); causal: one pass per "
                        "scored token over its own prefix")
    p.add_argument("--g-source", default=None, help=f"fix G_LM; {G_SPEC_HELP} (not 'transfer')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-docs", type=int, default=None, help="score only the first N documents/items")
    p.add_argument("--output", default=None, help="also write the JSON result here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent compilation cache directory (default: as pldr-jax generate)")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity, multiple-choice and lm-evaluation-harness evaluation",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="eval_task", required=True)
    pp = sub.add_parser("perplexity", help="token-level perplexity of a text/JSONL file",
                        description="Documents: .jsonl ('text' or 'input_ids' per line) or text split by --split.")
    _common(pp)
    pp.add_argument("--split", choices=("blank", "line", "file"), default="blank",
                    help="documents of a text file: paragraphs (blank), lines, or the whole file")
    pp.add_argument("--stride", type=int, default=None, help="new tokens per window (default: max_seq_len)")
    eos = pp.add_mutually_exclusive_group()
    eos.add_argument("--eos", dest="eos", action="store_true", default=False,
                     help="append EOS to each document (as in pretraining); default: no EOS, as "
                          "lm-evaluation-harness's rolling log-likelihood")
    eos.add_argument("--no-eos", dest="eos", action="store_false", help="no EOS appended (the default)")
    pp.set_defaults(func=_run_ppl)
    mc = sub.add_parser("mc", aliases=["multiple-choice"], help="multiple-choice accuracy (JSONL of "
                        "{context, choices, label})")
    _common(mc)
    mc.add_argument("--delimiter", default=" ", help="text between context and a text choice (default ' ')")
    mc.set_defaults(func=_run_mc)
    from .lm_eval_cli import add_harness_parser
    add_harness_parser(sub)
    return p
