"""G_LM ablation: pretrain small PLDR-LLMs that differ only in where G_LM comes from.

Variants (same model size, data, data order, seed, optimiser and step budget):

* ``learned``         v510: the model derives G_LM from the metric tensor A (metric learner + PLGA).
* ``identity``        v510G with G_LM = I in every layer and head (= an SDPA LLM).
* ``random_normal``   v510G with a constant G_LM drawn from N(0, 1) (``--normal-spec``).
* ``random_uniform``  v510G with a constant G_LM drawn from U[0, 1) (what the paper's "RANDOM_NORMAL"
                      predefined-G files actually contain; ``--uniform-spec``).
* ``transferred``     v510G with the G-cache of the trained ``learned`` model on a prompt from the
                      corpus (the first ``--transfer-prompt-len`` tokens of the first validation
                      document), trained from scratch with that constant G.

Each run uses `pldr_jax.train.loop.train` on the embedded corpus (`pldr_jax.data.default_corpus_documents`)
with one sentencepiece tokenizer trained once for all variants.  Writes into ``--out``:

* ``metrics.json``  config, environment, per-variant summaries, per-step train curves and evaluations;
* ``table.csv`` / ``table.md``  final train/validation loss, accuracy, perplexity, wall time, step time;
* ``curves.csv``  per-step train loss/accuracy and the evaluations of every variant;
* ``curves.png``  loss and accuracy curves of all variants in one figure;
* ``transferred_G_LM.png``  the transferred G_LM (layers x heads heatmaps).

Checkpoints, the tokenizer and the G arrays go to ``--workdir`` (default ``runs/ablation``, ignored by
git); ``experiments/cache_fidelity.py`` can reuse the learned model from there.

    python experiments/ablation.py                 # default size (~5 min on a 2-core CPU)
    python experiments/ablation.py --quick --out /tmp/abl --workdir /tmp/abl_runs   # CI size
    python experiments/ablation.py --steps 600 --d-model 96 --variants learned,identity

``--quick`` switches to the "tiny" model size and a few dozen steps and compiles with XLA's backend
optimisations off (``--fast-compile``: faster compiles, slower steps; it only takes effect when this
process has not initialised JAX yet, i.e. when run as a script).  The JAX persistent compilation cache
(``<workdir>/jax_cache``) is on by default, so the predefined-G variants, whose compiled steps are
identical, compile once; wall times therefore include compilation for the first run of a kind only,
and ``step_ms`` (median steady-state time per optimiser step) is the fair speed comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

VARIANTS = ("learned", "identity", "random_normal", "random_uniform", "transferred")
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


# --------------------------------------------------------------------------- config + CLI (shared)
@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """Configuration of the ablation (every field is a CLI option: ``--field-name``)."""
    out: str = "experiments/results/ablation"
    workdir: str = "runs/ablation"
    variants: tuple[str, ...] = VARIANTS
    # model (learned variant; the predefined-G variants drop the metric learner and PLGA weights)
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    dff: int = 170                      # paper rule floor(D * 4 * 2/3)
    A_dff: int = 32
    num_reslayerA: int = 2
    num_denseA: int = 2
    # data
    vocab_size: int = 1000
    seq_len: int = 64
    batch_size: int = 16
    validation_fraction: float = 0.1
    data_seed: int = 0
    # optimisation
    steps: int = 400
    learning_rate: float = 1e-3
    warmup_steps: int = 40
    seed: int = 0
    # logging / evaluation
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    # G sources
    normal_spec: str = "random_normal"  # pldr_jax.g_sources.make_g spec (N(0, 1))
    uniform_spec: str = "uniform"       # U[0, 1)
    transfer_prompt_len: int = 64
    # runtime
    fast_compile: bool = False
    compile_cache: bool = True
    quick: bool = False


QUICK = dict(out="experiments/results/ablation_quick", workdir="runs/ablation_quick", num_layers=2, d_model=32,
             num_heads=4, dff=85, A_dff=16, num_reslayerA=2, num_denseA=2, vocab_size=256, seq_len=32,
             batch_size=8, steps=24, warmup_steps=4, log_every=4, eval_every=8, eval_batches=2,
             transfer_prompt_len=32, fast_compile=True)


def _field_parser(tp):
    """A str -> value converter for a dataclass field type (bool handled by the caller)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple:   # "a,b,c" (or "a|b|c", for items that contain commas)
        inner = args[0] if args else str
        return lambda s: tuple(inner(x.strip()) for x in s.split("|" if "|" in s else ",") if x.strip())
    if type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        conv = _field_parser(inner)
        return lambda s: None if s.lower() in ("none", "null", "") else conv(s)
    return tp


def parse_config(cls, argv: Sequence[str] | None, quick: Mapping[str, Any], description: str):
    """Build ``cls`` (a frozen dataclass) from defaults, ``quick`` (with --quick) and CLI overrides."""
    hints = typing.get_type_hints(cls)
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default {shown})")
        else:
            p.add_argument(flag, dest=f.name, type=_field_parser(tp), default=argparse.SUPPRESS,
                           help=f"(default {shown})")
    ns = vars(p.parse_args(list(argv) if argv is not None else None))
    base = cls()
    if ns.get("quick", False):
        base = dataclasses.replace(base, quick=True, **quick)
    return dataclasses.replace(base, **ns)


def setup_runtime(fast_compile: bool, cache_dir: str | os.PathLike | None) -> None:
    """XLA flags and the persistent compilation cache; call before the first JAX computation."""
    if fast_compile and FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAG).strip()
    import jax
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def environment() -> dict:
    """Where a result came from (machine, versions, load)."""
    import jax
    env = {"python": platform.python_version(), "jax": jax.__version__, "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "devices": [str(d) for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        env["loadavg_start"] = list(os.getloadavg())
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            env["cpu_model"] = names[0]
    except OSError:
        pass
    return env


def jsonable(x):
    """Convert numpy / jax scalars and arrays (recursively) to JSON-friendly Python values."""
    import numpy as np
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        a = np.asarray(x)
        return jsonable(a.tolist()) if a.ndim else jsonable(a.item())
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)  # "nan" / "inf": keep the file valid JSON
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return jsonable(float(x))
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=1))
    return path


def write_table(rows: Sequence[Mapping], csv_path: Path, md_path: Path | None = None, title: str | None = None,
                notes: Sequence[str] = (), floatfmt: str = ".4g") -> None:
    from pldr_jax.analysis.report import to_markdown, write_csv
    write_csv(rows, csv_path)
    if md_path is not None:
        text = (f"# {title}\n\n" if title else "") + "".join(f"{n}\n\n" for n in notes)
        md_path.write_text(text + to_markdown(rows, floatfmt=floatfmt))


def log(*a):
    print("[experiments]", *a, flush=True)


# --------------------------------------------------------------------------- data
def prepare_corpus_and_tokenizer(workdir: Path, vocab_size: int, seed: int = 0):
    """(documents, Tokenizer) of the embedded corpus; the tokenizer is trained once into
    ``workdir/tokenizer.model`` and reused when present with the same vocabulary request."""
    from pldr_jax.data import Tokenizer, default_corpus_documents
    docs = default_corpus_documents()
    workdir.mkdir(parents=True, exist_ok=True)
    path, meta = workdir / "tokenizer.model", workdir / "tokenizer.json"
    want = {"vocab_size": vocab_size, "seed": seed, "documents": len(docs), "chars": sum(map(len, docs))}
    if path.exists() and meta.exists() and json.loads(meta.read_text()) == want:
        return docs, Tokenizer.load(path)
    tok = Tokenizer.train(docs, workdir / "tokenizer", vocab_size, seed=seed)
    meta.write_text(json.dumps(want))
    return docs, Tokenizer.load(path)


def transfer_prompt(docs: Sequence[str], tokenizer, validation_fraction: float, data_seed: int, length: int):
    """(text, ids) of the transfer prompt: the first `length` tokens of the first validation document
    (the same split the training pipeline uses), falling back to document 0."""
    from pldr_jax.data import split_documents
    idx = 0
    if validation_fraction > 0:
        _, val = split_documents(len(docs), validation_fraction, data_seed)
        idx = int(val[0]) if len(val) else 0
    ids = tokenizer.encode(docs[idx])[:length]
    return tokenizer.decode(ids), [int(i) for i in ids], idx


# --------------------------------------------------------------------------- one run
def model_config(cfg: AblationConfig, vocab_size: int, custom_G_type: str | None):
    from pldr_jax import PLDRConfig
    kw = dict(num_layers=cfg.num_layers, d_model=cfg.d_model, num_heads=cfg.num_heads, dff=cfg.dff,
              vocab_size=vocab_size, max_seq_len=max(cfg.seq_len, cfg.transfer_prompt_len))
    if custom_G_type is None:
        return PLDRConfig(**kw, A_dff=cfg.A_dff, num_reslayerA=cfg.num_reslayerA, num_denseA=cfg.num_denseA)
    return PLDRConfig(**kw, custom_G_type=custom_G_type, A_dff=0, num_reslayerA=0, num_denseA=0)


def train_config(cfg: AblationConfig, workdir: Path, tokenizer_path: str, g_source: str | None):
    from pldr_jax.train.loop import TrainConfig
    return TrainConfig(workdir=str(workdir), steps=cfg.steps, seed=cfg.seed, overwrite=True,
                       tokenizer=tokenizer_path, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                       batch_size=cfg.batch_size, validation_fraction=cfg.validation_fraction,
                       data_seed=cfg.data_seed, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                       log_every=cfg.log_every, eval_every=cfg.eval_every, eval_batches=cfg.eval_batches,
                       save_every=0, keep_checkpoints=1, async_checkpoint=False, progress=False, plot=False,
                       tensorboard=False, g_source=g_source)


def train_kwargs(cfg) -> dict:
    """Extra keyword arguments for `pldr_jax.train.loop.train`: XLA compiler options with --fast-compile
    (effective even when JAX was initialised before XLA_FLAGS could be set)."""
    import inspect

    from pldr_jax.train.loop import train
    if cfg.fast_compile and "compiler_options" in inspect.signature(train).parameters:
        return {"compiler_options": {"xla_backend_optimization_level": 0}}
    return {}


def summarize_run(name: str, result, g_lm, n_params: int, cfg: AblationConfig, g_spec: str) -> dict:
    """Summary row + curves of one finished `train` call."""
    import numpy as np
    from pldr_jax.train.loop import read_metrics
    sm = result.step_metrics
    steps = [int(m["step"]) for m in sm]
    loss = [float(m["loss"]) for m in sm]
    acc = [float(m["accuracy"]) for m in sm]
    k = max(1, min(cfg.log_every, len(sm)))
    recs = [r for r in read_metrics(result.paths["metrics"]) if r.get("kind") == "train"]
    step_s = [r["step_s"] for r in recs if isinstance(r.get("step_s"), (int, float)) and math.isfinite(r["step_s"])]
    if getattr(result, "first_step_s", None) is None and len(step_s) > 1:
        step_s = step_s[1:]   # older loops count compilation in the first interval
    final_eval = result.evals[-1] if result.evals else {}
    row = {
        "variant": name, "g_lm": g_spec, "custom_G_type": str(result.model_cfg.custom_G_type),
        "params": n_params, "steps": result.end_step,
        "tokens_seen": int(sum(m.get("tokens", 0.0) for m in sm)),
        "final_train_loss": float(np.mean(loss[-k:])) if loss else float("nan"),
        "final_train_accuracy": float(np.mean(acc[-k:])) if acc else float("nan"),
        "val_loss": float(final_eval.get("val_loss", float("nan"))),
        "val_accuracy": float(final_eval.get("val_accuracy", float("nan"))),
        "val_perplexity": float(final_eval.get("val_perplexity", float("nan"))),
        "wall_s": float(result.wall_s),
        "compile_s": float(getattr(result, "first_step_s", None) or float("nan")),
        "step_ms": 1000.0 * float(np.median(step_s)) if step_s else float("nan"),
    }
    g_stats = None
    if g_lm is not None:
        g = np.asarray(g_lm, np.float64)
        g_stats = {"shape": list(g.shape), "mean": float(g.mean()), "std": float(g.std()),
                   "min": float(g.min()), "max": float(g.max())}
    return {"summary": row, "g_stats": g_stats,
            "curve": {"step": steps, "loss": loss, "accuracy": acc},
            "evals": [{k2: v for k2, v in e.items() if k2 != "kind"} for e in result.evals],
            "paths": {k2: v for k2, v in result.paths.items() if v is not None}}


def _interval_means(curve: Mapping[str, list], k: int) -> dict:
    """Train curve averaged over consecutive intervals of k steps (what metrics.jsonl logs)."""
    import numpy as np
    out = {"step": [], "loss": [], "accuracy": []}
    for i in range(0, len(curve["step"]), max(1, k)):
        sl = slice(i, i + max(1, k))
        out["step"].append(int(curve["step"][sl][-1]))
        out["loss"].append(float(np.mean(curve["loss"][sl])))
        out["accuracy"].append(float(np.mean(curve["accuracy"][sl])))
    return out


def _smooth(y, k: int):
    import numpy as np
    y = np.asarray(y, np.float64)
    if len(y) < 2 or k <= 1:
        return y
    out, m, alpha = np.empty_like(y), y[0], 2.0 / (k + 1)
    for i, v in enumerate(y):
        m = alpha * v + (1 - alpha) * m if i else v
        out[i] = m
    return out


def plot_curves(runs: Mapping[str, dict], path: Path, title: str, smooth: int = 10) -> Path:
    """Loss (left) and accuracy (right) of every variant in one figure: train lines (EMA-smoothed
    per-step values, raw values faint) and validation markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_l, ax_a = fig.subplots(1, 2)
    colors = {"learned": "C3", "identity": "C0", "random_normal": "C2", "random_uniform": "C1", "transferred": "C4"}
    for i, (name, run) in enumerate(runs.items()):
        c = colors.get(name, f"C{5 + i}")
        cur, ev = run["curve"], run["evals"]
        for ax, key, vkey in ((ax_l, "loss", "val_loss"), (ax_a, "accuracy", "val_accuracy")):
            ax.plot(cur["step"], cur[key], color=c, alpha=0.18, lw=0.8)
            ax.plot(cur["step"], _smooth(cur[key], smooth), color=c, lw=1.6, label=f"{name} (train)")
            if ev:
                ax.plot([e["step"] for e in ev], [e[vkey] for e in ev], "o--", color=c, ms=4, lw=0.9,
                        label=f"{name} (val)")
    ax_l.set_ylabel("masked cross-entropy")
    ax_a.set_ylabel("next-token accuracy")
    for ax in (ax_l, ax_a):
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    ax_l.set_title("loss")
    ax_a.set_title("accuracy")
    ax_a.legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


# --------------------------------------------------------------------------- the experiment
def run(cfg: AblationConfig) -> dict:
    """Run the ablation described by `cfg`; returns the metrics dict (also written to cfg.out)."""
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}")
    variants = [v for v in VARIANTS if v in cfg.variants]        # learned before transferred
    if "transferred" in variants and "learned" not in variants:
        raise ValueError("the 'transferred' variant needs the 'learned' variant (its G source)")
    out, workdir = Path(cfg.out), Path(cfg.workdir)
    out.mkdir(parents=True, exist_ok=True)
    setup_runtime(cfg.fast_compile, workdir / "jax_cache" if cfg.compile_cache else None)
    import jax
    import numpy as np

    from pldr_jax import count_params
    from pldr_jax.g_sources import transferred_g
    from pldr_jax.train.loop import train

    t_all = time.perf_counter()
    env = environment()
    log(f"ablation: variants {variants}, {cfg.steps} steps, out={out}, workdir={workdir}")
    t0 = time.perf_counter()
    docs, tok = prepare_corpus_and_tokenizer(workdir, cfg.vocab_size, cfg.data_seed)
    log(f"corpus {len(docs)} documents; tokenizer {tok.vocab_size} pieces ({time.perf_counter() - t0:.1f} s)")
    specs = {"learned": (None, None), "identity": ("identity", "identity"),
             "random_normal": ("random", cfg.normal_spec), "random_uniform": ("random", cfg.uniform_spec),
             "transferred": ("external", None)}
    runs: dict[str, dict] = {}
    transfer: dict = {}
    learned_cfg = learned_params = None
    for name in variants:
        g_type, g_spec = specs[name]
        if name == "transferred":
            text, ids, doc_idx = transfer_prompt(docs, tok, cfg.validation_fraction, cfg.data_seed,
                                                 cfg.transfer_prompt_len)
            g = np.asarray(transferred_g(learned_cfg, learned_params, np.asarray(ids, np.int32)), np.float32)
            g_path = workdir / "transferred_g_lm.npy"
            np.save(g_path, g)
            g_spec = f"external:{g_path.absolute()}"
            transfer = {"source": "learned", "document_index": doc_idx, "prompt_ids": ids, "prompt_text": text,
                        "g_file": str(g_path), "g_shape": list(g.shape), "g_finite": bool(np.all(np.isfinite(g)))}
            try:
                from pldr_jax.analysis.plots import heatmap_grid
                heatmap_grid(g, title="transferred G_LM (learned model, corpus prompt)",
                             path=out / "transferred_G_LM.png", max_heads=8)
            except Exception as e:  # a plot must not fail the experiment
                log(f"warning: transferred G heatmap failed: {e}")
        mcfg = model_config(cfg, tok.vocab_size, g_type)
        tcfg = train_config(cfg, workdir / name, str(tok.path or workdir / "tokenizer.model"),
                            None if g_type is None else g_spec)
        log(f"[{name}] training {count_params(mcfg):,} parameters, G_LM = {g_spec or 'learned'}")
        res = train(mcfg, tcfg, tokenizer=tok, documents=docs, log=lambda *a: log(f"[{name}]", *a),
                    **train_kwargs(cfg))
        params = jax.device_get(res.state.params)
        label = {"learned": "learned (metric learner + PLGA)",
                 "transferred": f"G-cache of 'learned' on a {len(transfer.get('prompt_ids', []))}-token val prompt"
                 }.get(name, g_spec)
        runs[name] = summarize_run(name, res, res.g_lm, count_params(params), cfg, label)
        s = runs[name]["summary"]
        log(f"[{name}] train loss {s['final_train_loss']:.4f}  val loss {s['val_loss']:.4f}  val acc "
            f"{s['val_accuracy']:.4f}  ppl {s['val_perplexity']:.1f}  wall {s['wall_s']:.1f} s  "
            f"step {s['step_ms']:.1f} ms")
        if name == "learned":
            learned_cfg, learned_params = res.model_cfg, params
        del res
    rows = [r["summary"] for r in runs.values()]
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env["total_s"] = time.perf_counter() - t_all
    title = (f"G_LM ablation: {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, "
             f"{cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, seed {cfg.seed}")
    notes = [f"Embedded corpus ({len(docs)} documents), tokenizer {tok.vocab_size} pieces, validation "
             f"fraction {cfg.validation_fraction}; val metrics on {cfg.eval_batches} batches after the last step. "
             "final_train_* = mean over the last log interval. wall_s includes compilation (the persistent "
             "compile cache is shared by the predefined-G runs); compile_s = compilation + first step; step_ms = "
             "median steady-state time per optimiser step."]
    write_table(rows, out / "table.csv", out / "table.md", title=title, notes=notes)
    curve_rows = []
    for name, r in runs.items():
        c = r["curve"]
        curve_rows += [{"variant": name, "kind": "train", "step": s, "loss": l, "accuracy": a}
                       for s, l, a in zip(c["step"], c["loss"], c["accuracy"])]
        curve_rows += [{"variant": name, "kind": "eval", "step": e["step"], "loss": e["val_loss"],
                        "accuracy": e["val_accuracy"]} for e in r["evals"]]
    write_table(curve_rows, out / "curves.csv")
    plot_curves(runs, out / "curves.png", title)
    metrics = {"experiment": "ablation", "config": dataclasses.asdict(cfg), "environment": env,
               "tokenizer": {"vocab_size": tok.vocab_size, "path": str(tok.path)},
               "corpus": {"documents": len(docs), "characters": sum(map(len, docs))},
               "transfer": transfer, "table": rows,
               "runs": {k: {"g_stats": v["g_stats"], "evals": v["evals"], "paths": v["paths"],
                            "train_curve": _interval_means(v["curve"], cfg.log_every)} for k, v in runs.items()},
               "files": {"curves_csv": "per-step train loss/accuracy and evaluations of every variant"}}
    write_json(out / "metrics.json", metrics)
    log(f"done in {env['total_s']:.1f} s; results in {out}")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(AblationConfig, argv, QUICK, __doc__.split("\n\n")[0])
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
