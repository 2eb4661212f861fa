"""The one-token decode attention over a KV-cache on this host, in several forms, one process.

A decode step's attention (issue 13: what is left of the batch-32 step above its matmul floor) is,
per layer, three products per (row, head) pair -- q @ G_LM [1, dk] x [dk, dk], (q G) @ K^T over the
S cache slots, p @ V -- and a softmax.  This script times `--layers` such attentions chained in a
`fori_loop` (the next layer's query is this layer's output, as in the step), in every form below,
in one process, and prints ms per step and the ratio to the form the CPU step uses ("dots", the
batched `dot_general` over one merged [B * H] axis of `ops.attention.plga_attention`):

* ``dots``        batched dots over [B * H], K and V as the cache stores them ([B, H, S, dk]);
* ``dots_kt``     batched dots with K stored transposed ([B, H, dk, S]);
* ``reduce_kt``   multiply + reduce (no dot), K stored transposed, V as is;
* ``reduce``      multiply + reduce over K and V as stored (minor-axis reduction for q K^T);
* ``split2``      ``dots`` over two halves of the rows, two independent products per layer;
* ``plga``        `ops.attention.plga_attention` itself (heads-first, the step's call);
* ``plga_chunks`` the same over the live slots only, `--chunk` at a time (`backend.decode_kv_chunk`;
  live = `--live` slots of the S-slot buffer);
* ``native``      the native C++ kernel the CPU decode step uses (`pldr_jax.kernels.decode_attention_update`,
  `backend.decode_attention`; when it builds on this host): reads only the live slots, both cores.

and ``dots`` again under XLA:CPU compile options (``--options``: YNNPACK / XNNPACK / oneDNN
fusion types, single-threaded Eigen).  Every form is checked against ``dots`` (max |diff|).  The
matrix-vector floor of the bytes is printed beside: K, V and G read once at the measured
bandwidth of a plain reduction over the same bytes.

    python experiments/bench_decode_attention.py                    # batch 32, 128 slots
    python experiments/bench_decode_attention.py --batch 8 --slots 1024 --live 600
    python experiments/bench_decode_attention.py --kv-dtype bfloat16 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

OPTIONS = {
    "ynn_dot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "ynn_individual_dot": {"xla_cpu_experimental_ynn_fusion_type":
                           "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                           "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"},
    "xnn_individual_dot": {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "onednn": {"xla_cpu_use_onednn": True},
    "eigen_one_thread": {"xla_cpu_multi_thread_eigen": False},
}


def _forms(B, H, S, dk, kv_dtype, live, chunk):
    import jax
    import jax.numpy as jnp
    from jax import lax

    from pldr_jax.ops.attention import plga_attention

    f32 = jnp.float32
    NEG = -0.7 * float(jnp.finfo(f32).max)
    BH = B * H
    slot = jnp.arange(S)

    def bdot(a, b, dims):
        return lax.dot_general(a, b, dims, preferred_element_type=f32)

    def softmax(lg):                                    # [B, H, S]
        return jax.nn.softmax(jnp.where(slot < live, lg, NEG), -1)

    def dots(x, k, kt, v, g):
        qg = bdot(x.reshape(BH, 1, dk), g.reshape(BH, dk, dk), (((2,), (1,)), ((0,), (0,))))
        lg = bdot(qg.astype(k.dtype), k.reshape(BH, S, dk), (((2,), (2,)), ((0,), (0,)))).reshape(B, H, S)
        p = softmax(lg / math.sqrt(dk)).reshape(BH, 1, S).astype(v.dtype)
        return bdot(p, v.reshape(BH, S, dk), (((2,), (1,)), ((0,), (0,)))).reshape(B, H, dk)

    def dots_kt(x, k, kt, v, g):
        qg = bdot(x.reshape(BH, 1, dk), g.reshape(BH, dk, dk), (((2,), (1,)), ((0,), (0,))))
        lg = bdot(qg.astype(kt.dtype), kt.reshape(BH, dk, S), (((2,), (1,)), ((0,), (0,)))).reshape(B, H, S)
        p = softmax(lg / math.sqrt(dk)).reshape(BH, 1, S).astype(v.dtype)
        return bdot(p, v.reshape(BH, S, dk), (((2,), (1,)), ((0,), (0,)))).reshape(B, H, dk)

    def reduce_kt(x, k, kt, v, g):
        qg = jnp.sum(x[..., :, None] * g, axis=-2)                              # [B, H, dk]
        lg = jnp.sum(qg[..., :, None] * kt.astype(f32), axis=-2)                # [B, H, S]
        p = softmax(lg / math.sqrt(dk))
        return jnp.sum(p[..., :, None] * v.astype(f32), axis=-2)

    def reduce(x, k, kt, v, g):
        qg = jnp.sum(x[..., :, None] * g, axis=-2)
        lg = jnp.sum(qg[..., None, :] * k.astype(f32), axis=-1)
        p = softmax(lg / math.sqrt(dk))
        return jnp.sum(p[..., :, None] * v.astype(f32), axis=-2)

    def split2(x, k, kt, v, g):
        h = B // 2
        halves = []
        for sl in (slice(0, h), slice(h, B)):
            b = x[sl].shape[0]
            qg = bdot(x[sl].reshape(b * H, 1, dk), g[sl].reshape(b * H, dk, dk), (((2,), (1,)), ((0,), (0,))))
            lg = bdot(qg.astype(k.dtype), k[sl].reshape(b * H, S, dk), (((2,), (2,)), ((0,), (0,))))
            p = softmax(lg.reshape(b, H, S) / math.sqrt(dk)).reshape(b * H, 1, S).astype(v.dtype)
            halves.append(bdot(p, v[sl].reshape(b * H, S, dk), (((2,), (1,)), ((0,), (0,)))).reshape(b, H, dk))
        return jnp.concatenate(halves, 0)

    mask = jnp.broadcast_to(slot < live, (B, 1, 1, S))

    def plga(x, k, kt, v, g):
        return plga_attention(x[:, None], k, v, g, mask, heads_first=True)[:, 0].astype(f32)

    def plga_chunks(x, k, kt, v, g):
        return plga_attention(x[:, None], k, v, g, mask, heads_first=True, live_len=jnp.int32(live),
                              kv_chunk=chunk)[:, 0].astype(f32)

    forms = {"dots": dots, "dots_kt": dots_kt, "reduce_kt": reduce_kt, "reduce": reduce, "plga": plga,
             "plga_chunks": plga_chunks}
    if B % 2 == 0:
        forms["split2"] = split2
    return forms


def run(batch: int = 32, heads: int = 14, slots: int = 128, head_dim: int = 64, layers: int = 5,
        kv_dtype: str = "float32", live: int | None = None, chunk: int = 32, steps: int = 20, reps: int = 5,
        options: tuple[str, ...] = tuple(OPTIONS)) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    B, H, S, dk = batch, heads, slots, head_dim
    live = S if live is None else live
    rng = np.random.default_rng(0)
    kvdt = jnp.dtype(kv_dtype)
    mk = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    q = mk(B, H, dk)
    K = [mk(B, H, S, dk).astype(kvdt) for _ in range(layers)]
    KT = [jnp.swapaxes(k, 2, 3) for k in K]
    V = [mk(B, H, S, dk).astype(kvdt) for _ in range(layers)]
    G = [mk(B, H, dk, dk) * 0.1 for _ in range(layers)]
    args = (q, K, KT, V, G)

    def chain(form):
        def f(q, K, KT, V, G):
            def body(_, x):
                for i in range(layers):
                    x = form(x, K[i], KT[i], V[i], G[i])
                return x
            return lax.fori_loop(0, steps, body, q)
        return f

    def time_it(fn, copts=None):
        c = jax.jit(fn, compiler_options=copts).lower(*args).compile()
        out = jax.block_until_ready(c(*args))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            ts.append(time.perf_counter() - t0)
        return 1e3 * min(ts) / steps, out

    forms = _forms(B, H, S, dk, kvdt, live, chunk)
    rows, ref = {}, None
    for name, form in forms.items():
        ms, out = time_it(chain(form))
        ref = out if ref is None else ref
        rows[name] = {"ms_per_step": ms, "max_abs_diff": float(jnp.max(jnp.abs(out - ref)))}
    from pldr_jax.kernels.decode_attention import decode_attention_available, decode_attention_update
    if decode_attention_available():
        # the native CPU kernel (`backend.decode_attention`): the buffers carried through the loop
        # (it updates them in place; a slot outside the buffer, so nothing is written)
        pos = jnp.full((B,), S, jnp.int32)
        mask = jnp.broadcast_to(jnp.arange(S) < live, (B, S))

        def native_chain(q, K, KT, V, G):
            def body(_, c):
                x, Ks, Vs = c
                Ks, Vs = list(Ks), list(Vs)
                for i in range(layers):
                    new = x[:, None].astype(kvdt)
                    o, Ks[i], Vs[i] = decode_attention_update(x[:, None], G[i], new, new, pos, Ks[i], Vs[i], mask)
                    x = o[:, 0].astype(jnp.float32)
                return x, tuple(Ks), tuple(Vs)
            return lax.fori_loop(0, steps, body, (q, tuple(K), tuple(V)))[0]

        ms, out = time_it(native_chain)
        rows["native"] = {"ms_per_step": ms, "max_abs_diff": float(jnp.max(jnp.abs(out - ref)))}
    for name in options:
        try:
            ms, out = time_it(chain(forms["dots"]), OPTIONS[name])
        except Exception as e:          # an option this jaxlib does not know: reported, not fatal
            rows["dots+" + name] = {"error": str(e).splitlines()[0][:200]}
            continue
        rows["dots+" + name] = {"ms_per_step": ms, "max_abs_diff": float(jnp.max(jnp.abs(out - ref)))}
    base = rows["dots"]["ms_per_step"]
    for r in rows.values():
        if "ms_per_step" in r:
            r["vs_dots"] = r["ms_per_step"] / base
    # the bytes' floor: K, V, G read once per step at a plain reduction's bandwidth
    nbytes = layers * (2 * B * H * S * dk * kvdt.itemsize + B * H * dk * dk * 4)
    flat = jnp.ones((nbytes // 4,), jnp.float32)
    red = jax.jit(jnp.sum).lower(flat).compile()
    jax.block_until_ready(red(flat))
    t = min(_timed(red, flat) for _ in range(reps))
    gbs = nbytes / t / 1e9
    return {"batch": B, "heads": H, "slots": S, "live": live, "head_dim": dk, "layers": layers,
            "kv_dtype": kv_dtype, "chunk": chunk, "bytes_per_step": nbytes, "read_gb_per_s": gbs,
            "bytes_floor_ms": 1e3 * nbytes / gbs / 1e9, "forms": rows}


def _timed(fn, x) -> float:
    import jax
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--slots", type=int, default=128, help="KV buffer length S")
    ap.add_argument("--live", type=int, default=None, help="live slots (default: all)")
    ap.add_argument("--chunk", type=int, default=32, help="plga_chunks' chunk length")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--kv-dtype", default="float32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--options", default=",".join(OPTIONS), help="XLA option sets to try on 'dots' ('' = none)")
    ap.add_argument("--quick", action="store_true", help="batch 4, 2 heads, 16 slots, 2 layers, one option set")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    opts = tuple(o for o in a.options.split(",") if o)
    for o in opts:
        if o not in OPTIONS:
            ap.error(f"unknown option set {o!r}; choose from {sorted(OPTIONS)}")
    if a.quick:
        a.batch, a.heads, a.slots, a.head_dim, a.layers, a.steps, a.reps = 4, 2, 16, 8, 2, 3, 2
        a.live, a.chunk, opts = 11, 4, opts[:1]
    if a.live is not None and not 1 <= a.live <= a.slots:
        ap.error(f"--live {a.live} must be in 1..--slots ({a.slots})")
    res = run(a.batch, a.heads, a.slots, a.head_dim, a.layers, a.kv_dtype, a.live, a.chunk, a.steps, a.reps, opts)
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"batch {res['batch']} x {res['heads']} heads, {res['live']}/{res['slots']} live slots, dk {res['head_dim']}, "
          f"{res['layers']} layers, K/V {res['kv_dtype']}: {res['bytes_per_step'] / 1e6:.1f} MB per step, "
          f"bytes floor {res['bytes_floor_ms']:.2f} ms at {res['read_gb_per_s']:.1f} GB/s (a plain reduction)")
    for name, r in res["forms"].items():
        if "error" in r:
            print(f"  {name:26s} not available: {r['error']}")
        else:
            print(f"  {name:26s} {r['ms_per_step']:8.2f} ms/step  {r['vs_dots']:5.2f}x dots  "
                  f"max|diff| {r['max_abs_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
