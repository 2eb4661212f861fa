"""A check to run on a real accelerator (GPU or TPU): golden numerics, training against the CPU, speed.

    python experiments/accelerator_check.py --out experiments/results/accelerator_check_<device>.json

One JSON object (also printed) with

* ``golden_forward``: the authors' tiny v51 model (../shared/reference, else tests/data) forward on
  the default device against their PyTorch logits (float32 matmuls at "highest" precision);
* ``golden_decode``: greedy generation in the four cache modes (KV-cache on/off x G-cache on/off)
  against the authors' token ids and per-step logits;
* ``train``: `--train-steps` (20) training steps of a small model on the default device with the
  platform's backend choices (`pldr_jax.backend`: scanned layers, full remat, fused attention
  "cudnn" / "splash", ...) against the same steps on the host CPU with the CPU choices: the losses,
  the first step's relative difference (tolerance 1e-5 on CPU, 1e-2 on accelerators, whose float32
  matmuls default to reduced precision) and the largest over the steps (1e-3 / 2e-2: AdamW's
  normalised updates carry rounding differences forward and they grow with the steps);
* ``speed``: tokens/s and MFU (model FLOPs, `pldr_jax.aot.model_flops`, over the chip's peak bf16
  FLOP/s, `pldr_jax.targets.CHIPS`) of the training step and of greedy decoding for `--bench-preset`
  (v51-110m bf16 on accelerators, tiny on CPU), timed after a warm-up call.

On a CPU (CI) the default device is the CPU: the training run then uses an accelerator's choices
(`--emulate tpu|gpu`: scan, full remat, head chunks, and the fused attention in its CPU form,
"splash_interpret" / "xla_sdpa") against the CPU choices; decoding uses the CPU's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pldr_jax  # noqa: E402
from pldr_jax.aot import model_flops  # noqa: E402
from pldr_jax.backend import choices  # noqa: E402
from pldr_jax.targets import chip_of_device  # noqa: E402

MODES = {"kv_g": ("kvT_gT", True, True), "kv": ("kvT_gF", True, False), "g": ("kvF_gT", False, True),
         "none": ("kvF_gF", False, False)}
CPU_FORM = {"cudnn": "xla_sdpa", "splash": "splash_interpret"}     # a fused attention's CPU stand-in


def reference_dir() -> Path:
    env = os.environ.get("PLDR_JAX_REFERENCE")
    if env:
        return Path(env)
    shared = ROOT.parent / "shared" / "reference"
    return shared if shared.is_dir() else ROOT / "tests" / "data"


def load_reference(ref: Path, name: str = "tiny_v510"):
    from pldr_jax.io.state_dict import state_dict_to_params
    hp = json.loads((ref / f"{name}.json").read_text())
    cfg = pldr_jax.PLDRConfig.from_reference_hparams(hp.get("hyperparameters", hp))
    return cfg, state_dict_to_params(cfg, dict(np.load(ref / f"{name}_params.npz")))


def golden_forward(ref: Path) -> dict:
    cfg, params = load_reference(ref)
    g = np.load(ref / "tiny_v510_outputs.npz")
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(pldr_jax.forward(cfg, params, jnp.asarray(g["input_ids"])).logits)
    err = float(np.abs(logits - g["logits"]).max())
    return {"max_abs_logit_err": err, "tolerance": 5e-5, "ok": err <= 5e-5}


def golden_decode(ref: Path) -> dict:
    cfg, params = load_reference(ref)
    g = np.load(ref / "tiny_v510_generate.npz")
    out = {}
    with jax.default_matmul_precision("highest"):
        for mode, (tag, kv, gc) in MODES.items():
            r = pldr_jax.generate(cfg, params, [g["prompt_ids"].tolist()], max_new_tokens=20, kv_cache=kv,
                                  g_cache=gc, top_k=1, eos_id=None, return_logits=True)
            err = float(np.abs(np.asarray(r.logits[0]) - g[f"{tag}_step_logits"]).max())
            same = r.tokens[0] == g[f"{tag}_ids"].tolist()
            out[mode] = {"ids_equal": same, "max_abs_logit_err": err, "tolerance": 2e-4, "ok": same and err <= 2e-4}
    return out


def _accelerator_options(platform: str, emulate: str, attention_impl: str | None):
    """StepOptions of the platform's choices (on CPU: `emulate`'s, the fused attention in its CPU form)."""
    from pldr_jax.train.step import StepOptions
    if platform != "cpu":
        return StepOptions(attention_impl=attention_impl).resolved(platform)
    b = choices(emulate)
    return StepOptions(remat=b.remat, unroll_layers=b.unroll_layers, kernels=b.kernels,
                       head_chunk_bytes=b.head_chunk_bytes, attention_block=b.attention_block,
                       attention_impl=attention_impl or CPU_FORM.get(b.attention_impl, b.attention_impl))


def _train_losses(cfg, opts, steps: int, batch: int, seq: int, device) -> list[float]:
    from pldr_jax.train.config import TrainConfig
    from pldr_jax.train.state import create_train_state
    from pldr_jax.train.step import make_train_step
    rng = np.random.default_rng(0)
    tok = rng.integers(1, cfg.vocab_size, size=(steps, batch, seq + 1)).astype(np.int32)
    tok[:, 0, seq // 2:] = 0                                  # a right-padded row in every batch
    tx, schedule = TrainConfig(learning_rate=1e-3, warmup_steps=2).optimizer()
    with jax.default_device(device):
        state = create_train_state(cfg, tx, 0)
        step = make_train_step(cfg, tx, schedule, opts=opts)
        losses = []
        for t in tok:
            state, m = step(state, {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:])})
            losses.append(float(m["loss"]))
    return losses


def train_check(platform: str, emulate: str, attention_impl: str | None, steps: int) -> dict:
    from pldr_jax.train.step import StepOptions
    cfg = pldr_jax.PLDRConfig.preset("tiny", max_seq_len=128)
    opts = _accelerator_options(platform, emulate, attention_impl)
    acc = _train_losses(cfg, opts, steps, 8, 128, jax.devices()[0])
    cpu = _train_losses(cfg, StepOptions().resolved("cpu"), steps, 8, 128, jax.devices("cpu")[0])
    rels = [abs(a - c) / abs(c) for a, c in zip(acc, cpu)]
    tol0, tol = (1e-5, 1e-3) if platform == "cpu" else (1e-2, 2e-2)
    ok = bool(np.isfinite(acc).all()) and rels[0] <= tol0 and max(rels) <= tol
    return {"options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "dag_coeffs"}, "losses": acc,
            "cpu_losses": cpu, "first_rel_diff": rels[0], "max_rel_diff": max(rels), "tolerance_first": tol0,
            "tolerance": tol, "ok": ok}


def _timed(fn, repeats: int) -> float:
    fn()                                                     # compile + warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def speed(preset: str, dtype: str | None, batch: int, seq: int, attention_impl: str | None, repeats: int) -> dict:
    from pldr_jax.decode import Sampler
    from pldr_jax.train.config import TrainConfig
    from pldr_jax.train.state import create_train_state
    from pldr_jax.train.step import StepOptions, make_train_step
    dev = jax.devices()[0]
    chip = chip_of_device(dev)
    over = {"dtype": dtype} if dtype else {}
    cfg = pldr_jax.PLDRConfig.preset(preset, **over)
    seq = min(seq, cfg.max_seq_len)
    tx, schedule = TrainConfig().optimizer()
    step = make_train_step(cfg, tx, schedule, opts=StepOptions(attention_impl=attention_impl), donate=False)
    state = create_train_state(cfg, tx, 0)
    tok = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, (batch, seq)), jnp.int32)
    train_s = _timed(lambda: jax.block_until_ready(step(state, {"inputs": tok, "targets": tok})), repeats)
    P = seq // 2
    sampler = Sampler(cfg, state.params)
    prompts = np.asarray(tok[:, :P]).tolist()
    decode_s = _timed(lambda: sampler(prompts, max_new_tokens=seq - P, top_k=1, eos_id=None), repeats)
    mfu = lambda flops, s: flops / (s * chip.peak_bf16_flops) if chip else None
    return {"preset": preset, "dtype": cfg.dtype, "batch": batch, "seq_len": seq, "chip": chip.name if chip else None,
            "train_step_s": train_s, "train_tokens_per_s": batch * seq / train_s,
            "train_mfu": mfu(model_flops(cfg, batch, seq, "train"), train_s),
            "decode_s": decode_s, "decode_tokens_per_s": batch * (seq - P) / decode_s,
            "decode_mfu": mfu(model_flops(cfg, batch, seq, "decode"), decode_s)}


def run(args) -> dict:
    dev = jax.devices()[0]
    platform = dev.platform
    ref = reference_dir()
    accel = platform != "cpu"
    rep = {"platform": platform, "device_kind": dev.device_kind, "devices": jax.device_count(), "jax": jax.__version__,
           "reference": str(ref), "backend_choices": dataclasses.asdict(choices(platform))}
    rep["golden_forward"] = golden_forward(ref)
    rep["golden_decode"] = golden_decode(ref)
    rep["train"] = train_check(platform, args.emulate, args.attention_impl, args.train_steps)
    rep["speed"] = speed(args.bench_preset or ("v51-110m" if accel else "tiny"),
                         args.bench_dtype or ("bfloat16" if accel else None), args.bench_batch,
                         args.bench_seq_len, args.attention_impl, args.repeats)
    rep["ok"] = (rep["golden_forward"]["ok"] and all(m["ok"] for m in rep["golden_decode"].values())
                 and rep["train"]["ok"])
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--emulate", choices=("tpu", "gpu"), default="tpu",
                   help="on a CPU: whose backend choices the training run uses")
    p.add_argument("--attention-impl", default=None, help="override the attention (blocks, cudnn, splash, ...)")
    p.add_argument("--bench-preset", default=None, help="speed model (default v51-110m on accelerators, tiny on CPU)")
    p.add_argument("--bench-dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--bench-batch", type=int, default=8)
    p.add_argument("--bench-seq-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rep = run(args)
    text = json.dumps(rep)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
