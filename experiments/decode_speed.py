"""Decode speed of small PLDR-LLMs: tokens/s of the four cache modes at several batch sizes.

For each model (presets "tiny" and "small" with random weights by default; ``--checkpoint DIR`` adds
a trained model from a training workdir, e.g. ``runs/ablation/learned``), each batch size and each
mode (``kv_g`` KV+G-cache, ``kv`` KV only, ``g`` G only, ``none``), it times greedy generation of
``--new-tokens`` tokens from random ``--prompt-len``-token prompts with `pldr_jax.decode.generate`
(no EOS stop, so every row produces exactly that many tokens).

tokens/s = batch * new_tokens / wall time of the whole ``generate`` call (prefill included), median of
the timed runs after one warm-up call (which also compiles): the same definition as the reference's
figures and ``experiments/bench_decode.py`` (the 110M benchmark; its contention-aware timer is reused
when importable: a run counts as "clean" when other processes used less than ``--max-others`` of the
machine's CPU meanwhile; if no run is clean the median of all runs is reported and flagged).

Writes into ``--out``: ``speed.json`` (all timings, environment), ``speed.csv`` (one row per model,
batch, mode), ``speed.md`` (tokens/s pivot table + speed-up of kv_g over none) and ``speed.png``.

    python experiments/decode_speed.py
    python experiments/decode_speed.py --models small --batches 1,8 --new-tokens 64
    python experiments/decode_speed.py --quick --out /tmp/ds     # CI size
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation as common  # noqa: E402  (shared helpers: CLI, runtime, JSON/CSV writers)

MODE_ORDER = ("kv_g", "kv", "g", "none")


@dataclasses.dataclass(frozen=True)
class DecodeSpeedConfig:
    """Configuration (every field is a CLI option: ``--field-name``)."""
    out: str = "experiments/results/decode_speed"
    models: tuple[str, ...] = ("tiny", "small")    # presets (random init)
    checkpoint: str = "none"                       # also time a trained model from this training workdir
    batches: tuple[int, ...] = (1, 4, 16)
    modes: tuple[str, ...] = MODE_ORDER
    prompt_len: int = 32
    new_tokens: int = 32
    reps: int = 3
    max_tries: int = 6
    max_others: float = 0.25
    budget_s: float = 20.0
    seed: int = 0
    fast_compile: bool = False
    compile_cache: bool = False     # off: compile_s should measure real compilation
    quick: bool = False


QUICK = dict(out="experiments/results/decode_speed_quick", models=("tiny",), batches=(1, 4), prompt_len=8,
             new_tokens=8, reps=1, max_tries=1, budget_s=5.0, fast_compile=True)


def _simple_timed(fn, reps, max_tries, max_others, budget_s=1e9):
    """Fallback timer: (clean times, all times, others' CPU shares, last result) without contention data."""
    all_t, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        all_t.append(time.perf_counter() - t0)
    return all_t, all_t, [float("nan")] * len(all_t), out


try:  # the 110M benchmark's contention-aware timer (experiments/bench_decode.py)
    from bench_decode import timed as _timed  # type: ignore
except Exception:  # noqa: BLE001 - the file may be absent or changing
    _timed = _simple_timed


def load_models(cfg: DecodeSpeedConfig):
    """{name: (model cfg, params)} of the presets (random init) and the optional checkpoint."""
    import jax

    from pldr_jax import PLDRConfig, init_params
    models = {}
    for name in cfg.models:
        mcfg = PLDRConfig.preset(name)
        models[name] = (mcfg, jax.jit(init_params, static_argnums=0)(mcfg, jax.random.key(cfg.seed)))
    if cfg.checkpoint.lower() != "none":
        from pldr_jax.train.checkpoint import load_params
        p = Path(cfg.checkpoint)
        ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        mcfg, params, _ = load_params(ck)
        models[f"trained:{p.name}"] = (mcfg, params)
    return models


def time_one(mcfg, params, batch: int, mode: str, cfg: DecodeSpeedConfig) -> dict:
    import numpy as np

    from pldr_jax.decode import MODES, generate, prepare_params
    rng = np.random.default_rng(cfg.seed + batch)
    prompts = rng.integers(4, mcfg.vocab_size, (batch, cfg.prompt_len)).tolist()
    run_cfg, run_params = prepare_params(mcfg, params, batch)
    kv, g = MODES[mode]
    kw = dict(max_new_tokens=cfg.new_tokens, kv_cache=kv, g_cache=g, top_k=1, eos_id=None)
    t0 = time.perf_counter()
    first = generate(run_cfg, run_params, prompts, **kw)
    first_s = time.perf_counter() - t0
    timings = []

    def call():
        o = generate(run_cfg, run_params, prompts, **kw)
        timings.append(o.timings)
        return o

    clean, all_t, shares, out = _timed(call, cfg.reps, max(cfg.max_tries, cfg.reps), cfg.max_others, cfg.budget_s)
    use = clean if clean else all_t
    idx = [all_t.index(t) for t in use]
    total = statistics.median(use)
    steps = max(cfg.new_tokens - 1, 1)
    assert all(len(t) == cfg.new_tokens for t in out.tokens), "every row must produce new_tokens tokens"
    return {
        "batch": batch, "mode": mode, "tokens_per_s": batch * cfg.new_tokens / total, "total_s": total,
        "prefill_ms": 1e3 * statistics.median(timings[i]["prefill_s"] for i in idx),
        "step_ms": 1e3 * statistics.median(timings[i]["decode_s"] for i in idx) / steps,
        "compile_s": max(first_s - total, 0.0), "clean_runs": len(clean), "runs": len(all_t),
        "others_cpu_share": float(statistics.median(shares)) if shares else float("nan"),
        "first_ids": first.tokens[0][:8],
    }


def plot_speed(rows, models, path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.2 * len(models), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    styles = {"kv_g": ("C0", "o"), "kv": ("C1", "s"), "g": ("C2", "^"), "none": ("C3", "d")}
    for ax, name in zip(axes, models):
        for m in MODE_ORDER:
            pts = sorted((r["batch"], r["tokens_per_s"]) for r in rows if r["model"] == name and r["mode"] == m)
            if pts:
                c, mk = styles[m]
                ax.plot(*zip(*pts), marker=mk, color=c, label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("new tokens / s (prefill included)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def run(cfg: DecodeSpeedConfig) -> dict:
    bad = [m for m in cfg.modes if m not in MODE_ORDER]
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {MODE_ORDER}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    common.setup_runtime(cfg.fast_compile, out.parent / ".jax_cache_decode_speed" if cfg.compile_cache else None)
    from pldr_jax import count_params
    t_all = time.perf_counter()
    env = common.environment()
    env["timer"] = "bench_decode.timed" if _timed is not _simple_timed else "simple"
    models = load_models(cfg)
    rows, info = [], {}
    for name, (mcfg, params) in models.items():
        info[name] = {"config": mcfg.to_dict(), "params": count_params(params)}
        for b in cfg.batches:
            for m in [x for x in MODE_ORDER if x in cfg.modes]:
                r = {"model": name, **time_one(mcfg, params, b, m, cfg)}
                rows.append(r)
                flag = "" if r["clean_runs"] else "  (contended)"
                common.log(f"{name:>6s} batch {b:3d} {m:5s} {r['tokens_per_s']:9.1f} tok/s  prefill "
                           f"{r['prefill_ms']:7.1f} ms  step {r['step_ms']:7.2f} ms  compile {r['compile_s']:5.1f} s"
                           f"{flag}")
    # pivot: one row per (model, batch), one column per mode
    pivot = []
    for name in models:
        for b in cfg.batches:
            row = {"model": name, "params": info[name]["params"], "batch": b}
            for r in rows:
                if r["model"] == name and r["batch"] == b:
                    row[f"{r['mode']} tok/s"] = r["tokens_per_s"]
            if "kv_g tok/s" in row and "none tok/s" in row:
                row["kv_g / none"] = row["kv_g tok/s"] / row["none tok/s"]
            pivot.append(row)
    env["loadavg_end"] = list(__import__("os").getloadavg())
    env["total_s"] = time.perf_counter() - t_all
    title = (f"Greedy decoding, prompt {cfg.prompt_len} -> {cfg.new_tokens} new tokens, float32, "
             f"median of {cfg.reps} timed runs")
    common.write_table([{k: v for k, v in r.items() if k != "first_ids"} for r in rows], out / "speed.csv")
    common.write_table(pivot, out / "speed_pivot.csv", out / "speed.md", title=title, floatfmt=".1f",
                       notes=["tokens/s = batch x new tokens / wall time of one generate call (prefill "
                              "included). Random-init weights (no EOS stop); see speed.csv for prefill, "
                              "per-step and compile times and the CPU contention of each measurement."])
    plot_speed(rows, list(models), out / "speed.png", title)
    result = {"experiment": "decode_speed", "config": dataclasses.asdict(cfg), "environment": env,
              "models": info, "results": rows, "pivot": pivot}
    common.write_json(out / "speed.json", result)
    common.log(f"done in {env['total_s']:.1f} s; results in {out}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    cfg = common.parse_config(DecodeSpeedConfig, argv, QUICK, __doc__.split("\n\n")[0])
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
