"""pldr-jax analyze: invariance analysis of a model's deductive outputs along generations.

Example::

    pldr-jax analyze ckpt_dir --tokenizer tok.model --prompt "The cat" --prompt "A dog" \\
        --max-new-tokens 32 --out analysis/

Writes to ``--out``: ``trace.csv`` (one row per tensor, step, layer, row, head), ``summary.csv`` /
``summary.md`` (one row per tensor and layer), ``steps.csv`` (per-step logit differences and greedy
agreement), ``metrics.npz`` (all arrays), ``generated.json`` and PNGs (heatmaps of A_LM, A_P, G_LM
per layer and head at the prompt and at the last step; the drift of G_LM over the steps).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["add_parser", "run_analysis", "parse_prompts"]


def parse_prompts(prompt_ids: Sequence[str] | None, prompts: Sequence[str] | None, tokenizer=None) -> list[list[int]]:
    """Prompts from ``--prompt-ids "5,6,7"`` (comma/space separated) and ``--prompt TEXT`` (needs a
    tokenizer; encoded without BOS/EOS, as the reference's generate_text feeds prompts)."""
    out: list[list[int]] = []
    for s in prompt_ids or []:
        try:
            ids = [int(t) for t in s.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--prompt-ids {s!r}: expected integers separated by commas or spaces") from None
        out.append(ids)
    if prompts:
        if tokenizer is None:
            raise ValueError("--prompt needs --tokenizer (or use --prompt-ids)")
        for text in prompts:
            ids = _encode(tokenizer, text)
            if not ids:
                raise ValueError(f"--prompt {text!r} encodes to no tokens")
            out.append(ids)
    if not out:
        raise ValueError("give at least one prompt (--prompt-ids or --prompt with --tokenizer)")
    return out


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_eos=False))
    except TypeError:
        ids = list(tokenizer.encode(text))
        return ids[:-1] if len(ids) > 1 and ids[-1] == 3 else ids


def run_analysis(cfg, params, prompts, *, out_dir, max_new_tokens: int = 16, g_lm=None, follow: str = "cached",
                 plots: bool = True, tokenizer=None, rank_rtol: float | None = None) -> dict:
    """Trace, analyse and write every output file; returns {name: path} plus "result"/"trace"."""
    from . import report
    from .invariance import analyze_trace, deductive_trace

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace = deductive_trace(cfg, params, prompts, max_new_tokens=max_new_tokens, g_lm=g_lm, follow=follow)
    res = analyze_trace(trace, rank_rtol=rank_rtol)
    files: dict = {"trace": trace, "result": res}
    files["trace_csv"] = report.write_csv(report.trace_rows(res), out / "trace.csv")
    summ = report.summary_rows(res)
    files["summary_csv"] = report.write_csv(summ, out / "summary.csv")
    step_rows = [{"step": t, "row": b, "logits_max_abs_diff": float(res.logits_max_abs_diff[t, b]),
                  "same_greedy_token": bool(res.same_greedy_token[t, b]),
                  "token": int(trace.generated[b, t])}
                 for t in range(trace.steps) for b in range(trace.generated.shape[0])]
    files["steps_csv"] = report.write_csv(step_rows, out / "steps.csv")
    notes = [trace.method,
             f"Steps: {trace.steps}; rows: {trace.generated.shape[0]}; max |logit diff| cached vs uncached: "
             f"{float(np.max(res.logits_max_abs_diff)):.6g}; greedy tokens agree at "
             f"{int(res.same_greedy_token.sum())}/{res.same_greedy_token.size} steps."]
    files["summary_md"] = report.write_markdown(summ, out / "summary.md", title="Deductive-output invariance",
                                                notes=notes)
    arrays = {f"{k}/{m}": np.asarray(v) for k, d in res.per_key.items() for m, v in d.items()}
    arrays.update({f"{k}/head_spread_{mode}": v for k, d in res.spread.items() for mode, v in d.items()})
    arrays["logits_max_abs_diff"] = res.logits_max_abs_diff
    arrays["same_greedy_token"] = res.same_greedy_token
    arrays["tokens"] = trace.tokens
    arrays["prompt_lengths"] = trace.prompt_lengths
    np.savez_compressed(out / "metrics.npz", **arrays)
    files["metrics_npz"] = out / "metrics.npz"
    gen = {"prompts": [list(map(int, trace.tokens[b, : trace.prompt_lengths[b]])) for b in range(len(trace.prompt_lengths))],
           "generated": trace.generated.tolist(), "follow": trace.follow}
    if tokenizer is not None:
        try:
            gen["generated_text"] = [tokenizer.decode(list(map(int, g))) for g in trace.generated]
        except Exception:  # decoding is a convenience only
            pass
    (out / "generated.json").write_text(json.dumps(gen, indent=1))
    files["generated_json"] = out / "generated.json"
    if plots:
        from .plots import plot_deductive_heatmaps, plot_drift
        first = {k: v[0] for k, v in trace.cached.items()}
        last = {k: v[-1] for k, v in trace.uncached.items()}
        for k, fig in plot_deductive_heatmaps(first, out, prefix="prompt_").items():
            files[f"prompt_{k}_png"] = out / f"prompt_{k}.png"
        for k, fig in plot_deductive_heatmaps(last, out, prefix="uncached_last_").items():
            files[f"uncached_last_{k}_png"] = out / f"uncached_last_{k}.png"
        if "G_LM" in res.per_key:
            plot_drift(res.per_key["G_LM"]["drift_uncached"], out / "G_LM_drift.png")
            files["drift_png"] = out / "G_LM_drift.png"
    return files


def _run(args: argparse.Namespace) -> int:
    from ..g_sources import load_model_spec, make_g

    cfg, params, g_lm = load_model_spec(args.model, args.config)
    tokenizer = None
    if args.tokenizer:
        from ..data import Tokenizer
        tokenizer = Tokenizer.load(args.tokenizer)
    prompts = parse_prompts(args.prompt_ids, args.prompt, tokenizer)
    if args.g_source:
        from ..analysis.invariance import pad_prompts
        import jax
        buf, _ = pad_prompts(prompts)
        g_lm = make_g(cfg, args.g_source, jax.random.key(args.seed), prompt_tokens=buf[0][buf[0] != 0])
    files = run_analysis(cfg, params, prompts, out_dir=args.out, max_new_tokens=args.max_new_tokens, g_lm=g_lm,
                         follow=args.follow, plots=not args.no_plots, tokenizer=tokenizer)
    print(Path(files["summary_md"]).read_text())
    print(f"wrote {len([k for k in files if k not in ('trace', 'result')])} files to {args.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..g_sources import G_SPEC_HELP

    p = subparsers.add_parser("analyze", help="invariance analysis of deductive outputs (A, A_LM, A_P, G_LM)",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint path (pldr_jax.io.load_model) or 'preset:<name>[:seed]' (random init)")
    p.add_argument("--config", default=None, help="PLDRConfig JSON file when the checkpoint lacks one")
    p.add_argument("--prompt-ids", action="append", default=None, metavar="IDS",
                   help="a prompt as token ids, e.g. '5,6,7' (repeatable)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a text prompt (repeatable)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model for --prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--follow", choices=("cached", "uncached", "decoder"), default="cached",
                   help="whose greedy tokens extend the prefixes: the G-cached or uncached mode (forward "
                        "re-runs) or the KV+G-cache decoder (default: cached)")
    p.add_argument("--g-source", default=None, help=f"override G_LM; {G_SPEC_HELP}")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for random G sources")
    p.add_argument("--out", default="analysis_out", help="output directory")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=_run)
    return p
