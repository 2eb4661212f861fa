"""`pldr-jax convert`: checkpoints between the authors' Hugging Face folders, the reference's
`.pth`/`.npz` state dicts and pldr_jax's orbax training directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Convert a PLDR-LLM checkpoint.  SRC may be a Hugging Face pldrllm folder (config.json +
model.safetensors), a reference state dict (.pth/.pt/.bin/.npz), or an orbax training directory
written by `pldr-jax train` (the latest step unless --step).  DST is a folder (--to hf) or a file
(--to pth: .pth/.pt/.bin, --to npz: .npz); --to defaults from DST's suffix (a name without one
means hf).

A bare state dict needs its config: --config (a preset name, a PLDRConfig JSON, the reference's
hyper-parameter JSON such as tiny_v510.json, or a pldrllm config.json), else <stem>.json or
config.json beside it.  A .pth/.npz export writes such a <stem>.json next to it (and a
<stem>_G_LM.npz G list for predefined-G models), so it loads back with no extra argument."""

EPILOG = """\
examples:
  pldr-jax convert tiny_v510.pth out/hf --to hf --check
  pldr-jax convert runs/pretrain/ckpt exported/hf --tokenizer sp.model --check
  pldr-jax convert hf_folder model.npz --check --tol 0
  pldr-jax convert v510G.pth out/hf --config v510G.json --g-lm predefined_G_LM_cache_list.npz"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert checkpoints between HF folders, .pth/.npz state dicts and orbax runs",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="source checkpoint (HF folder, .pth/.pt/.bin/.npz, orbax dir)")
    p.add_argument("dst", metavar="DST", help="destination (folder for hf, file for pth/npz)")
    p.add_argument("--to", choices=("hf", "pth", "npz"), default=None,
                   help="output format (default: from DST's suffix; no suffix = hf)")
    p.add_argument("--config", metavar="CFG", default=None,
                   help="config of a bare state dict: preset name or JSON file (default: <stem>.json or "
                        "config.json beside SRC)")
    p.add_argument("--g-lm", metavar="NPZ", default=None,
                   help="predefined G_LM list (layer{i}_G_LM arrays) for a predefined-G model "
                        "(custom_G_type identity/random/external)")
    p.add_argument("--tokenizer", metavar="MODEL", default=None,
                   help="sentencepiece model copied into an HF folder as tokenizer.model (default: the "
                        "source HF folder's tokenizer.model or the training run's tokenizer, if any)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="orbax SRC only (a train workdir, its checkpoints/ folder or a <step>/ folder): "
                        "training step to export (default: latest)")
    p.add_argument("--check", action="store_true",
                   help="reload DST, compare config and params with SRC exactly and run a forward pass "
                        "on both; exit 1 if anything differs beyond --tol")
    p.add_argument("--tol", type=float, default=1e-5,
                   help="--check tolerance on max |logit difference| (default 1e-5)")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.set_defaults(func=run)
    return p


def _infer_to(dst: Path) -> str:
    s = dst.suffix.lower()
    if s == ".npz":
        return "npz"
    if s in (".pth", ".pt", ".bin", ".ckpt"):
        return "pth"
    return "hf"


def _summary(cfg) -> str:
    s = (f"{cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, vocab {cfg.vocab_size}, "
         f"max_seq_len {cfg.max_seq_len}, param_dtype {cfg.param_dtype}")
    return s + (", learned G_LM" if cfg.learned_g else f", predefined G ({cfg.custom_G_type})")


def check_tokens_batch(cfg, batch: int = 3, length: int = 16):
    """A fixed batch of random ids in [1, vocab) of length min(16, max_seq_len); the last row ends
    in padding (id 0)."""
    import numpy as np
    L = min(length, cfg.max_seq_len)
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, L)).astype(np.int32)
    if L > 1:
        tokens[-1, L - max(1, L // 4):] = 0
    return tokens


def _need_g(cfg, g, what: str) -> None:
    if not cfg.learned_g and g is None:
        raise ValueError(f"{what}: custom_G_type={cfg.custom_G_type!r} needs the predefined G_LM, which a "
                         f"reference state dict does not store: pass --g-lm FILE.npz (layer{{i}}_G_LM "
                         f"arrays), or a --config with custom_G_type 'identity'")


def compare_params(cfg_a, params_a, cfg_b, params_b) -> list[str]:
    """Differences between two params trees as state dicts (empty list: bit-exact, same dtypes)."""
    import numpy as np

    from .state_dict import params_to_state_dict
    a = params_to_state_dict(cfg_a, params_a)
    b = params_to_state_dict(cfg_b, params_b)
    diffs = [f"keys only on one side: {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
    for k in a:
        if k not in b:
            continue
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            diffs.append(f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        elif not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
            n = int(np.sum(x != y))
            diffs.append(f"{k}: {n} values differ (max |diff| "
                         f"{float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))):.3e})")
    return diffs


def run(args) -> int:
    import numpy as np

    from .hf import load_hf_meta
    from .loading import detect_format, load_model, save_model, source_tokenizer

    src, dst = Path(args.src), Path(args.dst)
    to = args.to or _infer_to(dst)
    if not src.exists():
        raise FileNotFoundError(f"SRC not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError("SRC and DST are the same path")
    if dst.exists() and not args.force and (dst.is_file() or any(dst.iterdir())):
        raise ValueError(f"DST {dst} exists; pass --force to overwrite")
    src_fmt = detect_format(src)
    cfg, params, g = load_model(src, args.config, step=args.step, g_lm_path=args.g_lm)
    print(f"read {src} ({src_fmt}): {_summary(cfg)}")

    tokenizer, hf_kwargs = args.tokenizer, {}
    own_tok = source_tokenizer(src, args.step) if src_fmt in ("hf", "orbax") else None
    if src_fmt == "hf" and to == "hf":
        meta = load_hf_meta(src if src.is_dir() else src.parent)
        hf_kwargs = dict(pad_token_id=meta.pad_token_id, bos_token_id=meta.bos_token_id,
                         eos_token_id=meta.eos_token_id)
    if to == "hf" and tokenizer is None and own_tok is not None:
        tokenizer = own_tok
        print(f"tokenizer: {own_tok}")
    elif to != "hf" and own_tok is not None:
        print(f"note: the tokenizer {own_tok} is not carried into a {to} state dict")
    if to == "hf":
        _need_g(cfg, g, f"exporting {src} to a Hugging Face folder")
    elif tokenizer is not None:
        raise ValueError(f"--tokenizer only applies to --to hf (a {to} state dict stores no tokenizer)")
    g_out = None if cfg.learned_g else g
    written = save_model(cfg, params, dst, to, g_lm=g_out, tokenizer_model=tokenizer, **hf_kwargs)
    print(f"wrote {dst} ({to}):")
    for p in written:
        print(f"  {p}  ({p.stat().st_size:,} bytes)")

    if not args.check:
        return 0
    return _check(args, cfg, params, g, dst, np)


def _check(args, cfg, params, g, dst: Path, np) -> int:
    from ..model import forward
    from .loading import load_model

    ok = True
    cfg2, params2, g2 = load_model(dst)
    if cfg2 == cfg:
        print("check: config equal")
    else:
        ok = False
        d1, d2 = cfg.to_dict(), cfg2.to_dict()
        print("check: config DIFFERS: " + ", ".join(f"{k}: {d1[k]!r} -> {d2[k]!r}"
                                                    for k in d1 if d1[k] != d2[k]))
    diffs = compare_params(cfg, params, cfg2, params2)
    if diffs:
        ok = False
        print(f"check: params DIFFER ({len(diffs)} tensors):\n  " + "\n  ".join(diffs[:20]))
    else:
        print("check: params bit-exact")
    if (g is None) != (g2 is None) or (g is not None and not np.array_equal(np.asarray(g), np.asarray(g2))):
        ok = False
        print("check: G_LM DIFFERS")
    elif g is not None:
        print("check: G_LM bit-exact")
    _need_g(cfg, g, "--check forward on SRC")
    _need_g(cfg2, g2, "--check forward on DST")
    tokens = check_tokens_batch(cfg)
    la = np.asarray(forward(cfg, params, tokens, g).logits)
    lb = np.asarray(forward(cfg2, params2, tokens, g2).logits)
    diff = float(np.max(np.abs(la.astype(np.float64) - lb.astype(np.float64))))
    finite = bool(np.isfinite(la).all() and np.isfinite(lb).all())
    good = finite and diff <= args.tol
    ok &= good
    print(f"check: forward on {tokens.shape[0]}x{tokens.shape[1]} tokens (last row padded): "
          f"max |logit diff| = {diff:.3e} (tol {args.tol:g}){'' if finite else ', NON-FINITE logits'} "
          f"{'OK' if good else 'FAIL'}")
    if not ok:
        print("check: FAILED", file=sys.stderr)
    return 0 if ok else 1
