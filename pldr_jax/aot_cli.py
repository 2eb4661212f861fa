"""`pldr-jax compile`: compile the real training step (or decode loop) for a TPU topology or NVIDIA
GPUs on any host and report per-chip memory, FLOPs, collectives per step and a roofline step time.

Examples::

    pldr-jax compile --topology v5e:2x2 --preset tiny --mesh 1,4,1 --batch 8 --seq-len 64 --json
    pldr-jax compile --topology v5e:2x2 --preset v51-110m --dtype bfloat16 --mesh 1,4,1 --batch 32 --seq-len 1024
    pldr-jax compile --topology v5e:2x2 --preset tiny --mesh 4,1,1 --what decode
    pldr-jax compile --topology h100:1x8 --preset v51-110m --dtype bfloat16 --mesh 1,8,1 --batch 64 --seq-len 1024

Needs the libtpu wheel (``pip install -e ".[tpu]"``) for TPUs, the CUDA plugin (``pip install -e ".[cuda]"``)
for GPUs.
"""

from __future__ import annotations

import json

__all__ = ["add_parser", "run"]


def add_parser(subparsers):
    p = subparsers.add_parser("compile", help="AOT-compile the train step / decode loop for a TPU topology or GPUs and "
                                              "report memory, FLOPs, collectives and a roofline step time",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5e:2x2",
                   help="TPU topology (v5e:2x2, v5p:2x2x1, v6e:2x2) or GPUs as hosts x GPUs (h100:1x8, a100:1x8)")
    p.add_argument("--preset", default=None, help="model preset (default 'small')")
    p.add_argument("--config", default=None, metavar="FILE.json", help="model config JSON instead of a preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a PLDRConfig field")
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--what", choices=("train", "decode", "serve"), default="train",
                   help="serve: the serving engine's generate step (--batch slots of --seq-len positions)")
    p.add_argument("--remat", choices=("none", "dots", "full"), default=None,
                   help="rematerialisation policy (default: the platform's, 'full' on TPU)")
    p.add_argument("--attention-impl", default=None,
                   help="the training step's attention: blocks, cudnn, splash, xla_sdpa (default: the platform's, "
                        "cudnn on GPUs, splash on TPUs)")
    p.add_argument("--recipe", default=None, help="training recipe (default: the preset's, as pldr-jax train)")
    p.add_argument("--max-batch", action="store_true",
                   help="search the largest global batch that fits the chip's memory (compiles several times; "
                        "--batch is the starting point) and report it as max_batch")
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pldr_jax.backend choice (repeatable), e.g. attention_block=512")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from .aot import compile_report, format_report
    from .backend import parse_backend_options
    from .train.cli import model_config
    from .train.sharding import parse_mesh_shape
    cfg = model_config(args)      # --preset / --config, --set, --dtype: as `pldr-jax train` reads them
    kw = dict(topology=args.topology, cfg=cfg, preset=args.config or args.preset or "small",
              mesh=parse_mesh_shape(args.mesh), batch=args.batch, seq_len=args.seq_len, what=args.what,
              remat=args.remat, recipe=args.recipe, attention_impl=args.attention_impl,
              backend_options=parse_backend_options(args.backend_option))
    if args.max_batch:
        from .aot import max_batch
        best, rep = max_batch(**kw)
        if rep is None:
            raise ValueError(f"not even the smallest batch fits {args.topology}'s HBM")
        rep = dict(rep, max_batch=best)
    else:
        rep = compile_report(**kw)
    print(json.dumps(rep) if args.json else format_report(rep) + (f"\n  max batch          {rep['max_batch']}"
                                                                     if "max_batch" in rep else ""))
    return 0
