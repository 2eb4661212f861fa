"""``pldr-jax generate``: text (or token-id) generation from a checkpoint.

Examples::

    pldr-jax generate ckpt.pth --config tiny_v510.json --ids "70 48 9 8" --greedy
    pldr-jax generate hf_folder --tokenizer tok.model --prompt "The capital of France" --top-p 0.9
    pldr-jax generate ckpt --tokenizer tok.model --prompts-file prompts.txt --json
    pldr-jax generate ckpt --prompt "Hi" --no-kv-cache --no-g-cache --save-deductive g.npz

The four cache modes of the paper: default KV+G cache; ``--no-g-cache`` (KV only: G re-derived from
the cached A each step), ``--no-kv-cache`` (G cache only: the sequence is re-run each step), both
(everything recomputed every step).  ``--save-deductive out.npz`` writes the prompt-time deductive
outputs ``layer{i}_A``, ``layer{i}_A_LM``, ``layer{i}_G_LM`` ([B, H, dk, dk] each; the
``layer{i}_G_LM`` keys load back as a predefined G with ``--g external:out.npz`` when B = 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text or token ids from a checkpoint",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="checkpoint path (pldr_jax.io.load_model: HF folder, .pth/.npz with a "
                                      "config, orbax dir) or 'preset:<name>[:seed]' (random init)")
    p.add_argument("--config", default=None, help="config JSON when the checkpoint has none")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="training directories: the checkpoint step to load (default: the latest)")
    src = p.add_argument_group("prompts (any mix; at least one)")
    src.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    src.add_argument("--prompts-file", default=None, help="file with one text prompt per line ('-' = stdin)")
    src.add_argument("--ids", action="append", default=[], help="a prompt as token ids, e.g. '70 48 9' (repeatable)")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model (default: the checkpoint's own: a run's or HF folder's "
                        "tokenizer.model, else the only *.model beside it)")
    s = p.add_argument_group("sampling (the reference's order: temperature, top-p, top-k)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 = off, 1 = greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    s.add_argument("--greedy", action="store_true", help="same as --top-k 1")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eos-id", type=int, default=None, help="stop id (default: the tokenizer's EOS, else 3)")
    s.add_argument("--no-eos", action="store_true", help="do not stop at EOS")
    s.add_argument("--stop-at-max-seq-len", action="store_true",
                   help="stop a row at max_seq_len instead of failing when prompt + new tokens do not fit")
    c = p.add_argument_group("caches and G")
    c.add_argument("--no-kv-cache", action="store_true", help="re-run the whole sequence every step")
    c.add_argument("--no-g-cache", action="store_true", help="do not keep the prompt's G_LM")
    c.add_argument("--shared-g", action="store_true", help="every row uses the first prompt's G (cache_first_G)")
    c.add_argument("--g", dest="g_source", default=None, help="fix G_LM: a G source spec, e.g. 'identity', "
                                                              "'external:<file.npz>' (see pldr_jax.g_sources)")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype override")
    c.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    c.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pldr_jax.backend choice (repeatable), e.g. decode_kv_chunk=128 or "
                        "decode_attention=xla")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.add_argument("--include-prompt", action="store_true", help="print prompt + completion")
    o.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt at a time)")
    o.add_argument("--save-deductive", default=None, metavar="OUT.npz",
                   help="save the prompts' deductive outputs (A, A_LM, G_LM per layer)")
    cc = p.add_argument_group("compilation cache (compiled programs kept on disk across runs)")
    cc.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="cache directory (default: $PLDR_JAX_COMPILE_CACHE, else "
                         "$XDG_CACHE_HOME/pldr_jax/jax_cache or ~/.cache/pldr_jax/jax_cache)")
    cc.add_argument("--no-compile-cache", action="store_true",
                    help="do not read or write the persistent compilation cache")
    p.set_defaults(func=run)
    return p


def _load(args):
    """(cfg, params, g_lm): 'preset:<name>[:seed]' initialises a random model, anything else goes to
    `pldr_jax.io.load_model` (HF folders, .pth/.npz with a config, orbax training dirs)."""
    if args.checkpoint.startswith("preset:"):
        from ..g_sources import load_model_spec
        return load_model_spec(args.checkpoint, args.config, step=args.step)
    from ..io import load_model
    return load_model(args.checkpoint, config=args.config, step=args.step)


def load_for_decoding(args):
    """(cfg, params, g_lm, tokenizer or None) of a decoding command's ``checkpoint``, ``--config``,
    ``--dtype``, ``--g`` (with ``--seed``) and ``--tokenizer`` (`pldr-jax generate`, `pldr-jax serve`)."""
    import jax

    from ..g_sources import make_g
    cfg, params, g_lm = _load(args)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    if args.g_source:
        g_lm = make_g(cfg, args.g_source, jax.random.key(args.seed))
    return cfg, params, g_lm, _find_tokenizer(args)


def _find_tokenizer(args):
    """--tokenizer, else the checkpoint's own (`pldr_jax.io.run_tokenizer.resolve_tokenizer`)."""
    from ..io.run_tokenizer import resolve_tokenizer
    return resolve_tokenizer(args.checkpoint, args.tokenizer)


def _parse_ids(s: str) -> list[int]:
    try:
        return [int(t) for t in s.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--ids {s!r}: expected integers separated by spaces or commas") from None


def _collect_prompts(args) -> list[dict]:
    for b, t in enumerate(args.prompt):
        if not t.strip():
            raise ValueError(f"prompt {b} is empty; give at least one token (text, or --ids)")
    items = [{"prompt": t} for t in args.prompt]
    if args.prompts_file:
        text = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text()
        items += [{"prompt": line} for line in text.splitlines() if line.strip()]
    items += [{"prompt_ids": _parse_ids(s)} for s in args.ids]
    if not items:
        raise ValueError("give at least one prompt: --prompt TEXT, --prompts-file FILE or --ids '1 2 3'")
    return items


def _load_native_kernels() -> None:
    """Build (first use: a C++ compile, reported by `pldr_jax.kernels.build`) and load the native CPU
    kernels before anything is timed, so that the decode rate never includes their build."""
    import jax
    if jax.default_backend() != "cpu":
        return
    from ..kernels.build import KERNELS, load
    for name in KERNELS:
        load(name)


def run(args) -> int:
    import numpy as np

    from ..backend import parse_backend_options
    from ..compile_cache import enable_compile_cache

    from .compile_time import CompileWatch
    from .options import DecodeOptions
    from .sampler import Sampler
    from .sampling import validate_sampling
    from .step import mode_name
    from .text import encode_prompts

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    top_k = 1 if args.greedy else args.top_k
    validate_sampling(args.temperature, top_k, args.top_p)
    backend_options = parse_backend_options(args.backend_option)
    cache_dir = enable_compile_cache(args.compile_cache, enabled=not args.no_compile_cache)
    cache_dir = None if cache_dir is None else str(cache_dir)
    items = _collect_prompts(args)
    cfg, params, g_lm, tok = load_for_decoding(args)
    text_items = [it for it in items if "prompt" in it]
    if text_items and tok is None:
        raise ValueError("text prompts need a tokenizer: pass --tokenizer FILE.model (or use --ids)")
    if text_items:
        for it, ids in zip(text_items, encode_prompts(tok, [it["prompt"] for it in text_items])):
            it["prompt_ids"] = ids
    eos = None if args.no_eos else (args.eos_id if args.eos_id is not None else
                                    (int(tok.eos_id) if tok is not None else 3))
    opts = DecodeOptions(kv_cache=not args.no_kv_cache, g_cache=not args.no_g_cache, temperature=args.temperature,
                         top_k=top_k, top_p=args.top_p, eos_id=eos, g_lm=g_lm, shared_g=args.shared_g,
                         stop_at_max_seq_len=args.stop_at_max_seq_len)
    kw = dict(max_new_tokens=args.max_new_tokens, options=opts)
    decode = (lambda ids: tok.decode([t for t in ids if t != eos])) if tok is not None else None
    mode = mode_name(not args.no_kv_cache, not args.no_g_cache)
    _load_native_kernels()
    sampler = Sampler(cfg, params, backend_options=backend_options)   # weights prepared once, for every batch

    if args.stream and not args.json:
        for i, it in enumerate(items):
            if i:
                print()
            head = it.get("prompt", " ".join(map(str, it["prompt_ids"])))
            print(head if (args.include_prompt or "prompt" not in it) else "", end="" if decode else "\n", flush=True)
            new, shown = [], ""
            for step in sampler.stream([it["prompt_ids"]], seed=args.seed + i, **kw):
                if not step.active[0]:
                    break
                new.append(int(step.tokens[0]))
                if decode:
                    text = decode(new)
                    if text.startswith(shown) and not text.endswith("\ufffd"):
                        print(text[len(shown):], end="", flush=True)
                        shown = text
                else:
                    print(new[-1], end=" ", flush=True)
            print(flush=True)
        return 0

    results, ded_rows, t_all = [], [], time.perf_counter()
    outs = []
    with CompileWatch() as watch:           # compile time reported apart from the decode rate
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            outs.append((chunk, sampler([it["prompt_ids"] for it in chunk], seed=args.seed + start, **kw)))
    elapsed = time.perf_counter() - t_all
    for chunk, out in outs:
        for b, it in enumerate(chunk):
            ids = out.tokens[b]
            r = {"prompt": it.get("prompt"), "prompt_ids": it["prompt_ids"], "ids": ids,
                 "num_tokens": len(ids), "stopped_at_eos": bool(eos is not None and ids and ids[-1] == eos)}
            if decode:
                r["text"] = decode(ids)
                if args.include_prompt:
                    r["full_text"] = decode(list(it["prompt_ids"]) + list(ids))
            results.append(r)
        if args.save_deductive:
            ded_rows.append({k: np.asarray(v) for k, v in out.prompt_deductive.items()})

    if args.save_deductive:
        arrays = {}
        for name in ded_rows[0]:
            full = np.concatenate([d[name] for d in ded_rows], axis=1)      # [L, B, H, dk, dk]
            for i in range(full.shape[0]):
                arrays[f"layer{i}_{name}"] = full[i]
        arrays["prompt_lengths"] = np.array([len(it["prompt_ids"]) for it in items], np.int32)
        out_path = Path(args.save_deductive)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out_path, **arrays)

    n_new = sum(r["num_tokens"] for r in results)
    compile_s = min(watch.seconds, elapsed)
    run_s = elapsed - compile_s
    rate = n_new / run_s if run_s > 0 else None
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "mode": mode,
                          "sampling": {"temperature": args.temperature, "top_k": top_k, "top_p": args.top_p,
                                       "seed": args.seed, "eos_id": eos, "max_new_tokens": args.max_new_tokens},
                          "results": results, "new_tokens": n_new, "seconds": elapsed,
                          "compile_s": compile_s, "run_s": run_s, "tokens_per_s": rate,
                          "compiles": watch.compiles, "compile_cache_hits": watch.cache_hits,
                          "compile_cache_dir": cache_dir,
                          "saved_deductive": args.save_deductive}))
        return 0
    for i, r in enumerate(results):
        if len(results) > 1:
            print(f"--- [{i + 1}/{len(results)}] " + "-" * 40)
        if decode:
            if r["prompt"] is not None:
                print(r["full_text"] if args.include_prompt else r["text"])
            else:
                print(f"prompt ids: {' '.join(map(str, r['prompt_ids']))}")
                print(f"ids: {' '.join(map(str, r['ids']))}")
                print(r["text"])
        else:
            print(f"prompt ids: {' '.join(map(str, r['prompt_ids']))}")
            print(f"ids: {' '.join(map(str, r['ids']))}")
    hits = f", {watch.cache_hits} from the compilation cache" if watch.cache_hits else ""
    speed = f"{rate:.1f} tok/s" if rate else "n/a tok/s"
    print(f"[{mode}] {n_new} new tokens in {elapsed:.2f} s: compile {compile_s:.2f} s ({watch.compiles} programs"
          f"{hits}), decode {run_s:.2f} s ({speed})"
          + (f"; deductive outputs saved to {args.save_deductive}" if args.save_deductive else ""),
          file=sys.stderr)
    return 0
