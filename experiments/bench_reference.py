"""Decoding beside the authors' PyTorch code, in the same run: tokens/s of both and x_reference = ours / theirs.

For each (batch, mode) it runs the authors' PLDR-LLM v510 model (their code, imported from the directory
given by --reference-src; nothing of it is copied here) in a subprocess of --reference-python with
2 torch threads, and ours (`bench_decode.py --one`, one subprocess per configuration), interleaved,
on the same prompts (ids from numpy `default_rng(1)` in 4..vocab-1, as `bench_decode.run_one` draws
them), greedy (top-k 1), prompt 64 -> 64 new tokens, no EOS stop; tokens/s = all new tokens of the
batch / wall time of the whole generation (prefill included), median of the timed runs after one
warm-up, both sides through `bench_decode.timed` (runs that saw other processes use the CPU are retried).

Rounds (--rounds N, default 3): one process's batch-1 call varies by ~15 % from one process to the
next on a 2-core host, so one alternation is not a verdict.  Every (batch, mode) runs N rounds, each a
fresh process of theirs and of ours (in each of our dtypes at that batch); the side that goes first
alternates ABBA-style (`side_order`: theirs first in even rounds, ours first in odd ones), so that a
drift of the machine's speed and any first-process effect cancel between rounds; the rounds loop
outermost, so each configuration's rounds are spread over the whole run.  A round's ratio is ours /
theirs of that round; a row's x_reference is the **median of its rounds' ratios** over the clean
rounds (both sides had an undisturbed timed run; all rounds, marked not clean, when none was), with
min / max, and every round's tokens/s of both sides (`compare_rows`).  The row's tokens/s of each
side is the median of that side's per-round figures (so x_reference is not their quotient).

    python experiments/bench_reference.py --reference-src /path/to/PLDR-LLM-with-KVG-cache/src \\
        --reference-python /path/to/torch-venv/bin/python [--rounds 3] [--json]

Rows: batch 1 float32, batch 8 float32 and batch 8 bfloat16 (ours in bfloat16 against their
float32, as the issue's table), modes kv_g and kv; each row carries the issue's target ratio.

The authors' side: the model is built as their evaluation code builds it (`torch.manual_seed(0)`, then
their `dist_pldr_model_e2e(rank 0, world 1, device='cpu', is_train=False)`) from our preset's
hyper-parameters, and its parameter count is checked against ours.  At batch 1 the timed call is their
`generate_text(top_k=1)` (a stand-in tokenizer returns the prompt ids and an end id that can never be
sampled); it only does batch 1, so at batch > 1 the timed call is our loop mirroring it step for step
(mask on the uncached first step, their model's forward with their KV-/G-cache lists passed back,
their `top_k_logits(k=1)` then a categorical sample).  At batch 1 the mirror loop is also run once and
must give generate_text's ids.  If their run module cannot be imported (it needs keras) the mirror
loop is used at every batch, with their `PLDR_Model` built directly (same seed, same order).

Needs on the reference side: torch (CPU), numpy, torchtune (their RoPE) and, for generate_text, keras.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_FILE = os.path.join("pldr_model_v510", "pldr_model_v510.py")
MODES = {"kv_g": (True, True), "kv": (True, False)}          # mode -> (enable_kvcache, enable_Gcache)
# The acceptance ratios (ours / theirs, same run), by (batch, our dtype); theirs is float32.
TARGETS = {(1, "float32"): 2.5, (8, "float32"): 2.0, (8, "bfloat16"): 2.4}
DEFAULT_CONFIGS = ((1, "float32"), (8, "float32"), (8, "bfloat16"))


class ReferenceError_(RuntimeError):
    """A problem with the reference side, reported as one line."""


# --------------------------------------------------------------------------- helpers without torch or JAX
def resolve_reference_src(path: str | None) -> str:
    """The directory holding `pldr_model_v510/pldr_model_v510.py`: `path` itself (their `src`), its
    `src/` (the repository root) or its parent (the `pldr_model_v510` folder itself).  Raises
    ReferenceError_ naming the problem."""
    if not path:
        raise ReferenceError_("--reference-src DIR is required: the authors' PLDR-LLM-with-KVG-cache `src` "
                              "directory (the one holding pldr_model_v510/)")
    if not os.path.isdir(path):
        raise ReferenceError_(f"--reference-src {path!r} is not a directory")
    for cand in (path, os.path.join(path, "src"), os.path.dirname(os.path.abspath(path))):
        if os.path.isfile(os.path.join(cand, MODEL_FILE)):
            return os.path.abspath(cand)
    raise ReferenceError_(f"--reference-src {path!r} holds no {MODEL_FILE} (give the authors' `src` directory)")


def make_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = 1) -> list[list[int]]:
    """The prompts both sides use: ids in [4, vocab_size) from numpy `default_rng(seed)`, as
    `bench_decode.run_one` draws them (its seed is 1).  [batch][prompt_len] Python ints."""
    import numpy as np
    return np.random.default_rng(seed).integers(4, vocab_size, (batch, prompt_len)).tolist()


def reference_hparams(cfg: dict) -> dict:
    """The authors' hyper-parameter dict for our config (`PLDRConfig.to_dict()`), JSON-able
    (the activation, F.silu, is added on the reference side)."""
    if cfg.get("custom_G_type"):
        raise ReferenceError_("the reference comparison needs a learned-G preset (custom_G_type is set)")
    return {"num_layers": cfg["num_layers"], "d_model": cfg["d_model"], "num_heads": cfg["num_heads"],
            "dff": cfg["dff"], "input_vocab_size": cfg["vocab_size"], "A_dff": cfg["A_dff"],
            "num_reslayerA": cfg["num_reslayerA"], "num_denseA": cfg["num_denseA"],
            "max_seq_len": cfg["max_seq_len"], "save_type": "torch"}


def side_order(round_index: int) -> tuple[str, str]:
    """Which side runs first in a round: ("reference", "ours") in even rounds, ("ours", "reference")
    in odd ones -- over rounds 0, 1, 2, 3: R O O R R O O R (ABBA), so each side goes first as often
    as the other and a linear drift of the machine's speed cancels over each pair of rounds."""
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    return ("reference", "ours") if round_index % 2 == 0 else ("ours", "reference")


def compare_rows(ours: list[dict], reference: list[dict]) -> list[dict]:
    """One row per (batch, mode, dtype) of ours, in first-seen order: per round its tokens/s beside
    the reference's (float32) of the same batch, mode and round, the round's ratio ours / theirs and
    whether it is `clean` (both sides had at least one timed run that other processes did not disturb:
    a torch run under contention slows far more than ours, so a ratio from disturbed runs is not
    valid); then x_reference = the median of the clean rounds' ratios (of every round's, with
    clean False, when no round is clean; None without a reference), x_min / x_max over the same
    rounds, tokens_per_s / reference_tokens_per_s = each side's median over them, the issue's target
    ratio for (batch, dtype) and whether the median meets it.

    ours: dicts with batch, mode, dtype, tokens_per_s[, clean_runs][, round (default 0)].
    reference: dicts with batch, mode, tokens_per_s[, clean_runs][, round (default 0)]."""
    ref_by = {(r["batch"], r["mode"], r.get("round", 0)): r for r in reference}
    groups: dict[tuple, list[dict]] = {}
    for o in ours:
        groups.setdefault((o["batch"], o["mode"], o["dtype"]), []).append(o)
    rows = []
    for (batch, mode, dtype), results in groups.items():
        per_round = []
        for o in sorted(results, key=lambda o: o.get("round", 0)):
            rnd = o.get("round", 0)
            ref = ref_by.get((batch, mode, rnd))
            ref_tok = ref["tokens_per_s"] if ref else None
            per_round.append({"round": rnd, "reference_first": side_order(rnd)[0] == "reference",
                              "tokens_per_s": o["tokens_per_s"], "reference_tokens_per_s": ref_tok,
                              "x_reference": o["tokens_per_s"] / ref_tok if ref_tok else None,
                              "clean": None if ref is None else bool(o.get("clean_runs", 1)
                                                                     and ref.get("clean_runs", 1))})
        paired = [p for p in per_round if p["x_reference"] is not None]
        use = [p for p in paired if p["clean"]] or paired
        x = statistics.median(p["x_reference"] for p in use) if use else None
        target = TARGETS.get((batch, dtype))
        rows.append({"batch": batch, "mode": mode, "dtype": dtype,
                     "tokens_per_s": statistics.median(p["tokens_per_s"] for p in (use or per_round)),
                     "reference_tokens_per_s": statistics.median(p["reference_tokens_per_s"] for p in use)
                     if use else None,
                     "x_reference": x, "x_min": min(p["x_reference"] for p in use) if use else None,
                     "x_max": max(p["x_reference"] for p in use) if use else None, "target": target,
                     "meets_target": None if x is None or target is None else x >= target,
                     "clean": None if not paired else any(p["clean"] for p in paired),
                     "n_rounds": len(per_round), "clean_rounds": sum(bool(p["clean"]) for p in per_round),
                     "rounds": per_round})
    return rows


def format_row(r: dict) -> str:
    """One printed line of a `compare_rows` row (the median and spread when it has several rounds)."""
    x = "-" if r["x_reference"] is None else f"{r['x_reference']:.2f}x"
    n = r.get("n_rounds", 1)
    if r["x_reference"] is not None and n > 1:
        used = r["clean_rounds"] or n
        x += f" (median of {used} rounds' ratios, {r['x_min']:.2f}-{r['x_max']:.2f})"
    tgt = "" if r["target"] is None else f"  (target >= {r['target']}: {'met' if r['meets_target'] else 'NOT met'})"
    ref = "-" if r["reference_tokens_per_s"] is None else f"{r['reference_tokens_per_s']:.1f}"
    if r.get("clean") is False:
        warn = "  [CONTENDED: no round had undisturbed timed runs on both sides; ratio not valid]"
    elif r.get("clean") and r.get("clean_rounds", n) < n:
        warn = f"  [{n - r['clean_rounds']} of {n} rounds contended, left out]"
    else:
        warn = ""
    return (f"batch {r['batch']:2d} {r['mode']:4s} {r['dtype']:8s}  ours {r['tokens_per_s']:7.1f} tok/s  "
            f"authors' (float32) {ref:>7s} tok/s  x_reference {x}{tgt}{warn}")


def format_round(p: dict, batch: int, mode: str, dtype: str, n_rounds: int) -> str:
    """One printed line of a round of a `compare_rows` row."""
    x = "-" if p["x_reference"] is None else f"{p['x_reference']:.2f}x"
    ref = "-" if p["reference_tokens_per_s"] is None else f"{p['reference_tokens_per_s']:.1f}"
    first = "theirs first" if p["reference_first"] else "ours first"
    warn = "  [CONTENDED]" if p["clean"] is False else ""
    return (f"round {p['round'] + 1}/{n_rounds} ({first}) batch {batch:2d} {mode:4s} {dtype:8s}  ours "
            f"{p['tokens_per_s']:7.1f} tok/s  authors' {ref:>7s} tok/s  = {x}{warn}")


# --------------------------------------------------------------------------- the authors' side (torch)
class _StandInTokenizer:
    """What `generate_text` needs of a data object: tokenize(prompt) -> the prompt's ids plus an end id
    (-1) that generate_text drops and that can never be sampled (so no EOS stop); detokenize -> ids."""

    def __init__(self, ids: list[int]):
        self.ids = list(ids)

    def tokenize(self, text):
        return (list(self.ids) if text else []) + [-1]

    def detokenize(self, ids):
        return ids.tolist()


def _torch_threads(n: int) -> None:
    """n intra-op and (where still settable) n inter-op torch threads, as the stored baseline ran."""
    import torch

    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:            # already fixed in this process (parallel work has started)
            pass


def _reference_model(src: str, hp: dict, ids_row0: list[int]):
    """(model, e2e or None): their model, built as their evaluation code builds it."""
    import torch
    import torch.nn.functional as F

    for p in (os.path.join(src, "pldr_model_v510"), src):
        if p not in sys.path:
            sys.path.insert(0, p)
    import pldr_model_v510 as pm
    hp = dict(hp, activation=F.silu)
    try:
        import logging
        import pldr_run_model_v510 as prm
        logging.getLogger("M").setLevel(logging.WARNING)
    except ImportError:
        prm = None
    torch.manual_seed(0)
    if prm is not None:
        e2e = prm.dist_pldr_model_e2e(0, 1, _StandInTokenizer(ids_row0), hpdict=hp, device="cpu", is_train=False)
        return e2e.pldr_model, e2e
    model = pm.PLDR_Model(num_layers=hp["num_layers"], d_model=hp["d_model"], num_heads=hp["num_heads"],
                          dff=hp["dff"], input_vocab_size=hp["input_vocab_size"], A_dff=hp["A_dff"],
                          num_reslayerA=hp["num_reslayerA"], num_denseA=hp["num_denseA"],
                          max_seq_len=hp["max_seq_len"], activation=F.silu, device=torch.device("cpu"))
    return model, None


def _masks(e2e):
    """Their `create_masks` (padding mask max look-ahead mask, [B, 1, L, L], 1 = masked) when their run
    module is loaded, else the same maths."""
    import torch

    if e2e is not None:
        return e2e.create_masks

    def create_masks(seq):
        look = 1 - torch.tril(torch.ones((seq.size(1), seq.size(1))))
        return torch.maximum(torch.eq(seq, 0).to(torch.float32)[:, None, None, :], look)
    return create_masks


def _mirror_generate(model, e2e, prompts, new_tokens: int, kv: bool, g: bool):
    """Batched greedy generation mirroring their generate_text step for step.  -> [B, new_tokens] ids."""
    import torch

    create_masks = _masks(e2e)
    def top_k1(logits):
        if e2e is not None:
            return e2e.top_k_logits(logits, 1)
        vals, _ = torch.topk(logits, k=1, sorted=True)
        return torch.where(logits < vals[:, -1, None], torch.ones_like(logits) * -1e10, logits)

    with torch.no_grad():
        seq_in = torch.tensor(prompts)
        kvc, gc, cached, out = None, None, False, []
        for _ in range(new_tokens):
            mask = None if cached else create_masks(seq_in)
            model.eval()
            pred, _, att, kv_next = model([seq_in, mask], kvcachelst=kvc, Gcachelst=gc)
            if kv:
                kvc, cached = kv_next, True
            if g:
                gc = [[t[0], t[4]] for t in att]
            pred = top_k1(pred[:, -1, :])
            nxt = torch.distributions.categorical.Categorical(logits=pred).sample()[:, None]   # [B, 1]
            seq_in = nxt if cached else torch.concat([seq_in, nxt], axis=-1)
            out.append(nxt)
        return torch.concat(out, axis=-1)


def reference_check(src: str) -> dict:
    """Can this Python import torch and the authors' model (and their run module)?  Never raises."""
    try:
        import numpy  # noqa: F401
        import torch
    except ImportError as e:
        return {"ok": False, "error": f"cannot import torch/numpy ({e}); install the CPU torch wheel and numpy"}
    for p in (os.path.join(src, "pldr_model_v510"), src):
        sys.path.insert(0, p)
    try:
        import pldr_model_v510  # noqa: F401
    except Exception as e:                                     # noqa: BLE001 - reported as one line
        return {"ok": False, "error": f"cannot import the authors' model from {src} ({type(e).__name__}: {e})"}
    try:
        import pldr_run_model_v510  # noqa: F401
        gen = True
    except Exception:                                          # noqa: BLE001 - fall back to the mirror loop
        gen = False
    return {"ok": True, "torch": torch.__version__, "generate_text": gen}


def reference_one(src: str, hp: dict, batch: int, mode: str, prompt_len: int, new_tokens: int, reps: int,
                  threads: int, max_tries: int, max_others: float, budget_s: float) -> dict:
    """Time their model on one (batch, mode): float32, `threads` torch threads."""
    import torch

    from bench_decode import timed

    _torch_threads(threads)
    prompts = make_prompts(batch, prompt_len, hp["input_vocab_size"])
    model, e2e = _reference_model(src, hp, prompts[0])
    n_params = sum(p.numel() for p in model.parameters())
    kv, g = MODES[mode]
    use_gen = e2e is not None and batch == 1

    if use_gen:
        def call():
            ids = e2e.generate_text("prompt", temperature=1.0, top_k=1, top_p=1.0, enable_kvcache=kv,
                                    enable_Gcache=g, max_length=new_tokens)[0]
            return [ids[prompt_len:]]
    else:
        def call():
            return _mirror_generate(model, e2e, prompts, new_tokens, kv, g).tolist()

    t0 = time.perf_counter()
    first = call()                                                       # warm-up
    warm_s = time.perf_counter() - t0
    check = None
    if use_gen:                                                          # the mirror loop gives the same ids
        check = _mirror_generate(model, e2e, prompts, new_tokens, kv, g).tolist() == first
    clean, all_t, shares, out = timed(call, reps, max_tries, max_others, budget_s)
    if out != first:
        raise AssertionError("greedy generation of the authors' model changed between runs")
    rows = [len(r) for r in out]
    use = clean if clean else all_t
    total = statistics.median(use)
    return {"batch": batch, "mode": mode, "dtype": "float32", "side": "reference",
            "loop": "generate_text" if use_gen else "mirror", "mirror_matches_generate_text": check,
            "tokens_per_s": batch * new_tokens / total, "total_s": total, "warmup_s": warm_s,
            "clean_runs": len(clean), "all_totals_s": all_t, "others_cpu_share": shares,
            "tokens_per_row": rows, "num_parameters": n_params, "first_ids": out[0][:8],
            "prompt_first_ids": prompts[0][:4], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _requests(vocab_size: int, max_seq_len: int, n: int):
    """bench_eval's scoring requests (context 16..96, continuation 1..8 random ids, seed 0)."""
    from types import SimpleNamespace

    from bench_eval import make_requests
    return make_requests(SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len), n)


def reference_scoring(src: str, hp: dict, n: int, reps: int, threads: int, max_tries: int, max_others: float,
                      budget_s: float) -> dict:
    """Their model scoring `n` (context, continuation) requests one at a time, as an lm-eval wrapper over
    their model would: per request one forward of context + continuation[:-1] with their mask, then the
    continuation's summed log-softmax and is-greedy.  Requests/s, median of the timed passes."""
    import torch

    from bench_decode import timed

    _torch_threads(threads)
    reqs = _requests(hp["input_vocab_size"], hp["max_seq_len"], n)
    model, e2e = _reference_model(src, hp, reqs[0][0])
    model.eval()

    mask_of = _masks(e2e)
    def score_all():
        out = []
        with torch.no_grad():
            for ctx, cont in reqs:
                full = list(ctx) + list(cont)
                inp = torch.tensor([full[:-1]])
                logits = model([inp, mask_of(inp)])[0][0, -len(cont):]             # [len(cont), V]
                lp = torch.log_softmax(logits, dim=-1)
                tgt = torch.tensor(cont)
                out.append((float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())))
        return out

    t0 = time.perf_counter()
    first = score_all()
    warm_s = time.perf_counter() - t0
    clean, all_t, shares, out = timed(score_all, reps, max_tries, max_others, budget_s)
    total = statistics.median(clean if clean else all_t)
    return {"side": "reference", "requests": n, "requests_per_s": n / total, "total_s": total, "warmup_s": warm_s,
            "clean_runs": len(clean), "all_totals_s": all_t, "others_cpu_share": shares,
            "scores_finite": all(abs(s) < float("inf") for s, _ in out), "same_scores_each_run": out == first,
            "num_parameters": sum(p.numel() for p in model.parameters())}


def ours_scoring(preset: str, n: int, batch_size: int, reps: int, max_tries: int, max_others: float,
                 budget_s: float) -> dict:
    """Our batched `loglikelihood_tokens` (mode full, length-bucketed batches of `batch_size`) over the
    same requests; compilation excluded (one warm-up pass), requests/s, median of the timed passes."""
    import math

    import jax

    import pldr_jax
    from bench_decode import timed
    from pldr_jax.eval.multiple_choice import loglikelihood_tokens

    cfg = pldr_jax.PLDRConfig.preset(preset)
    params = jax.jit(pldr_jax.init_params, static_argnums=0)(cfg, jax.random.key(0))
    reqs = _requests(cfg.vocab_size, cfg.max_seq_len, n)
    call = lambda: loglikelihood_tokens(cfg, params, reqs, mode="full", batch_size=batch_size)
    t0 = time.perf_counter()
    call()
    warm_s = time.perf_counter() - t0
    clean, all_t, shares, out = timed(call, reps, max_tries, max_others, budget_s)
    total = statistics.median(clean if clean else all_t)
    return {"side": "ours", "requests": n, "batch_size": batch_size, "requests_per_s": n / total, "total_s": total,
            "warmup_s": warm_s, "clean_runs": len(clean), "all_totals_s": all_t, "others_cpu_share": shares,
            "scores_finite": all(math.isfinite(s) for s, _ in out)}


# --------------------------------------------------------------------------- driver
def _run_json(cmd: list[str], what: str) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise ReferenceError_(f"{what} failed (exit {p.returncode}); its stderr is above")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def parse_configs(text: str) -> list[tuple[int, str]]:
    """'1:float32,8:float32,8:bfloat16' -> [(1, 'float32'), ...]; ValueError naming a bad entry."""
    out = []
    for item in text.split(","):
        b, _, d = item.strip().partition(":")
        if not b.isdigit() or int(b) < 1 or d not in ("float32", "bfloat16"):
            raise ValueError(f"bad --configs entry {item!r}: want BATCH:float32 or BATCH:bfloat16")
        out.append((int(b), d))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-src", default=None, help="the authors' `src` directory (holds pldr_model_v510/)")
    ap.add_argument("--reference-python", default=sys.executable,
                    help="Python with torch (CPU), numpy, torchtune[, keras] for the authors' side")
    ap.add_argument("--reference-threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(f"{b}:{d}" for b, d in DEFAULT_CONFIGS),
                    help="comma list of BATCH:DTYPE of ours (theirs always float32)")
    ap.add_argument("--modes", default="kv_g,kv")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per process (configuration, side and round)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="decode: alternations of theirs / ours per configuration, a fresh process each, ABBA "
                         "order; x_reference = the median of the rounds' ratios")
    ap.add_argument("--preset", default="v51-110m")
    ap.add_argument("--max-tries", type=int, default=8)
    ap.add_argument("--max-others", type=float, default=0.15)
    ap.add_argument("--budget", type=float, default=90.0, help="seconds of timed runs per configuration at most")
    ap.add_argument("--bf16-min-batch", type=int, default=None,
                    help="ours: a bfloat16 model decodes in float32 below this batch (default: the platform's)")
    ap.add_argument("--what", default="decode", help="comma list of decode,scoring")
    ap.add_argument("--requests", type=int, default=64, help="scoring: (context, continuation) requests")
    ap.add_argument("--score-batch-size", type=int, default=32, help="scoring: our batch size")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--ref-score", action="store_true", help=argparse.SUPPRESS)     # internal, reference side
    ap.add_argument("--ours-score", action="store_true", help=argparse.SUPPRESS)    # internal, our side
    ap.add_argument("--ref-check", default=None, help=argparse.SUPPRESS)     # internal, reference side
    ap.add_argument("--ref-one", default=None, help=argparse.SUPPRESS)       # internal: "batch,mode"
    ap.add_argument("--ref-hparams", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.ref_check is not None:
        print(json.dumps(reference_check(args.ref_check)))
        return 0
    if args.ref_score:
        print(json.dumps(reference_scoring(args.reference_src, json.loads(args.ref_hparams), args.requests, args.reps,
                                           args.reference_threads, args.max_tries, args.max_others, args.budget)))
        return 0
    if args.ours_score:
        print(json.dumps(ours_scoring(args.preset, args.requests, args.score_batch_size, args.reps, args.max_tries,
                                      args.max_others, args.budget)))
        return 0
    if args.ref_one:
        b, m = args.ref_one.split(",")
        print(json.dumps(reference_one(args.reference_src, json.loads(args.ref_hparams), int(b), m, args.prompt_len,
                                       args.new_tokens, args.reps, args.reference_threads, args.max_tries,
                                       args.max_others, args.budget)))
        return 0

    try:
        return _drive(args)
    except (ReferenceError_, ValueError) as e:
        print(f"bench_reference.py: error: {e}", file=sys.stderr)
        return 2


def _drive(args) -> int:
    what = args.what.split(",")
    for w in what:
        if w not in ("decode", "scoring"):
            raise ValueError(f"unknown --what {w!r}; choose from decode, scoring")
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {tuple(MODES)}")
    configs = parse_configs(args.configs)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    src = resolve_reference_src(args.reference_src)
    if not (os.path.isfile(args.reference_python) and os.access(args.reference_python, os.X_OK)):
        raise ReferenceError_(f"--reference-python {args.reference_python!r} is not an executable file")
    me = os.path.abspath(__file__)
    chk = _run_json([args.reference_python, me, "--ref-check", src], "the reference-side import check")
    if not chk["ok"]:
        raise ReferenceError_(f"--reference-python {args.reference_python}: {chk['error']}")

    import pldr_jax
    from pldr_jax.params import count_params
    cfg = pldr_jax.PLDRConfig.preset(args.preset)
    hp = reference_hparams(cfg.to_dict())
    ours_n = count_params(cfg)

    def check_params(r):
        if r["num_parameters"] != ours_n:
            raise ReferenceError_(f"the authors' model has {r['num_parameters']:,} parameters, ours {ours_n:,}: "
                                  f"the configs differ")

    common = ["--reps", str(args.reps), "--max-tries", str(args.max_tries), "--max-others", str(args.max_others),
              "--budget", str(args.budget)]
    gen = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    ref_side = [args.reference_python, me, "--reference-src", src, "--ref-hparams", json.dumps(hp),
                "--reference-threads", str(args.reference_threads), *common]
    load0, t_start = _loadavg(), time.time()
    refs, ours, scoring = [], [], None

    def run_reference(batch, m, rnd):
        r = _run_json([*ref_side, "--ref-one", f"{batch},{m}", *gen], f"the authors' model at batch {batch} {m}")
        check_params(r)
        if r["tokens_per_row"] != [args.new_tokens] * batch:
            raise ReferenceError_(f"the authors' model generated {r['tokens_per_row']} tokens per row, "
                                  f"not {args.new_tokens}")
        if r["mirror_matches_generate_text"] is False:
            raise ReferenceError_("the mirror loop's ids differ from the authors' generate_text at batch 1")
        r["round"] = rnd
        refs.append(r)
        if not args.json:
            print(f"authors' batch {batch:2d} {m:4s} float32  {r['tokens_per_s']:7.1f} tok/s  ({r['loop']}, "
                  f"{r['clean_runs']} clean runs, {r['num_parameters']:,} parameters)", flush=True)

    def run_ours(batch, m, d, rnd):
        o = _run_json([sys.executable, os.path.join(HERE, "bench_decode.py"), "--one", f"{batch},{m},{d}",
                       "--preset", args.preset, *(["--bf16-min-batch", str(args.bf16_min_batch)]
                                                  if args.bf16_min_batch is not None else []), *gen, *common],
                      f"ours at batch {batch} {m} {d}")
        o["side"], o["round"] = "ours", rnd
        ours.append(o)

    if "decode" in what:
        for rnd in range(args.rounds):          # rounds outermost: a configuration's rounds spread over the run
            for batch in sorted({b for b, _ in configs}):
                for m in modes:                 # theirs and ours in each dtype of this batch, ABBA across rounds
                    for side in side_order(rnd):
                        if side == "reference":
                            run_reference(batch, m, rnd)
                        else:
                            for d in [d for b2, d in configs if b2 == batch]:
                                run_ours(batch, m, d, rnd)
                    if not args.json:
                        for row in compare_rows([o for o in ours if o["round"] == rnd and o["batch"] == batch
                                                 and o["mode"] == m], refs):
                            print(format_round(row["rounds"][-1], batch, m, row["dtype"], args.rounds), flush=True)
    if "scoring" in what:
        sc = ["--requests", str(args.requests)]
        r = _run_json([*ref_side, "--ref-score", *sc], "the authors' model scoring")
        check_params(r)
        o = _run_json([sys.executable, me, "--ours-score", "--preset", args.preset, "--score-batch-size",
                       str(args.score_batch_size), *sc, *common], "our scoring")
        scoring = {"reference": r, "ours": o, "x_reference": o["requests_per_s"] / r["requests_per_s"],
                   "clean": bool(r["clean_runs"] and o["clean_runs"])}
    rows = compare_rows(ours, refs)
    meta = {"preset": args.preset, "num_parameters": ours_n, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "reps": args.reps, "rounds": args.rounds,
            "round_order": "ABBA (theirs first in even rounds, ours first in odd ones); x_reference = median "
                           "of the clean rounds' ratios", "reference_threads": args.reference_threads,
            "reference_torch": chk.get("torch"), "reference_generate_text": chk.get("generate_text"),
            "loadavg_start": load0, "loadavg_end": _loadavg(), "wall_s": time.time() - t_start,
            "nproc": os.cpu_count()}
    if args.json:
        print(json.dumps({"rows": rows, "reference": refs, "ours": ours, "scoring": scoring, **meta}))
        return 0
    if rows:
        print(f"\nsame run, ours / authors' ({args.rounds} rounds per configuration):")
        for r in rows:
            print(format_row(r))
    if scoring:
        print(f"scoring {args.requests} requests: authors' one at a time {scoring['reference']['requests_per_s']:.1f} "
              f"req/s, ours batched (batch {args.score_batch_size}) {scoring['ours']['requests_per_s']:.1f} req/s "
              f"= {scoring['x_reference']:.2f}x" + ("" if scoring["clean"] else "  [CONTENDED: ratio not valid]"))
    print(f"load average start {load0}, end {meta['loadavg_end']}; {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
