"""`Sampler`: a decoder built once from ``(cfg, params)``, called many times.

    sampler = pldr_jax.Sampler(cfg, params)                 # weights prepared here, once
    out = sampler([[70, 48, 9], [5, 17]], max_new_tokens=32, top_k=1)      # a GenerateOutput
    for step in sampler.stream([[70, 48, 9]], max_new_tokens=32):          # StreamStep per token
        ...

The decode weights (`weights.prepare_params`: per-layer arrays, fused q/k/v and w1/w2, kernels
transposed, cast to the decode dtype) are made once per decode dtype and kept (a 16-bit config
may decode in float32 at small batches: `weights.decode_dtype`, so at most two layouts), instead
of on every call.  The compiled prefill and decode loop are cached by JAX per static shape
bucket (`buckets`), so a Sampler's calls within a bucket neither re-prepare nor recompile.

With a ``mesh`` the weights are placed once on it and every call's prompts and cache are
sharded: rows over the data axes, heads over the tensor axis (`sharding`).

`pldr_jax.generate` and `stream_generate` are thin functions over a Sampler built per call (their
``params`` may be prepared already: `prepare_params` is then a no-op).
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from ..backend import BackendChoices, backend_for, platform_of
from ..config import PLDRConfig
from .compile_time import CompileWatch
from .loop import advance_loop, prefill_cache, run_loop, start_loop
from .options import DecodeOptions
from .output import GenerateOutput, LayerStack, StreamStep
from .request import DecodeRequest, make_request
from .step import mode_name
from .weights import decode_dtype, has_packed_weights, prepare_params

__all__ = ["Sampler"]


class Sampler:
    """Batched generation from one model (see the module docstring).

    cfg, params: the model (stacked or per-layer params, or already `prepare_params`'d).
    mesh: a `jax.sharding.Mesh` to decode on (None: the default device).  rules: overrides of the
    logical-axis -> mesh-axis table (`sharding.decode_rules`).  backend: the `pldr_jax.backend`
    choices to decode with (None: those of the mesh's platform, `backend.choices`); backend_options:
    {field: value} overriding some of them (e.g. ``{"decode_kv_chunk": 128}``; values may be
    strings).  bf16_min_batch: see `decode_dtype` (the backend option of that name).

    ``sampler(prompts, max_new_tokens=..., options=DecodeOptions(...), **fields)`` returns a
    `GenerateOutput`; ``sampler.stream(prompts, ...)`` yields `StreamStep`s (arguments:
    `DecodeOptions`, whose fields may also be given as keywords).
    """

    def __init__(self, cfg: PLDRConfig, params, *, mesh=None, rules: Mapping[str, Any] | None = None,
                 bf16_min_batch: int | None = None, backend: BackendChoices | None = None,
                 backend_options: Mapping[str, Any] | None = None):
        if not isinstance(cfg, PLDRConfig):
            raise ValueError(f"cfg must be a PLDRConfig, got {type(cfg).__name__}")
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
        self.cfg = cfg
        self.mesh = mesh
        opts = dict(backend_options or {})
        if bf16_min_batch is not None:
            opts["bf16_min_batch"] = bf16_min_batch
        #: the backend choices every call of this sampler uses (resolved once, here)
        self.backend = backend_for(backend, platform_of(mesh), opts)
        self.bf16_min_batch = self.backend.bf16_min_batch
        self.rules = None
        if mesh is not None:
            from .sharding import decode_rules
            self.rules = decode_rules(mesh, rules)
        self._params = params
        self._weights: dict[str, tuple[PLDRConfig, Any]] = {}

    # ------------------------------------------------------------------ weights
    @property
    def sharded(self) -> bool:
        """Whether this sampler decodes over a mesh of several devices."""
        return self.mesh is not None and self.mesh.devices.size > 1

    def weights(self, batch: int) -> tuple[PLDRConfig, Any]:
        """(run_cfg, run_params) for decoding `batch` rows: prepared on the first call for that
        decode dtype, then reused."""
        dt = decode_dtype(self.cfg, batch, backend=self.backend)
        if dt not in self._weights:
            run_cfg, run_params = prepare_params(self.cfg, self._params, batch, backend=self.backend,
                                                 pack=False if self.sharded else None)
            if self.sharded and has_packed_weights(run_params):
                raise ValueError("these weights were prepared for unsharded CPU decoding (packed panels, "
                                 "`prepare_params` pack=True): pass unprepared weights, or prepare "
                                 "them with pack=False, to decode on a mesh of several devices")
            if self.mesh is not None:
                from .sharding import shard_params
                run_params = shard_params(run_params, self.mesh, self.rules)
            self._weights[dt] = (run_cfg, run_params)
        return self._weights[dt]

    # ------------------------------------------------------------------ requests
    def _request(self, prompts, *, max_new_tokens, options: DecodeOptions | None = None, **overrides) -> DecodeRequest:
        return make_request(self.cfg, self.weights, prompts, max_new_tokens=max_new_tokens, options=options,
                            backend=self.backend, sharded=self.sharded, **overrides)

    def _prefill(self, req: DecodeRequest):
        tokens, lengths = req.tokens, req.lengths
        if self.mesh is not None:
            from .sharding import shard_rows
            tokens, lengths = shard_rows(tokens, self.mesh, self.rules), shard_rows(lengths, self.mesh, self.rules)
        # the stacked prompt deductive outputs only where the loop needs them apart from the cache
        # (collected per step; shared_g keeps only row 0's in the cache): else `LayerStack`
        stack = req.spec.collect_deductive or req.spec.shared_g
        from .sharding import prefill_scope
        with prefill_scope(req.spec.step.prefill_attention, self.mesh, self.rules):
            cache, logits0, ded0 = prefill_cache(req.spec, req.params, tokens, lengths, req.g_all, req.max_len,
                                                 stack_deductive=stack)
        if self.mesh is not None:
            from .sharding import shard_cache
            cache = shard_cache(cache, self.mesh, self.rules)
        return cache, logits0, ded0

    # ------------------------------------------------------------------ whole calls
    def __call__(self, prompts, *, max_new_tokens: int, options: DecodeOptions | None = None,
                 **overrides) -> GenerateOutput:
        """Generate up to `max_new_tokens` new tokens for each prompt (`options`: a `DecodeOptions`;
        keywords: its fields, replacing the options' ones; see `pldr_jax.generate`)."""
        with CompileWatch() as watch:
            req = self._request(prompts, max_new_tokens=max_new_tokens, options=options, **overrides)
            opts = req.options
            t0 = time.perf_counter()
            cache, logits0, ded0 = self._prefill(req)
            logits0.block_until_ready()
            t1 = time.perf_counter()
            st = run_loop(req.spec, req.params, cache, logits0, ded0 if opts.return_deductive else None, req.key,
                          req.inputs, n_out=req.n_out)
            out = np.asarray(st.out)
            t2 = time.perf_counter()
        count = np.asarray(st.count)
        steps = int(st.t)
        B = out.shape[0]
        logits = None
        if opts.return_logits:
            logits = np.transpose(np.asarray(st.logits_buf[:steps]), (1, 0, 2))
        ded = None
        if opts.return_deductive:
            ded = {n: np.asarray(v[:steps]) for n, v in st.ded_buf.items()}
        return GenerateOutput(
            tokens=[out[b, :count[b]].tolist() for b in range(B)], ids=out, num_generated=count,
            prompt_lengths=req.lengths, mode=mode_name(opts.kv_cache, opts.g_cache), steps=steps, logits=logits,
            deductive=ded, cache=st.cache,
            prompt_deductive=dict(ded0) if ded0 is not None else LayerStack(
                {n: getattr(st.cache, n) for n in ("A", "A_LM", "G_LM") if getattr(st.cache, n) is not None}),
            timings={"prefill_s": t1 - t0, "decode_s": t2 - t1, "compile_s": watch.seconds},
            compute_dtype=req.spec.step.cfg.dtype)

    # ------------------------------------------------------------------ streaming
    def stream(self, prompts, *, max_new_tokens: int, options: DecodeOptions | None = None,
               **overrides) -> Iterator[StreamStep]:
        """Yield a `StreamStep` per new token position until every row stops or max_new_tokens (one
        host round-trip per step; the tokens equal ``self(...)``'s for the same arguments and seed).
        Validation happens on the first ``next()``."""
        req = self._request(prompts, max_new_tokens=max_new_tokens, options=options, **overrides)
        cache, logits0, _ = self._prefill(req)
        st = start_loop(req.spec, cache, logits0, None, req.key, req.inputs, n_out=req.n_out)
        prev_done = np.asarray(req.inputs.limit) <= 0
        t = 0
        while True:
            tokens, done = jax.device_get((st.token, st.done))
            yield StreamStep(step=t, tokens=np.asarray(tokens), active=~prev_done, done=np.asarray(done))
            prev_done = np.asarray(done)
            t += 1
            if t >= req.max_new_tokens or prev_done.all():
                return
            st = advance_loop(req.spec, req.params, st, req.inputs)
