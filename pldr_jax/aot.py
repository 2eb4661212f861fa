"""Ahead-of-time compilation of the real training step or decode loop for a TPU topology or GPUs.

`compile_report(...)` compiles, for the devices of a topology given by name (`pldr_jax.targets`:
a TPU topology such as "v5e:2x2", needing only the `libtpu` wheel, ``pip install -e .[tpu]``; or
NVIDIA GPUs such as "h100:1x8" (hosts x GPUs per host), needing only the CUDA plugin,
``pip install -e .[cuda]``, and described by the XLA GPU target configs shipped in
`pldr_jax.targets`; no accelerator either way):

* ``what="train"``: the step `pldr-jax train` runs (`train.step.make_train_step`: the recipe's
  optimizer and schedule, the non-finite guard, the mesh and the sharding rules, the platform's
  backend choices, `pldr_jax.backend`, its fused attention unless ``attention_impl`` says otherwise),
  over the abstract sharded train state (nothing allocated);
* ``what="decode"``: prefill + the `lax.while_loop` of `decode.generate` (greedy, KV- and G-cache),
  for `batch` prompts of `seq_len // 2` tokens and `seq_len // 2` new tokens, weights / rows / cache
  placed as `decode.sharding` places them (rows over the data axes, heads over "tensor"); plus
  "decode_step": the loop body compiled alone, its bytes accessed per chip against what one step
  must read (weights, the live KV-cache, the G-cache) as a ratio (`_decode_step_bytes`),

and reports per-chip memory (`memory_analysis`), FLOPs (`model_flops`: the step's matmul FLOPs over the chips;
XLA's `cost_analysis` counts a while/scan body once, its figure is kept as xla_flops_per_chip; on
GPU there is none), bytes accessed (TPU: `cost_analysis`, loop bodies once, so a lower bound; GPU:
the HBM traffic), the HBM traffic read off the compiled HLO (`hlo_traffic`, loops per trip), the
collectives per step *as executed* (`hlo.collectives_per_step`; an op in a while/scan body counts
once per iteration) and a roofline estimate of the step time: the largest of the executed FLOPs
(`executed_flops`: with the remat policy's recomputation, 4x the forward for "full") / peak bf16
FLOP/s, bytes accessed / HBM bandwidth and collective bytes / chip-to-chip bandwidth (ICI, NVLink)
from the chip's published figures (`targets.CHIPS`), i.e. perfect overlap.  est_mfu = model FLOPs /
(est_step_s x peak): an upper bound, not a measurement -- at most 75% with full remat (the backward
pass recomputes the forward); below that when the ICI term (or the HBM lower bound) exceeds the
FLOPs term.  `pldr-jax compile` prints it.

Collective bytes are the result-shape bytes of each collective (as ../shared/tpu/fsdp_anchor.py
counts them, so the two compare), per chip.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

from .hlo import collectives_per_step
from .hlo_traffic import hbm_traffic
from .targets import CHIPS, CUDA_INSTALL, LIBTPU_INSTALL, ChipSpec, chip_of, topology_devices

__all__ = ["CHIPS", "ChipSpec", "LIBTPU_INSTALL", "CUDA_INSTALL", "chip_of", "topology_devices",
           "collectives_per_step", "compile_report", "largest_fitting", "max_batch", "format_report", "model_flops",
           "executed_flops"]


def _forward_flops(cfg, rows: int, q_len: int, k_len: int) -> tuple[float, float]:
    """(all matmul FLOPs, the attention part: scores and mixing) of one forward pass over
    rows x q_len queries attending to k_len keys."""
    D, F, H, dk, V = cfg.d_model, cfg.dff, cfg.num_heads, cfg.head_dim, cfg.vocab_size
    T = rows * q_len
    att = 2 * 2 * rows * H * q_len * k_len * dk
    per = 2 * T * D * D * 4 + 2 * T * D * F * 3 + att + 2 * T * H * dk * dk * 2
    if cfg.learned_g:
        r = rows * H * dk
        per += cfg.num_reslayerA * cfg.num_denseA * 3 * 2 * r * dk * cfg.A_dff + 2 * 2 * rows * H * dk ** 3
    return float(cfg.num_layers * per + 2 * T * D * V), float(cfg.num_layers * att)


def model_flops(cfg, batch: int, seq_len: int, what: str = "train") -> float:
    """Matmul FLOPs of one step, all chips (the MFU numerator): projections, FFN, attention scores
    and mixing, A = q^T q and q @ G, the metric learner and PLGA, the output head; a training step
    is 3x the forward (no remat recompute counted); decode: prefill of seq_len // 2 tokens plus one
    token per new position (attention over the whole buffer)."""
    if what == "train":
        return 3.0 * _forward_flops(cfg, batch, seq_len, seq_len)[0]
    if what == "serve":         # the serving engine's block of generate steps over seq_len-long slots
        from .serve.lowering import SERVE_STEPS
        return SERVE_STEPS * _forward_flops(cfg, batch, 1, seq_len)[0]
    P = max(seq_len // 2, 1)
    return _forward_flops(cfg, batch, P, P)[0] + (seq_len - P) * _forward_flops(cfg, batch, 1, seq_len)[0]


def executed_flops(cfg, batch: int, seq_len: int, what: str = "train", remat: str = "none") -> float:
    """Matmul FLOPs the chips execute in one step, all chips: `model_flops` plus the backward pass's
    recomputation -- remat "full" recomputes every layer's forward and the chunked head's (one more
    forward: 4x instead of 3x), "dots" the matmuls with a batch dimension (attention's)."""
    base = model_flops(cfg, batch, seq_len, what)
    if what != "train" or remat == "none":
        return base
    fwd, att = _forward_flops(cfg, batch, seq_len, seq_len)
    return base + (fwd if remat == "full" else att)


# --------------------------------------------------------------------------- lowering
def _lower_train(cfg, tcfg, mesh, backend=None):
    import jax
    import jax.numpy as jnp
    from .train.inputs import make_g_lm
    from .train.sharding import abstract_train_state, check_batch_size
    from .train.step import make_train_step
    check_batch_size(tcfg.batch_size, mesh, tcfg.grad_accum)
    tx, schedule = tcfg.optimizer()
    step = make_train_step(cfg, tx, schedule, opts=tcfg.step_options(), mesh=mesh, backend=backend)
    state = abstract_train_state(cfg, tx, mesh)
    tok = jax.ShapeDtypeStruct((tcfg.batch_size, tcfg.seq_len), jnp.int32)
    g = make_g_lm(cfg, tcfg)
    g = None if g is None else jax.ShapeDtypeStruct(g.shape, jnp.float32)
    return step.lower(state, {"inputs": tok, "targets": tok}, g)


def _decode_parts(cfg, batch, seq_len, mesh, backend=None):
    """What the decode lowerings share: (the `decode.plan` DecodePlan, abstract decode params, their
    shardings, g_all, P prompt tokens, N new tokens, a function cache -> cache constrained to its
    logical sharding, the loop inputs and their shardings).  Weights, rows and cache are placed as
    `decode.sharding` places them: rows over the data axes, heads / FFN width / vocabulary over
    "tensor", the model width replicated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from .backend import backend_for, platform_of
    from .decode.cache import cache_logical_axes
    from .decode.loop import LoopInputs
    from .decode.options import DecodeOptions
    from .decode.plan import plan
    from .decode.sharding import decode_param_axes, decode_rules
    from .decode.weights import prepare_params
    from .model import normalize_g_lm
    from .params import abstract_params
    from .train.sharding import batch_sharding, logical_to_spec, replicated
    P = max(seq_len // 2, 1)
    N = max(seq_len - P, 1)
    backend = backend_for(backend, platform_of(mesh), {"bf16_min_batch": 0})
    params = jax.eval_shape(lambda p: prepare_params(cfg, p, batch, backend=backend, transpose=False, pack=False,
                                                       embed_f32=False)[1],
                            abstract_params(cfg))
    rules = decode_rules(mesh)
    is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
    place = lambda axes, tree: jax.tree_util.tree_map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)), axes, tree,
        is_leaf=is_names)
    p_sh = place(decode_param_axes(params), params)
    g_all = normalize_g_lm(cfg, None)
    dplan = plan(cfg, batch, P, N, DecodeOptions(top_k=1, max_len=seq_len), backend, sharded=mesh.devices.size > 1)
    rep = replicated(mesh)
    b1 = batch_sharding(mesh, 1)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    inputs = LoopInputs(max_new=i32(), limit=i32(batch), eos_id=i32(), temperature=jax.ShapeDtypeStruct((), jnp.float32),
                        top_k=i32(), top_p=jax.ShapeDtypeStruct((), jnp.float32))
    in_sh = LoopInputs(max_new=rep, limit=b1, eos_id=rep, temperature=rep, top_k=rep, top_p=rep)

    def cache_sharding(cache):
        return place(cache_logical_axes(cache), cache)

    return dplan, params, p_sh, g_all, P, N, cache_sharding, inputs, in_sh


def _lower_decode(cfg, batch, seq_len, mesh, backend=None):
    """Prefill of `batch` prompts of seq_len // 2 tokens + the decode `while_loop` for the rest."""
    import jax
    import jax.numpy as jnp
    from .decode.sharding import prefill_scope
    from .train.sharding import batch_sharding, replicated
    dplan, params, p_sh, g_all, P, N, cache_sharding, inputs, in_sh = _decode_parts(cfg, batch, seq_len, mesh, backend)

    def decode(params, tokens, lengths, key, inputs):
        with prefill_scope(dplan.spec.step.prefill_attention, mesh):
            cache, logits0, _ = dplan.prefill(params, tokens, lengths, g_all)
        cache = jax.lax.with_sharding_constraint(cache, cache_sharding(cache))
        st = dplan.loop(params, cache, logits0, None, key, inputs)
        return st.out, st.count

    rep = replicated(mesh)
    b2, b1 = batch_sharding(mesh, 2), batch_sharding(mesh, 1)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    f = jax.jit(decode, in_shardings=(p_sh, b2, b1, rep, in_sh), out_shardings=(b2, b1))
    return f.lower(params, i32(batch, P), i32(batch), key, inputs)


def _lower_decode_step(cfg, batch, seq_len, mesh, backend=None):
    """One iteration of the decode loop's body (`decode.plan` DecodePlan.advance: one model step over the
    KV- and G-cache, one sampling step) with the loop's shardings, and what that step must read per
    chip: (lowered, {"weights" (but the embedding table and, with a G-cache, the metric learner's
    weights, which the step does not read), "embedding_rows", "kv_buffer", "kv_live_mean", "kv_live_last",
    "g_cache"} bytes per chip, {"mean", "last"} chunks the attention reads per layer).  The live
    KV-cache: the prompt's P positions plus the tokens decoded so far, averaged over the N steps
    (mean) or at the last step.  With a chunked attention (`StepSpec.kv_chunk`) step t of the loop
    reads ceil((P + t) / kv_chunk) chunks of each layer's buffers (its loop's runtime trip count);
    else 1 (the whole buffer, no loop)."""
    import math
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    from .decode.sharding import prefill_scope
    from .train.sharding import replicated
    dplan, params, p_sh, g_all, P, N, cache_sharding, inputs, in_sh = _decode_parts(cfg, batch, seq_len, mesh, backend)
    spec = dplan.spec
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)

    def state(params, tokens, lengths, key, inputs):
        with prefill_scope(dplan.spec.step.prefill_attention, mesh):
            cache, logits0, _ = dplan.prefill(params, tokens, lengths, g_all)
        return dplan.start(cache, logits0, None, key, inputs)

    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    st = jax.eval_shape(state, params, i32(batch, P), i32(batch), key, inputs)
    rep = replicated(mesh)
    rows = NamedSharding(mesh, PartitionSpec(tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None))
    divides = batch % math.prod(mesh.shape[a] for a in ("data", "fsdp")) == 0
    lead = lambda x: (NamedSharding(mesh, PartitionSpec(rows.spec[0], *([None] * (x.ndim - 1))))
                      if divides and x.ndim and x.shape[0] == batch else rep)
    st_sh = jax.tree_util.tree_map(lead, st).replace(cache=cache_sharding(st.cache), t=rep, key=rep)
    f = jax.jit(dplan.advance, in_shardings=(p_sh, st_sh, in_sh),
                out_shardings=st_sh, donate_argnums=(1,))
    per_chip = lambda tree, sh: sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                                    for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(sh)))
    table = params["embed"]["embedding"]
    table_chip = per_chip(table, p_sh["embed"]["embedding"])
    cache, cs = st.cache, st_sh.cache
    kv = per_chip((cache.k, cache.v), (cs.k, cs.v)) if cache.k is not None else 0
    g_bytes = per_chip(cache.G_LM, cs.G_LM) if cache.G_LM is not None else 0
    S = seq_len
    b_chip = batch // math.prod(mesh.shape[a] for a in ("data", "fsdp")) if divides else batch
    # with a fixed G (the G-cache) the step never runs the metric learner: its weights are not read
    learner = ("metric_norm", "metric_res", "plga")
    unused = sum(per_chip(lp[k], lps[k]) for lp, lps in zip(params["layers"], p_sh["layers"]) for k in learner
                 if k in lp) if spec.step.fixed_g else 0
    need = {"weights": per_chip(params, p_sh) - table_chip - unused,
            "embedding_rows": b_chip * cfg.d_model * jnp.dtype(table.dtype).itemsize,
            "kv_buffer": kv, "kv_live_mean": kv * (P + (N + 1) / 2) / S, "kv_live_last": kv * (P + N) / S,
            "g_cache": g_bytes}
    C = spec.step.kv_chunk if seq_len > spec.step.kv_chunk else 0       # (a buffer of one chunk: no loop)
    own = 0 if spec.step.shared_slot else 1            # per-row slots: the step's own key is in the buffer
    chunks = [-(-(P + t + own) // C) for t in range(N)] if C else [1]
    return f.lower(params, st, inputs), need, {"mean": sum(chunks) / len(chunks), "last": chunks[-1]}


def _decode_step_bytes(cfg, batch, seq_len, mesh, backend=None) -> dict:
    """Bytes one decode step accesses per chip (cost_analysis of the loop body compiled alone: it
    has no loop inside, so nothing is counted once for many iterations) against what it must read:
    the weights (the embedding table but for this step's rows), the G-cache and the live KV-cache
    (mean over the loop's steps, and at its last step).  ratio_mean / ratio_last = accessed / must-read.
    XLA's bytes accessed count on-chip (VMEM) reads and writes too; "hbm" is the HBM traffic read off
    the compiled program's memory spaces (`pldr_jax.hlo_traffic`), hbm_ratio_mean / hbm_ratio_last
    that against the must-read bytes."""
    lowered, need, chunks = _lower_decode_step(cfg, batch, seq_len, mesh, backend)
    compiled = lowered.compile()
    text = compiled.as_text()
    acc = float(_cost_analysis(compiled).get("bytes accessed", 0.0)) or hbm_traffic(text, chunks["mean"])["total"]
    base = need["weights"] + need["embedding_rows"] + need["g_cache"]
    must_mean, must_last = base + need["kv_live_mean"], base + need["kv_live_last"]
    hbm = hbm_traffic(text, unknown_trip=chunks["mean"])     # the attention's chunk loops, mean step
    hbm.pop("by_opcode")
    hbm_last = hbm_traffic(text, unknown_trip=chunks["last"])["total"]
    hbm["total_last"] = hbm_last
    hbm["attention_chunks"] = chunks
    ratio = lambda x, y: x / y if y else 0.0
    return {"bytes_accessed": acc, "must_read": need, "must_read_mean": must_mean, "must_read_last": must_last,
            "ratio_mean": ratio(acc, must_mean), "ratio_last": ratio(acc, must_last), "hbm": hbm,
            "hbm_ratio_mean": ratio(hbm["total"], must_mean), "hbm_ratio_last": ratio(hbm_last, must_last),
            "temporaries": compiled.memory_analysis().temp_size_in_bytes}


def _cost_analysis(compiled) -> dict:
    """XLA's cost analysis of a compiled program ({} where the platform has none: GPUs)."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
    return dict(ca) if ca else {}


def compile_report(*, topology: str = "v5e:2x2", preset: str | None = "tiny", config: str | None = None,
                   overrides: dict | None = None, mesh: tuple[int, int, int] = (1, -1, 1), batch: int = 8,
                   seq_len: int = 64, dtype: str | None = None, what: str = "train", remat: Any = None,
                   unroll_layers: bool | None = None, recipe: str | None = None, keep_hlo: bool = False,
                   cfg=None, backend_options: Mapping[str, Any] | None = None,
                   attention_impl: str | None = None) -> dict:
    """Compile the training step (or decode loop) for `topology` and report it (see the module
    docstring; keys as `pldr-jax compile --json`; with keep_hlo also "hlo": the compiled HLO text).
    The model: `cfg` (a PLDRConfig; `preset` is then only its label), else `config` (a JSON file)
    or `preset`, with `overrides` and `dtype`.  backend_options: {field: value} overriding the
    topology platform's `pldr_jax.backend` choices (resolved once, here).  ValueError for bad
    arguments or a missing libtpu.  attention_impl: the training step's attention (the backend option
    of that name; None = the platform's)."""
    from .config import PLDRConfig
    from .params import count_params
    from .train.recipes import PRESET_RECIPE as _PRESET_RECIPE
    from .train.recipes import RECIPES
    from .train.config import TrainConfig
    from .train.sharding import make_mesh
    if what not in ("train", "decode", "serve"):
        raise ValueError(f"what must be 'train', 'decode' or 'serve', got {what!r}")
    chip = chip_of(topology)
    devices = topology_devices(topology)
    ov = dict(overrides or {})
    if dtype:
        ov["dtype"] = dtype
    if cfg is not None:
        cfg = cfg.replace(**ov) if ov else cfg
    elif config:
        cfg = PLDRConfig.from_json_file(config, **ov)
    else:
        cfg = PLDRConfig.preset(preset or "small", **ov)
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    m = make_mesh(*mesh, devices=devices)
    from .backend import choices
    if attention_impl is not None:
        backend_options = {**(backend_options or {}), "attention_impl": attention_impl}
    backend = choices(str(devices[0].platform), backend_options)
    t0 = time.perf_counter()
    if what == "train":
        rname = recipe or _PRESET_RECIPE.get(preset or "", "cpu")
        kw = {k: v for k, v in RECIPES[rname].items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
        kw.update(batch_size=batch, seq_len=seq_len, remat=remat, unroll_layers=unroll_layers,
                  mesh=tuple(m.shape[a] for a in m.axis_names), vocab_size=cfg.vocab_size)
        lowered = _lower_train(cfg, TrainConfig(**kw), m, backend)
    elif what == "serve":       # `pldr_jax.serve`'s generate step: `batch` slots of seq_len positions
        from .serve.lowering import SERVE_STEPS, lower_generate_step
        lowered = lower_generate_step(cfg, batch, seq_len, m, steps=SERVE_STEPS)
    else:
        lowered = _lower_decode(cfg, batch, seq_len, m, backend)
    fits, oom = True, None
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs that do not fit HBM
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
            raise
        fits, oom, compiled = False, msg.splitlines()[0][:500], None
    compile_s = time.perf_counter() - t0
    rep = {"what": what, "topology": topology, "chips": len(devices), "device_kind": devices[0].device_kind,
           "preset": preset if not config else config, "params": int(count_params(cfg)), "dtype": cfg.dtype,
           "mesh": [int(m.shape[a]) for a in m.axis_names], "global_batch": batch, "seq_len": seq_len,
           "remat": remat, "chip": dataclasses.asdict(chip), "hbm_bytes": chip.hbm_bytes,
           "compile_s": round(compile_s, 1)}
    if compiled is None:
        rep.update(fits=False, error=oom)
        return rep
    ma = compiled.memory_analysis()
    args, temps, outs = ma.argument_size_in_bytes, ma.temp_size_in_bytes, ma.output_size_in_bytes
    alias = getattr(ma, "alias_size_in_bytes", 0)
    total = args + temps + outs - alias
    ca = _cost_analysis(compiled)
    xla_flops = float(ca.get("flops", 0.0))      # XLA's count: a while/scan body counted once
    flops = model_flops(cfg, batch, seq_len, what) / len(devices)
    from .model import remat_policy
    policy = remat_policy(backend.remat if remat is None else remat)
    hw_flops = executed_flops(cfg, batch, seq_len, what, policy) / len(devices)
    n_new = max(seq_len - max(seq_len // 2, 1), 1)
    if what == "serve":
        from .serve.lowering import SERVE_STEPS
        n_new = SERVE_STEPS
    # decode: the while loop runs once per new token (at most); the step is the whole generate call
    hlo = compiled.as_text()
    trips = n_new if what in ("decode", "serve") else 1
    hbm = hbm_traffic(hlo, unknown_trip=trips)
    hbm.pop("by_opcode")
    # TPU: XLA's bytes accessed (loop bodies once: a lower bound); GPU (no cost analysis): the HBM traffic
    bytes_acc = float(ca["bytes accessed"]) if "bytes accessed" in ca else hbm["total"]
    coll, unknown = collectives_per_step(hlo, unknown_trip=trips)
    coll_bytes = sum(v["bytes"] for v in coll.values())
    t_flops, t_hbm, t_ici = hw_flops / chip.peak_bf16_flops, bytes_acc / chip.hbm_bw, coll_bytes / chip.ici_bw
    est = max(t_flops, t_hbm, t_ici)
    tokens = batch * seq_len if what == "train" else batch * n_new
    rep.update({
        "remat": policy if what == "train" else None,
        "attention_block": backend.attention_block if what == "train" else None,
        "attention_impl": backend.attention_impl if what == "train" else None,
        "per_chip_bytes": {"arguments": args, "temporaries": temps, "outputs": outs, "aliased": alias,
                           "total": total},
        "fits": total <= chip.hbm_bytes, "flops_per_chip": flops, "executed_flops_per_chip": hw_flops,
        "xla_flops_per_chip": xla_flops, "bytes_accessed_per_chip": bytes_acc,
        "bytes_accessed_source": "cost_analysis" if "bytes accessed" in ca else "hlo_traffic",
        "hbm_traffic_per_chip": hbm,
        "collectives": coll, "collective_bytes": coll_bytes, "loops_without_trip_count": unknown,
        "est_step_s": est, "est_terms_s": {"flops": t_flops, "hbm": t_hbm, "ici": t_ici},
        # model FLOPs (no recomputation) over what the chip could do in the estimated step time
        "est_mfu": flops / (est * chip.peak_bf16_flops) if est > 0 else 0.0,
        "est_tokens_per_s_per_chip": tokens / est / len(devices) if est > 0 else 0.0,
    })
    if what == "decode":
        rep["decode_step"] = _decode_step_bytes(cfg, batch, seq_len, m, backend)
    if keep_hlo:
        rep["hlo"] = hlo
    return rep


def largest_fitting(fits, unit: int, start: int, limit: int = 1 << 20) -> int:
    """The largest multiple of `unit` (<= limit) for which `fits(batch)` is True, assuming fitting is
    monotone in the batch: doubling from `start` (rounded to a multiple of unit), then bisection.
    0 when not even `unit` fits."""
    b = max(unit, start - start % unit)
    if not fits(b):
        lo, hi = 0, b
    else:
        lo = b
        while lo * 2 <= limit and fits(lo * 2):
            lo *= 2
        hi = lo * 2
        if hi > limit:
            return lo
    while hi - lo > unit:           # invariant: lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        mid -= mid % unit
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo if lo else (unit if hi > unit and fits(unit) else 0)


def max_batch(**kw) -> tuple[int, dict | None]:
    """(largest global batch that fits the chip, its report) for `compile_report(**kw)`'s other
    arguments: batches are multiples of the mesh's batch shards (data x fsdp); each try compiles."""
    reports: dict[int, dict] = {}

    def fits(b):
        reports[b] = compile_report(**{**kw, "batch": b})
        return bool(reports[b].get("fits"))

    mesh = kw.get("mesh", (1, -1, 1))
    chips = len(topology_devices(kw.get("topology", "v5e:2x2")))
    tensor = mesh[2] if mesh[2] > 0 else 1
    unit = chips // tensor
    best = largest_fitting(fits, unit, kw.get("batch", unit))
    return best, reports.get(best)


def format_report(rep: dict) -> str:
    """A human-readable table of `compile_report`'s result."""
    gb = lambda b: f"{b / 1e9:.3f} GB"
    lines = [f"{rep['what']} step of {rep['preset']} ({rep['params']:,} params, {rep['dtype']}) on {rep['topology']} "
             f"({rep['chips']} x {rep['device_kind']}), mesh data,fsdp,tensor = {rep['mesh']}, "
             f"global batch {rep['global_batch']} x {rep['seq_len']}",
             f"  compile            {rep['compile_s']} s"]
    if "per_chip_bytes" not in rep:
        lines.append(f"  fits               NO: {rep.get('error')}")
        return "\n".join(lines)
    pc = rep["per_chip_bytes"]
    lines += [f"  per chip           arguments {gb(pc['arguments'])}, temporaries {gb(pc['temporaries'])}, "
              f"outputs {gb(pc['outputs'])}, total {gb(pc['total'])} of {gb(rep['hbm_bytes'])} HBM -> "
              f"{'fits' if rep['fits'] else 'DOES NOT FIT'}",
              f"  FLOPs per chip     {rep['flops_per_chip']:.4g}   bytes accessed {rep['bytes_accessed_per_chip']:.4g}   "
              f"HBM traffic {gb(rep['hbm_traffic_per_chip']['total'])} per step"
              + (f"   attention {rep['attention_impl']}" if rep.get("attention_impl") else ""),
              "  collectives per step (as executed):"]
    lines.append(f"    {'op':<20}{'count':>8}{'bytes':>16}{'largest':>16}")
    for op, v in rep["collectives"].items():
        lines.append(f"    {op:<20}{v['count']:>8}{gb(v['bytes']):>16}{gb(v['max_bytes']):>16}")
    lines.append(f"    {'total':<20}{'':>8}{gb(rep['collective_bytes']):>16}")
    t = rep["est_terms_s"]
    c = rep["chip"]
    lines += [f"  roofline step      {rep['est_step_s'] * 1e3:.2f} ms  (FLOPs {t['flops'] * 1e3:.2f}, HBM "
              f"{t['hbm'] * 1e3:.2f}, ICI {t['ici'] * 1e3:.2f} ms; {c['name']}: {c['peak_bf16_flops'] / 1e12:.0f} "
              f"TFLOP/s bf16, HBM {c['hbm_bw'] / 1e9:.0f} GB/s, ICI {c['ici_bw'] / 1e9:.0f} GB/s, {c['source']})",
              f"  est. MFU           {rep['est_mfu'] * 100:.1f} %   est. tokens/s/chip "
              f"{rep['est_tokens_per_s_per_chip']:,.0f}   (model FLOPs / peak over the roofline step; executed "
              f"FLOPs {rep['executed_flops_per_chip']:.4g} per chip)"]
    if "decode_step" in rep:
        d = rep["decode_step"]
        lines.append(f"  decode step        {gb(d['bytes_accessed'])} accessed per chip; must read "
                     f"{gb(d['must_read_mean'])} (weights, live KV-cache at the mean step, G-cache) -> ratio "
                     f"{d['ratio_mean']:.2f} (last step: {d['ratio_last']:.2f})",
                     f"  decode step HBM    {gb(d['hbm']['total'])} (read {gb(d['hbm']['read'])}, write "
                     f"{gb(d['hbm']['write'])}; on-chip traffic left out) -> ratio {d['hbm_ratio_mean']:.2f} "
                     f"(last step: {d['hbm_ratio_last']:.2f})")
    return "\n".join(lines)
