"""Loss, jitted training step (gradient accumulation, DAG option) and evaluation step.

Loss (the reference's `masked_loss_function`): the mean cross-entropy over the non-pad targets of
the whole (global) batch, plus optionally ``c_A dag(A_LM) + c_P dag(A_P) + c_G dag(G_LM)``.

Gradient accumulation splits the batch into `grad_accum` micro-batches that are run one after the
other (`lax.scan`) and sums their gradients.  Each micro-batch contributes
``CE_sum(micro) / N_real(batch) + dag(micro) / grad_accum``, so the accumulated loss and gradient
equal those of the full batch (up to float summation order) -- padding-heavy micro-batches are
not over-weighted.  Micro-batch k holds rows k, k + K, k + 2K, ... so every batch shard keeps
its rows local.

Precision: parameters (master weights), gradients, optimiser state, the deductive path (A -> G),
softmax, logits and the loss are float32; with ``cfg.dtype == "bfloat16"`` the matmul-heavy path
(projections, attention, FFN) runs in bfloat16.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..backend import BackendChoices, backend_for, check_kernels, platform_of
from ..config import PLDRConfig
from ..losses import DAG_NAMES, LossOptions, loss_terms, objective
from ..model import remat_policy
from ..partitioning import activation_sharding, merged_rules
from ..kernels.fused_attention import check_attention_impl
from ..strategies import attention_strategy
from .faults import apply_gradients_guarded
from .optimizer import schedule_count
from .sharding import batch_sharding, replicated, state_shardings
from .state import TrainState

__all__ = ["StepOptions", "loss_terms", "make_train_step", "make_eval_step", "reduce_eval", "DAG_NAMES"]


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the training step.

    dag_coeffs: (c_A, c_P, c_G) of the DAG regulariser on (A_LM, A_P, G_LM); zeros skip it.
    grad_accum: micro-batches per optimiser update.
    pad_aware_A: mask padding out of the metric tensor A (False = the reference).
    remat: rematerialisation of each decoder layer in the backward pass: False / "none", "dots"
      (keep the weight matmuls' outputs), True / "full" (less memory, ~30% more compute); None =
      the platform's default (`pldr_jax.backend`: "none" on CPU, "full" on accelerators).
    unroll_layers: run the decoder layers as an unrolled Python loop over per-layer slices of the
      stacked parameters (True) or as a `lax.scan` (False: compile time flat in depth); None = the
      platform's default (unrolled on CPU: v51 110M bf16 step ~15% faster, experiments/README.md;
      scanned on accelerators).  Same numbers.
    kernels: the matmul implementation, "cpu" | "xla" (`pldr_jax.backend`); None = the platform's.
    head_chunk_bytes: with "xla" kernels, compute the output head + cross-entropy over sequence
      chunks whose float32 logits block is at most this many bytes (`ops.cross_entropy`); None = the
      platform's default (whole on CPU, 256 MiB per device on accelerators); 0 = whole.
    attention_block: compute attention this many queries at a time (`layer.attention_in_query_blocks`,
      same values, memory linear in the sequence length); None = the platform's default (0 = all at
      once on CPU, 256 on accelerators).
    attention_impl: the attention's implementation (`pldr_jax.kernels.fused_attention.IMPLEMENTATIONS`:
      "blocks" = the layer's query blocks, "cudnn", "splash", ...); None = the platform's default
      ("blocks" on CPU, "cudnn" on GPUs, "splash" on TPUs, `pldr_jax.backend`).  Same values.
    nonfinite_guard: do not apply an update whose loss or gradients are not finite (params and
      optimiser state keep their values; metrics["nonfinite"] = 1). See `faults`.
    """
    dag_coeffs: tuple[float, float, float] = (0.0, 0.0, 0.0)
    grad_accum: int = 1
    pad_aware_A: bool = False
    remat: bool | str | None = None
    unroll_layers: bool | None = None
    nonfinite_guard: bool = True
    kernels: str | None = None
    head_chunk_bytes: int | None = None
    attention_block: int | None = None
    attention_impl: str | None = None

    def __post_init__(self):
        c = tuple(float(x) for x in self.dag_coeffs)
        if len(c) != 3 or any(x < 0 for x in c):
            raise ValueError(f"dag_coeffs must be three non-negative numbers (c_A, c_P, c_G), got {self.dag_coeffs!r}")
        object.__setattr__(self, "dag_coeffs", c)
        if self.remat is not None:
            remat_policy(self.remat)
        if self.kernels is not None:
            check_kernels(self.kernels)
        if self.attention_block is not None and (isinstance(self.attention_block, bool) or
                                                  not isinstance(self.attention_block, int) or self.attention_block < 0):
            raise ValueError(f"attention_block must be an int >= 0 (0 = all queries at once), got {self.attention_block!r}")
        if self.attention_impl is not None:
            check_attention_impl(self.attention_impl)
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be an int >= 1, got {self.grad_accum!r}")

    @property
    def use_dag(self) -> bool:
        return any(self.dag_coeffs)

    def resolved(self, platform: BackendChoices | str | None = None,
                 backend: BackendChoices | None = None) -> "StepOptions":
        """These options with every None replaced by `backend`'s value (a resolved
        `pldr_jax.backend.BackendChoices`, also accepted as the first argument; None =
        `backend.choices(platform)`, platform None = `jax.default_backend()`)."""
        if None not in (self.remat, self.unroll_layers, self.kernels, self.head_chunk_bytes, self.attention_block,
                        self.attention_impl):
            return self
        b = _backend_of(platform, backend)
        return dataclasses.replace(
            self, remat=b.remat if self.remat is None else self.remat,
            unroll_layers=b.unroll_layers if self.unroll_layers is None else self.unroll_layers,
            kernels=b.kernels if self.kernels is None else self.kernels,
            head_chunk_bytes=b.head_chunk_bytes if self.head_chunk_bytes is None else self.head_chunk_bytes,
            attention_block=b.attention_block if self.attention_block is None else self.attention_block,
            attention_impl=b.attention_impl if self.attention_impl is None else self.attention_impl)

    def loss_options(self, platform: BackendChoices | str | None = None,
                     backend: BackendChoices | None = None) -> LossOptions:
        """The `losses.LossOptions` of these options (resolved against the backend first, as
        `resolved`; the full-sequence attention from `strategies.attention_strategy`)."""
        b = _backend_of(platform, backend)
        r = self.resolved(b)
        return LossOptions(dag_coeffs=r.dag_coeffs, pad_aware_A=r.pad_aware_A, remat=remat_policy(r.remat),
                           unroll_layers=r.unroll_layers, kernels=r.kernels, head_chunk_bytes=r.head_chunk_bytes,
                           attention=attention_strategy(b, r.attention_block, r.attention_impl))


def _backend_of(platform: BackendChoices | str | None, backend: BackendChoices | None) -> BackendChoices:
    """`backend`, else `platform` when it is a `BackendChoices`, else `backend.choices(platform)`."""
    if backend is not None:
        return backend
    return platform if isinstance(platform, BackendChoices) else backend_for(None, platform)


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j + k, j + 2k, ... (shard-local)."""
    B = x.shape[0]
    return jnp.swapaxes(x.reshape(B // k, k, *x.shape[1:]), 0, 1)


def make_train_step(cfg: PLDRConfig, tx: optax.GradientTransformation, schedule: Callable | None = None, *,
                    opts: StepOptions = StepOptions(), mesh: Mesh | None = None,
                    rules: Mapping[str, Any] | None = None, donate: bool = True,
                    compiler_options: Mapping[str, Any] | None = None,
                    backend: BackendChoices | None = None) -> Callable:
    """A jitted `train_step(state, batch, g_lm=None) -> (state, metrics)`.

    batch: {"inputs", "targets"} int32 [B, L] (global arrays; see `sharding.shard_batch`).
    g_lm: the predefined G_LM [num_layers, H, dk, dk] for a predefined-G config (None for
    learned G; an "identity" config defaults to the identity).  It is a constant, not trained.
    metrics (float32 scalars): loss (masked CE), accuracy, total_loss (CE + DAG terms), tokens
    (real targets), lr (the learning rate optax applies in this update: `schedule` at optax's count of
    applied updates, which skipped steps do not advance), grad_norm (global norm before
    clipping), nonfinite (1.0 when the update was skipped as non-finite, see
    `StepOptions.nonfinite_guard`) and, with DAG, dag_A / dag_P / dag_G.
    With `mesh`, the step is jitted with in/out shardings (state by the rules, batch over
    ("data", "fsdp")).  donate: donate the input state's buffers (the caller must not reuse it).
    compiler_options: XLA options for `jax.jit` (e.g. {"xla_backend_optimization_level": 0} to
    compile faster in tests).  rules: entries replacing those of the one sharding rule table
    (`pldr_jax.partitioning.RULES`) for the state, the batch and the activations.
    backend: the resolved `pldr_jax.backend.BackendChoices` the step runs with (None: those of the
    mesh's platform, `backend.choices`); its remat, unroll_layers, kernels, head_chunk_bytes,
    attention_block (and full-sequence attention) fill the options left None.  The returned
    function's ``backend`` and ``opts`` attributes hold the resolved values (a compile-cache key).
    """
    if opts.use_dag and not cfg.learned_g:
        raise ValueError("DAG regularisation needs a learned-G model (custom_G_type=None): a predefined "
                         "G_LM is a constant and has no A_LM / A_P")
    backend = backend_for(backend, platform_of(mesh))   # the choices of the devices the step runs on
    opts = opts.resolved(backend)
    lopts = opts.loss_options(backend)
    K = opts.grad_accum
    table = None if rules is None else merged_rules(rules)

    def step(state: TrainState, batch, g_lm=None):
        if mesh is None:
            return _step(state, batch, g_lm)
        with activation_sharding(mesh, table):   # activations' logical sharding constraints (`partitioning`)
            return _step(state, batch, g_lm)

    def _step(state: TrainState, batch, g_lm=None):
        inputs, targets = batch["inputs"], batch["targets"]
        n_total = jnp.maximum(jnp.sum(targets != 0).astype(jnp.float32), 1.0)

        def micro(params, inp, tgt):
            def fn(p):
                t = loss_terms(cfg, p, inp, tgt, g_lm, lopts)
                return objective(t, n_total, opts.dag_coeffs, K), t
            (_, t), g = jax.value_and_grad(fn, has_aux=True)(params)
            return g, t

        if K == 1:
            grads, terms = micro(state.params, inputs, targets)
        else:
            xs = (_split_micro(inputs, K), _split_micro(targets, K))
            if mesh is not None:
                sh = NamedSharding(mesh, PartitionSpec(None, *batch_sharding(mesh).spec))
                xs = jax.lax.with_sharding_constraint(xs, (sh, sh))
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            t0 = jax.eval_shape(lambda: micro(state.params, xs[0][0], xs[1][0])[1])
            t0 = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), t0)

            def body(carry, x):
                g_acc, t_acc = carry
                g, t = micro(state.params, *x)
                return (jax.tree_util.tree_map(jnp.add, g_acc, g), jax.tree_util.tree_map(jnp.add, t_acc, t)), None

            (grads, terms), _ = jax.lax.scan(body, (zeros, t0), xs)
            terms = {k: (v / K if k in DAG_NAMES else v) for k, v in terms.items()}

        # the lr optax applies: its own count (skipped non-finite steps advance state.step, not it)
        lr = schedule(schedule_count(state.opt_state, state.step)) if schedule is not None else jnp.float32(jnp.nan)
        grad_norm = optax.tree.norm(grads)
        loss = terms["ce_sum"] / n_total
        metrics = {"loss": loss, "accuracy": terms["correct"] / n_total, "tokens": terms["count"],
                   "lr": jnp.asarray(lr, jnp.float32), "grad_norm": grad_norm}
        total = loss
        if opts.use_dag:
            for c, n in zip(opts.dag_coeffs, DAG_NAMES):
                metrics[n] = terms[n]
                total = total + c * terms[n]
        metrics["total_loss"] = total
        new_state, ok = apply_gradients_guarded(state, grads, tx, total, guard=opts.nonfinite_guard,
                                                grad_norm=grad_norm)
        metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    copts = dict(compiler_options) if compiler_options else None
    if mesh is None:
        jitted = jax.jit(step, donate_argnums=donate_argnums, compiler_options=copts)
    else:
        st_sh = state_shardings(cfg, tx, mesh, table)
        rep = replicated(mesh)
        b_sh = batch_sharding(mesh)
        jitted = jax.jit(step, in_shardings=(st_sh, {"inputs": b_sh, "targets": b_sh}, rep),
                         out_shardings=(st_sh, rep), donate_argnums=donate_argnums, compiler_options=copts)
    f = _with_optional_g(jitted)
    f.backend, f.opts = backend, opts
    return f


def _with_optional_g(jitted):
    """`f(a, b, g_lm=None)` over a jitted 3-argument function (jit's in_shardings need every
    positional argument); `.lower(...)` and `.jitted` stay available."""
    def f(a, b, g_lm=None):
        return jitted(a, b, g_lm)
    f.lower = lambda a, b, g_lm=None: jitted.lower(a, b, g_lm)
    f.jitted = jitted
    return f


def make_eval_step(cfg: PLDRConfig, *, opts: StepOptions = StepOptions(), mesh: Mesh | None = None,
                   rules: Mapping[str, Any] | None = None,
                   compiler_options: Mapping[str, Any] | None = None,
                   backend: BackendChoices | None = None) -> Callable:
    """A jitted `eval_step(params, batch, g_lm=None) -> {"ce_sum", "correct", "count"}` (sums over
    the batch; combine batches with `reduce_eval`).  backend, rules: as `make_train_step`."""
    backend = backend_for(backend, platform_of(mesh))
    eval_opts = dataclasses.replace(opts, remat=False, dag_coeffs=(0.0, 0.0, 0.0)).loss_options(backend)
    table = None if rules is None else merged_rules(rules)

    def step(params, batch, g_lm=None):
        if mesh is None:
            t = loss_terms(cfg, params, batch["inputs"], batch["targets"], g_lm, eval_opts)
        else:
            with activation_sharding(mesh, table):
                t = loss_terms(cfg, params, batch["inputs"], batch["targets"], g_lm, eval_opts)
        return {k: t[k] for k in ("ce_sum", "correct", "count")}

    copts = dict(compiler_options) if compiler_options else None
    if mesh is None:
        return _with_optional_g(jax.jit(step, compiler_options=copts))
    from .sharding import param_shardings
    b_sh = batch_sharding(mesh)
    rep = replicated(mesh)
    return _with_optional_g(jax.jit(step, in_shardings=(param_shardings(cfg, mesh, table),
                                                        {"inputs": b_sh, "targets": b_sh}, rep),
                                    out_shardings=rep, compiler_options=copts))


def reduce_eval(sums: list[Mapping[str, Any]]) -> dict[str, float]:
    """Combine eval_step outputs: {"val_loss", "val_accuracy", "val_perplexity", "val_tokens"}."""
    import math
    ce = sum(float(s["ce_sum"]) for s in sums)
    correct = sum(float(s["correct"]) for s in sums)
    n = sum(float(s["count"]) for s in sums)
    if n == 0:
        return {"val_loss": float("nan"), "val_accuracy": float("nan"), "val_perplexity": float("nan"),
                "val_tokens": 0}
    loss = ce / n
    return {"val_loss": loss, "val_accuracy": correct / n,
            "val_perplexity": math.exp(min(loss, 700.0)), "val_tokens": int(n)}
