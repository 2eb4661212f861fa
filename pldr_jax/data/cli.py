"""`pldr-jax data`: prepare a corpus once for pretraining, inspect or verify a prepared directory.

Examples::

    pldr-jax data prepare --data jsonl:web/:text --tokenizer paper.model --out data/web --workers 8
    pldr-jax data prepare --data builtin --tokenizer runs/main-job/tokenizer.model --out data/builtin
    pldr-jax data info data/web                     # counts, dtype, tokenizer hash, source
    pldr-jax data verify data/web                   # re-hash every shard (reads all tokens)
    pldr-jax train --data tokens:data/web ...       # train from it (rows read in place)

An interrupted ``prepare`` resumes where it stopped when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run_prepare", "run_info", "run_verify"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="prepare a corpus once (tokenized shards), inspect / verify one",
                              description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", required=True)
    q = sub.add_parser("prepare", help="tokenize --data once into shards of token ids + an index")
    q.add_argument("--data", required=True, help="source spec: builtin, a path, jsonl:PATH:FIELD, parquet:PATH:COLUMN, "
                                                 "text:PATH, paragraphs:PATH, hf:PATH[:FIELD[:SPLIT]]")
    q.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 2^26)")
    q.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    q.add_argument("--dtype", choices=("uint16", "uint32"), default=None,
                   help="token dtype (default uint16 when the vocabulary fits, else uint32)")
    q.add_argument("--overwrite", action="store_true", help="delete a previous result in --out first")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=run_prepare)
    i = sub.add_parser("info", help="print a prepared directory's index summary as JSON")
    i.add_argument("dir")
    i.set_defaults(func=run_info)
    v = sub.add_parser("verify", help="re-hash every shard of a prepared directory")
    v.add_argument("dir")
    v.add_argument("--tokenizer", default=None, help="also check this tokenizer matches")
    v.set_defaults(func=run_verify)
    return p


def run_prepare(args) -> int:
    from .prepare import DEFAULT_SHARD_TOKENS, prepare_tokens
    prepare_tokens(args.data, args.tokenizer, args.out,
                   shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, workers=args.workers, dtype=args.dtype,
                   overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def run_info(args) -> int:
    from .shards import PreparedTokens
    st = PreparedTokens(args.dir)
    info = {k: v for k, v in st.index.items() if k != "shards"}
    info["num_shards"] = st.num_shards
    print(json.dumps(info, indent=2))
    return 0


def run_verify(args) -> int:
    from .shards import PreparedTokens
    from .tokenizer import Tokenizer
    st = PreparedTokens(args.dir, Tokenizer.load(args.tokenizer) if args.tokenizer else None)
    st.verify()
    print(f"{args.dir}: {st.num_shards} shards, {st.num_tokens} tokens: ok")
    return 0
