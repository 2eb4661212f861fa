"""``pldr-jax serve``: an OpenAI-compatible completions server for one model.

Examples::

    pldr-jax serve runs/pldr --port 8000 --slots 16
    pldr-jax serve hf_folder --tokenizer tok.model --max-seq-len 512 --shared-g
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "The capital of France", "max_tokens": 32, "temperature": 0}'
    lm_eval --model local-completions --tasks arc_easy \\
         --model_args base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=remote,max_length=1024

The model is loaded as ``pldr-jax generate`` loads it (a run, a Hugging Face folder, a .pth/.npz with
``--config``, or ``preset:<name>[:seed]``); the tokenizer is the checkpoint's own unless
``--tokenizer`` names one.  Before serving, the prefill of every prompt-length bucket and the
generate step are compiled (one line each).  The server listens on ``--host`` (default 127.0.0.1,
this machine only) and prints its URL; ``--port 0`` picks a free port.  SIGTERM / Ctrl-C: new
connections are refused, running requests finish (at most ``--drain-timeout`` seconds), exit 0.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a model over HTTP (OpenAI completions API, continuous batching)",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="run folder, HF folder, checkpoint file or 'preset:<name>[:seed]'")
    p.add_argument("--config", default=None, help="config JSON when the checkpoint has none")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="training directories: the checkpoint step to load (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the checkpoint's own)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 = a free port")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (the batch)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context per request: prompt + new tokens "
                                                                  "(default: the model's max_seq_len)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype override")
    p.add_argument("--mode", choices=("kv_g", "kv", "g", "none"), default="kv_g",
                   help="cache mode (default kv_g: KV- and G-cache)")
    p.add_argument("--shared-g", action="store_true", help="every request decodes with the first request's G "
                                                           "(the authors' cache_first_G)")
    p.add_argument("--g", dest="g_source", default=None, help="fix G_LM: a G source spec (pldr_jax.g_sources)")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="decode on a device mesh (slots over data, heads over tensor), e.g. 4,1,2")
    p.add_argument("--steps-per-sync", type=int, default=32,
                   help="the most generate steps per device call (a block ends early when a slot frees; "
                        "stop strings and cancellations wait for its end)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before HTTP 429")
    p.add_argument("--model-name", default=None, help="the model id in responses (default: the checkpoint name)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish requests on shutdown")
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead of before serving")
    p.add_argument("--seed", type=int, default=0, help="seed of a --g source or a preset")
    p.set_defaults(func=run)
    return p


def _log(line: str) -> None:
    print(line, flush=True)


def run(args) -> int:
    import uvicorn

    from ..decode.cli import load_for_decoding
    from .app import create_app
    from .engine import Engine

    for name in ("slots", "max_queue", "steps_per_sync"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    cfg, params, g_lm, tok = load_for_decoding(args)
    mesh = None
    if args.mesh:
        from ..train.sharding import make_mesh, parse_mesh_shape
        mesh = make_mesh(*parse_mesh_shape(args.mesh))
    engine = Engine(cfg, params, slots=args.slots, max_len=args.max_seq_len, mode=args.mode, shared_g=args.shared_g,
                    g_lm=g_lm, tokenizer=tok, eos_id=int(tok.eos_id) if tok is not None else 3,
                    max_queue=args.max_queue, steps_per_sync=args.steps_per_sync, mesh=mesh, log=_log)
    _log(f"model {args.checkpoint}: {cfg.num_layers} layers, d_model {cfg.d_model}, {args.slots} slots of "
         f"{engine.max_len} tokens, mode {args.mode}{', shared G' if engine.shared_g else ''}"
         f"{', tokenizer ' + str(getattr(tok, 'path', '')) if tok is not None else ', no tokenizer (token ids only)'}")
    if not args.no_warmup:
        engine.warmup()
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another --port "
                         f"(0 = any free port)") from None
    # listen before the URL is printed: a client connecting at once is queued until uvicorn accepts
    # (a bound socket that does not listen yet refuses it)
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    name = args.model_name or args.checkpoint.rstrip("/").split("/")[-1]
    app = create_app(engine, model_name=name, drain_timeout=args.drain_timeout)
    shown = f"[{host}]" if ":" in host else host
    _log(f"serving {name} on http://{shown}:{port}/v1 (POST /v1/completions, GET /v1/models, /health, /metrics)")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.drain_timeout,
                            lifespan="on")
    # uvicorn handles SIGTERM / SIGINT while it runs (graceful shutdown: stop accepting, finish the
    # open requests, then the app's shutdown drains the engine) and re-raises the signal to the
    # handlers it found: these note it, so that a requested shutdown exits 0
    stops = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stops.append(signum))
    uvicorn.Server(config).run(sockets=[sock])
    _log("server stopped")
    sys.stdout.flush()
    return 0
