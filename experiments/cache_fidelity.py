"""Cache fidelity: the reference's four decode modes on a trained small PLDR-LLM.

Loads a trained learned-G model (by default the ``learned`` run of ``experiments/ablation.py`` in
``runs/ablation/learned``; ``--checkpoint DIR`` for another training workdir, ``--checkpoint none`` to
train one here with the ablation's model size), then decodes a few corpus-style prompts greedily
(top_k=1, no EOS stop) with `pldr_jax.decode.generate` in each mode:

* ``kv_g``  KV-cache + G-cache (only the new token runs; G_LM = the prompt's),
* ``kv``    KV-cache only (G_LM re-derived each step from the cached prompt-time A: the same numbers),
* ``g``     G-cache only (the whole sequence re-run each step with the prompt's G_LM),
* ``none``  no cache (A and G_LM recomputed from the growing sequence each step).

Written into ``--out``:

* ``ids.json``  generated ids and text per mode and prompt;
* ``logit_deltas.csv``  per (mode, prompt, step): max |logit - logit(kv_g)| and whether the two
  modes had the same prefix at that step;
* ``modes.csv`` / ``modes.md``  per mode: token agreement with kv_g, first divergence, logit deltas,
  G_LM drift from the prompt's, decode time;
* ``deductive_comparison.csv`` / ``.md``  the paper's comparison of deductive outputs with and without
  caching: for A_LM and G_LM of every step, layer, prompt and head, the RMSE between a mode's tensor
  and the cached (kv_g) one and both determinants, with the number of decimals to which they agree
  (``pldr_jax.analysis.compare_runs``), aggregated per (mode, tensor, layer);
* ``same_prefix_summary.csv`` / ``.md``  `pldr_jax.analysis.analyze_trace` along the kv_g tokens:
  cached vs recomputed deductive outputs on identical prefixes (no token divergence involved);
* ``fidelity.json``  everything above plus config, model and environment;
* ``g_lm_drift.png``  G_LM drift from the prompt-time value per mode, per layer (no cache), and the
  logit deltas per step.

    python experiments/cache_fidelity.py                      # after experiments/ablation.py
    python experiments/cache_fidelity.py --checkpoint none    # train a small model first
    python experiments/cache_fidelity.py --quick --out /tmp/cf --workdir /tmp/cf_runs   # CI size
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation as common  # noqa: E402  (shared helpers: CLI, runtime, corpus, training config)

PROMPTS = (
    "The for statement is used to iterate over the elements of a sequence",
    "A dictionary maps hashable keys to",
    "This module provides functions for",
    "If an exception occurs during execution of the try clause,",
)


@dataclasses.dataclass(frozen=True)
class CacheFidelityConfig:
    """Configuration (every field is a CLI option: ``--field-name``)."""
    out: str = "experiments/results/cache_fidelity"
    checkpoint: str = "auto"             # training workdir | its checkpoints dir | "auto" | "none" (train)
    ablation_workdir: str = "runs/ablation"   # where "auto" looks for the learned model
    workdir: str = "runs/cache_fidelity"       # training workdir when a model is trained here
    train_steps: int = 400
    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = 32
    fast_compile: bool = False
    compile_cache: bool = True
    quick: bool = False


QUICK = dict(out="experiments/results/cache_fidelity_quick", ablation_workdir="runs/ablation_quick",
             workdir="runs/cache_fidelity_quick", train_steps=16, prompts=PROMPTS[:2], max_new_tokens=8,
             fast_compile=True)
MODE_ORDER = ("kv_g", "kv", "g", "none")


# --------------------------------------------------------------------------- model
def _find_checkpoint(path: Path) -> tuple[Path, Path] | None:
    """(checkpoints dir, run dir) for a training workdir or its checkpoints dir, or None."""
    from pldr_jax.train.checkpoint import latest_step
    for ck, rd in ((path / "checkpoints", path), (path, path.parent)):
        if ck.is_dir() and latest_step(ck) is not None:
            return ck, rd
    return None


def _tokenizer_for(run_dir: Path, conf: dict):
    from pldr_jax.data import Tokenizer
    cands = [conf.get("tokenizer"), (conf.get("train") or {}).get("tokenizer"), run_dir / "tokenizer.model",
             run_dir.parent / "tokenizer.model"]
    for c in cands:
        if c and Path(c).is_file():
            return Tokenizer.load(c)
    raise FileNotFoundError(f"no tokenizer found for the run in {run_dir} (tried {cands})")


def load_or_train(cfg: CacheFidelityConfig):
    """(model cfg, params, tokenizer, info) of the model under test."""
    from pldr_jax.train.checkpoint import load_params
    ck = None
    if cfg.checkpoint == "auto":
        ck = _find_checkpoint(Path(cfg.ablation_workdir) / "learned")
    elif cfg.checkpoint.lower() != "none":
        ck = _find_checkpoint(Path(cfg.checkpoint))
        if ck is None:
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no training checkpoint there")
    if ck is not None:
        ck_dir, run_dir = ck
        mcfg, params, conf = load_params(ck_dir)
        if not mcfg.learned_g:
            raise ValueError(f"{ck_dir} holds a predefined-G model; the cache modes need a learned-G (v510) model")
        tok = _tokenizer_for(run_dir, conf)
        common.log(f"loaded {ck_dir} ({(conf.get('train') or {}).get('steps')} steps)")
        return mcfg, params, tok, {"source": "checkpoint", "checkpoint": str(ck_dir),
                                   "train_steps": (conf.get("train") or {}).get("steps")}
    import jax

    from pldr_jax.train.loop import train
    base = common.AblationConfig()
    if cfg.quick:   # the ablation's CI model size
        base = dataclasses.replace(base, **{k: v for k, v in common.QUICK.items()
                                            if k not in ("out", "workdir", "fast_compile", "steps")})
    acfg = dataclasses.replace(base, workdir=cfg.workdir, steps=cfg.train_steps,
                               warmup_steps=max(1, min(base.warmup_steps, cfg.train_steps // 4)))
    wd = Path(cfg.workdir)
    docs, tok = common.prepare_corpus_and_tokenizer(wd, acfg.vocab_size, acfg.data_seed)
    mcfg = common.model_config(acfg, tok.vocab_size, None)
    tcfg = common.train_config(acfg, wd / "learned", str(tok.path), None)
    common.log(f"training a learned-G model for {acfg.steps} steps in {wd / 'learned'}")
    res = train(mcfg, tcfg, tokenizer=tok, documents=docs, log=lambda *a: common.log("[train]", *a),
                **common.train_kwargs(cfg))
    params = jax.device_get(res.state.params)
    last = res.evals[-1] if res.evals else {}
    return res.model_cfg, params, tok, {"source": "trained", "checkpoint": str(wd / "learned" / "checkpoints"),
                                        "train_steps": acfg.steps, "val_loss": last.get("val_loss")}


# --------------------------------------------------------------------------- analysis helpers
def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def plot_fidelity(drift: dict, none_layers, deltas: dict, path: Path, title: str) -> Path:
    """Three panels: mean G_LM RMSE to the prompt's per mode; per layer for the no-cache mode (band =
    min-max over heads and prompts); max |logit delta| vs kv_g per step and mode."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    a0, a1, a2 = fig.subplots(1, 3)
    styles = {"kv_g": ("C0", "-", "o"), "kv": ("C1", "--", "s"), "g": ("C2", ":", "^"), "none": ("C3", "-", "d")}
    for m, d in drift.items():
        c, ls, mk = styles[m]
        a0.plot(np.arange(len(d)), d, color=c, ls=ls, marker=mk, ms=3, label=m)
    a0.set_title("G_LM RMSE to the prompt-time G_LM (mean)", fontsize=9)
    nl = np.asarray(none_layers)                       # [T, layers, B, H]
    for l in range(nl.shape[1]):
        x = nl[:, l].reshape(nl.shape[0], -1)
        line, = a1.plot(np.arange(len(x)), x.mean(-1), marker="o", ms=3, label=f"layer {l}")
        a1.fill_between(np.arange(len(x)), x.min(-1), x.max(-1), color=line.get_color(), alpha=0.2)
    a1.set_title("no cache: G_LM drift per layer (band: heads x prompts)", fontsize=9)
    for m, d in deltas.items():
        c, ls, mk = styles[m]
        a2.plot(np.arange(len(d)), np.maximum(d, 1e-12), color=c, ls=ls, marker=mk, ms=3, label=m)
    a2.set_yscale("log")
    a2.set_title("max |logits - logits(kv_g)| over prompts (0 drawn at 1e-12)", fontsize=9)
    for ax in (a0, a1, a2):
        ax.set_xlabel("generation step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------- the experiment
def run(cfg: CacheFidelityConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    common.setup_runtime(cfg.fast_compile, Path(cfg.workdir) / "jax_cache" if cfg.compile_cache else None)
    import numpy as np

    from pldr_jax import count_params
    from pldr_jax.analysis import analyze_trace, compare_runs, deductive_trace, rmse, summary_rows
    from pldr_jax.decode import MODES, generate, prepare_params

    t_all = time.perf_counter()
    env = common.environment()
    mcfg, params, tok, model_info = load_or_train(cfg)
    model_info.update(config=mcfg.to_dict(), params=count_params(params))
    prompt_ids = [tok.encode(p) for p in cfg.prompts]
    B, T = len(prompt_ids), int(cfg.max_new_tokens)
    if max(map(len, prompt_ids)) + T > mcfg.max_seq_len:
        raise ValueError(f"longest prompt ({max(map(len, prompt_ids))} tokens) + {T} new tokens exceeds "
                         f"max_seq_len={mcfg.max_seq_len}")
    run_cfg, run_params = prepare_params(mcfg, params, B)
    common.log(f"model: {model_info['params']:,} parameters; {B} prompts of {[len(p) for p in prompt_ids]} "
               f"tokens; {T} new tokens per mode")

    outs = {}
    for m in MODE_ORDER:
        kv, g = MODES[m]
        t0 = time.perf_counter()
        generate(run_cfg, run_params, prompt_ids, max_new_tokens=T, kv_cache=kv, g_cache=g, top_k=1, eos_id=None,
                 return_logits=True, return_deductive=True)                      # compile + warm
        t1 = time.perf_counter()
        o = generate(run_cfg, run_params, prompt_ids, max_new_tokens=T, kv_cache=kv, g_cache=g, top_k=1,
                     eos_id=None, return_logits=True, return_deductive=True)
        t2 = time.perf_counter()
        outs[m] = o
        outs[m].timings.update(first_call_s=t1 - t0, warm_call_s=t2 - t1)
        common.log(f"[{m}] {o.steps} steps; warm call {t2 - t1:.3f} s (first {t1 - t0:.1f} s); "
                   f"row 0: {o.tokens[0][:12]}...")

    ref = outs["kv_g"]
    ids = {m: {"tokens": o.tokens, "text": [tok.decode(t) for t in o.tokens]} for m, o in outs.items()}
    prompt_g = np.asarray(ref.prompt_deductive["G_LM"], np.float64)            # [layers, B, H, dk, dk]

    mode_rows, delta_rows, drift_mean, deltas_max = [], [], {}, {}
    per_mode_cmp = {}
    none_layers = None
    for m, o in outs.items():
        steps = min(o.steps, ref.steps)
        div = [first_divergence(a, b) for a, b in zip(o.tokens, ref.tokens)]
        d = np.max(np.abs(o.logits[:, :steps].astype(np.float64) - ref.logits[:, :steps]), axis=-1)   # [B, T]
        same_prefix = np.array([[div[b] is None or t <= div[b] for t in range(steps)] for b in range(B)])
        for b in range(B):
            for t in range(steps):
                delta_rows.append({"mode": m, "prompt": b, "step": t, "max_abs_logit_delta": float(d[b, t]),
                                   "same_prefix": bool(same_prefix[b, t]), "token": int(o.tokens[b][t]),
                                   "token_kv_g": int(ref.tokens[b][t])})
        ded = {k: np.asarray(v[:steps], np.float64) for k, v in o.deductive.items()}    # [T, L, B, H, dk, dk]
        ded_ref = {k: np.asarray(v[:steps], np.float64) for k, v in ref.deductive.items()}
        drift = rmse(ded["G_LM"], prompt_g[None])                                 # [T, L, B, H]
        if m == "none":
            none_layers = drift
        drift_mean[m] = drift.mean(axis=(1, 2, 3))
        deltas_max[m] = d.max(axis=0)
        per_mode_cmp[m] = compare_runs(ded_ref, ded, keys=("A_LM", "G_LM"))
        n_same = sum(x is None for x in div)
        mode_rows.append({
            "mode": m, "kv_cache": MODES[m][0], "g_cache": MODES[m][1],
            "same_ids_as_kv_g": f"{n_same}/{B}",
            "token_agreement": float(np.mean([a == b for x, y in zip(o.tokens, ref.tokens) for a, b in zip(x, y)])),
            "first_divergence": min((x for x in div if x is not None), default=None),
            "max_logit_delta_same_prefix": float(d[same_prefix].max()) if same_prefix.any() else 0.0,
            "max_logit_delta_all": float(d.max()),
            "max_G_LM_drift": float(drift.max()),
            "max_G_LM_rmse_vs_kv_g": float(per_mode_cmp[m]["G_LM"]["rmse"].max()),
            "min_G_LM_det_decimals": int(per_mode_cmp[m]["G_LM"]["det_decimals"].min()),
            "decode_s": float(o.timings["warm_call_s"]),
            "tokens_per_s": float(B * o.steps / o.timings["warm_call_s"]),
        })

    # the paper's comparison, aggregated per (mode, tensor, layer)
    cmp_rows, cmp_md = [], []
    for m, cmp in per_mode_cmp.items():
        for k, met in cmp.items():                       # met[...] arrays [T, L, B, H]
            for l in range(met["rmse"].shape[1]):
                sl = (slice(None), l)
                det_r, det_o = met["det_ref"][-1, l, 0, 0], met["det_other"][-1, l, 0, 0]
                row = {"mode": m, "tensor": k, "layer": l,
                       "max_rmse_vs_kv_g": float(met["rmse"][sl].max()),
                       "mean_rmse_vs_kv_g": float(met["rmse"][sl].mean()),
                       "min_det_decimals": int(met["det_decimals"][sl].min()),
                       "median_det_decimals": float(np.median(met["det_decimals"][sl])),
                       "det_kv_g_last_p0_h0": float(det_r), "det_mode_last_p0_h0": float(det_o),
                       "max_rel_det_diff": float(np.nanmax(np.abs(met["det_other"][sl] - met["det_ref"][sl])
                                                           / np.maximum(np.abs(met["det_ref"][sl]), 1e-300))),
                       "max_abs_logdet_diff": float(np.nanmax(np.abs(met["logdet_ref"][sl] - met["logdet_other"][sl])))}
                cmp_rows.append(row)
                cmp_md.append(row)
    common.write_table(cmp_rows, out / "deductive_comparison.csv")
    from pldr_jax.analysis.report import to_markdown
    (out / "deductive_comparison.md").write_text(
        "# Deductive outputs with vs without caching (reference: kv_g)\n\n"
        "Per (mode, tensor, layer) over all steps, prompts and heads: RMSE between the mode's tensor and the "
        "kv_g (cached) one at the same step; decimals to which the determinants agree (15 = all); the "
        "determinant of the last step, prompt 0, head 0 in both modes; the largest relative determinant "
        "difference and |log|det| difference. Determinants of small-dk tensors are tiny, so agreeing decimals "
        "alone say little: read them with the relative difference.\n\n"
        + to_markdown(cmp_md, formats={"det_kv_g_last_p0_h0": ".15e", "det_mode_last_p0_h0": ".15e"}))
    common.write_table(mode_rows, out / "modes.csv", out / "modes.md",
                       title="Decode modes vs kv_g (KV-cache + G-cache), greedy",
                       notes=[f"{B} prompts, {T} new tokens each, no EOS stop. Logit deltas are max |logits - "
                              "logits(kv_g)| per step; 'same prefix' steps are those where both modes had "
                              "generated the same tokens so far. G_LM drift = RMSE of each step's G_LM to "
                              "the prompt-time G_LM."], floatfmt=".3g")
    common.write_table(delta_rows, out / "logit_deltas.csv")

    # same-prefix analysis (cached vs recomputed deductive outputs along the kv_g tokens)
    gen = np.asarray([t[:T] for t in ref.tokens])
    follow_kw = dict(follow="decoder", generated=gen) if gen.min() > 0 else dict(follow="cached")
    trace = deductive_trace(mcfg, params, prompt_ids, max_new_tokens=T, **follow_kw)
    inv = analyze_trace(trace)
    sp_rows = summary_rows(inv)
    common.write_table(sp_rows, out / "same_prefix_summary.csv", out / "same_prefix_summary.md",
                       title="Cached vs recomputed deductive outputs on identical prefixes",
                       notes=[trace.method,
                              f"max |logit diff| cached vs uncached: {float(inv.logits_max_abs_diff.max()):.4g}; "
                              f"greedy tokens agree at {int(inv.same_greedy_token.sum())}/"
                              f"{inv.same_greedy_token.size} steps."])

    plot_fidelity(drift_mean, none_layers, deltas_max, out / "g_lm_drift.png",
                  f"PLDR-LLM cache fidelity ({mcfg.num_layers} layers, d_model {mcfg.d_model}, {B} prompts, "
                  f"{T} greedy tokens)")
    common.write_json(out / "ids.json", {"prompts": list(cfg.prompts), "prompt_ids": prompt_ids, "modes": ids})
    env["total_s"] = time.perf_counter() - t_all
    result = {"experiment": "cache_fidelity", "config": dataclasses.asdict(cfg), "environment": env,
              "model": model_info, "modes": mode_rows, "deductive_comparison": cmp_rows,
              "same_prefix": {"summary": sp_rows, "max_logit_diff": float(inv.logits_max_abs_diff.max()),
                              "greedy_agree": int(inv.same_greedy_token.sum()),
                              "steps": int(inv.same_greedy_token.size), "follow": trace.follow},
              "timings": {m: o.timings for m, o in outs.items()}}
    common.write_json(out / "fidelity.json", result)
    for r in mode_rows:
        common.log(f"[{r['mode']}] same ids {r['same_ids_as_kv_g']}, max logit delta (same prefix) "
                   f"{r['max_logit_delta_same_prefix']:.3g}, G drift {r['max_G_LM_drift']:.3g}, "
                   f"det decimals >= {r['min_G_LM_det_decimals']}")
    common.log(f"done in {env['total_s']:.1f} s; results in {out}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    cfg = common.parse_config(CacheFidelityConfig, argv, QUICK, __doc__.split("\n\n")[0])
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
