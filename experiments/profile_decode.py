"""Where a decode step's time goes: one profiled decode loop, per-op time grouped by kind.

Runs one configuration (random-init weights, greedy, prompt -> new tokens, as `bench_decode.py`),
profiles one whole decode loop (`decode.loop.run_loop`, after a warm-up) with `jax.profiler`, reads
the trace back (`jax.profiler.ProfileData`) and sums each executed XLA:CPU operation's time per
decode step, grouped by what the operation computes (from the compiled HLO):

* ``weight matmul``: a dot without batch dimensions (the model's weight products, with whatever
  XLA fused into them: bias, GLU activation, residual, layer norm), or the native packed matmul's
  custom call (a float32 decode on CPU, `pldr_jax.kernels.packed_matmul`);
* ``attention dot``: a batched dot (q G_LM, q K^T, p V over the B x H heads);
* ``softmax``: an exponential, reduction or division over the attention's [B * H, 1, S] logits;
* ``cache write``: a scatter (the one-token KV-cache writes);
* ``native attention``: the native XLA:CPU kernel's custom call (`pldr_jax.kernels`: the cache
  write and the attention in one);
* ``other``: everything else (norms, RoPE, embedding gather, sampling, loop book-keeping).

Times are thread time (an operation split over the two cores counts on both), so the groups add
up to more than the wall time on a multi-core machine; compare groups within one run.  The trace
is not reliable for small operations: XLA:CPU's thread-pool hand-offs land in them (a YNNPACK
reduction of [32, 1, 896] showed 1-2.7 ms per step in the trace and runs in 0.01 ms alone), so a
suspect is confirmed by removing it (`bench_decode.py --ablate-attention` does that for the decode
attention).

    python experiments/profile_decode.py --batch 32 --mode kv_g --dtype float32
    python experiments/profile_decode.py --batch 8 --mode kv --dtype bfloat16 --top 20 --json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
import time

CATEGORIES = ("weight matmul", "attention dot", "softmax", "cache write", "native attention", "other")
_WRAPPERS = ("Thunk", "Slinky", "Threadpool", "ThreadPool", "while", "PjRt", "Pjrt", "call")


def _computations(hlo: str) -> tuple[dict[str, str], dict[str, str]]:
    """(instruction name -> its line, computation name -> its body) of a compiled HLO module text."""
    lines, comps, cur = {}, {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if m and line.rstrip().endswith("{"):
            cur = m.group(1)
            comps[cur] = []
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            lines.setdefault(m.group(1), line)
        if cur is not None:
            comps[cur].append(line)
    return lines, {k: "\n".join(v) for k, v in comps.items()}


def categorize(line: str, comps: dict[str, str], attn_rows: int) -> str:
    """The `CATEGORIES` entry of one compiled HLO instruction (its line; fusions by their body);
    attn_rows = batch x heads (the attention's [attn_rows, 1, S] logits)."""
    if 'custom_call_target="pldr_packed_matmul"' in line:
        return "weight matmul"          # the native packed matmul (`backend.decode_matmul`)
    if 'custom_call_target="pldr_' in line:
        return "native attention"
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = comps.get(called.group(1), line) if called else line
    dots = [ln for ln in body.splitlines() if " dot(" in ln]
    if dots:
        return "attention dot" if any("lhs_batch_dims" in ln for ln in dots) else "weight matmul"
    if "scatter(" in body:
        return "cache write"
    if f"[{attn_rows},1," in body and ("exponential(" in body or " reduce(" in body or "divide(" in body):
        return "softmax"
    return "other"


def profile_loop(batch: int, mode: str, dtype: str, preset: str, prompt_len: int, new_tokens: int,
                 hlo_out: str | None = None) -> dict:
    import jax
    import numpy as np
    from jax.profiler import ProfileData

    import pldr_jax
    from pldr_jax.decode import MODES, Sampler, prepare_params
    from pldr_jax.decode import loop as decode_loop

    cfg = pldr_jax.PLDRConfig.preset(preset, dtype=dtype, param_dtype=dtype)
    params = jax.jit(pldr_jax.init_params, static_argnums=0)(cfg, jax.random.key(0))
    _, run_params = prepare_params(cfg, params, batch)
    sampler = Sampler(cfg, run_params)
    kv, g = MODES[mode]
    prompts = np.random.default_rng(1).integers(4, cfg.vocab_size, (batch, prompt_len)).tolist()
    req = sampler._request(prompts, max_new_tokens=new_tokens, kv_cache=kv, g_cache=g, top_k=1, eos_id=None)

    def run():
        cache, logits0, _ = sampler._prefill(req)
        jax.block_until_ready(logits0)
        t0 = time.perf_counter()
        st = decode_loop.run_loop(req.spec, req.params, cache, logits0, None, req.key, req.inputs, n_out=req.n_out)
        jax.block_until_ready(st.out)
        return st, time.perf_counter() - t0

    run()                                                        # compile + warm up
    cache, logits0, _ = sampler._prefill(req)
    hlo = decode_loop._loop_jit.lower(req.spec, req.params, cache, logits0, None, req.key, req.inputs,
                                      n_out=req.n_out).compile().as_text()
    if hlo_out:
        with open(hlo_out, "w") as f:
            f.write(hlo)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        st, wall = run()
        jax.profiler.stop_trace()
        data = ProfileData.from_file(sorted(glob.glob(d + "/**/*.xplane.pb", recursive=True))[-1])
    steps = max(int(st.t) - 1, 1)
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if not ev.name.startswith(_WRAPPERS):
                    per_op[ev.name] += ev.duration_ns
    lines, comps = _computations(hlo)
    by_cat = collections.Counter({c: 0 for c in CATEGORIES})
    ops = []
    for name, ns in per_op.items():
        if name not in lines:
            continue
        cat = categorize(lines[name], comps, batch * cfg.num_heads)
        ms = ns / 1e6 / steps
        by_cat[cat] += ms
        shape = lines[name].split(" = ", 1)[1].split(" ", 1)[0]
        ops.append({"op": name, "category": cat, "shape": shape, "ms_per_step": ms})
    ops.sort(key=lambda o: -o["ms_per_step"])
    return {"batch": batch, "mode": mode, "dtype": dtype, "preset": preset, "steps": steps,
            "wall_ms_per_step": 1e3 * wall / steps, "thread_ms_per_step": dict(by_cat),
            "thread_ms_total": sum(by_cat.values()), "ops": ops}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mode", default="kv_g", choices=("kv_g", "kv"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--preset", default="v51-110m")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=12, help="list the most expensive operations")
    ap.add_argument("--hlo-out", help="write the compiled decode loop's HLO text to this file")
    ap.add_argument("--quick", action="store_true", help="the tiny preset, batch 2, 8 -> 8 tokens")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.prompt_len, args.new_tokens = "tiny", 2, 8, 8
    res = profile_loop(args.batch, args.mode, args.dtype, args.preset, args.prompt_len, args.new_tokens,
                       hlo_out=args.hlo_out)
    res["ops"] = res["ops"][:args.top]
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{args.preset} batch {args.batch} {args.mode} {args.dtype}: wall {res['wall_ms_per_step']:.2f} ms/step "
          f"(profiled), thread time {res['thread_ms_total']:.2f} ms/step")
    for cat in CATEGORIES:
        ms = res["thread_ms_per_step"][cat]
        print(f"  {cat:14s} {ms:8.3f} ms/step  {100 * ms / max(res['thread_ms_total'], 1e-9):5.1f} %")
    for o in res["ops"]:
        print(f"    {o['ms_per_step']:8.3f}  {o['category']:14s} {o['op']} {o['shape']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
