"""Training losses: masked cross-entropy / accuracy, the DAG regulariser of deductive outputs, and the
training objective's sums over one (micro-)batch (`loss_terms`), shared by the jitted train step
(`pldr_jax.train.step`) and the NNX model (`pldr_jax.nnx`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .config import PLDRConfig
from .layer import SequenceAttention
from .model import forward, remat_policy
from .ops.cross_entropy import head_cross_entropy
from .ops.deductive import dag
from .params import fuse_params, unstack_layers
from .partitioning import splits

__all__ = ["masked_loss", "dag_loss", "dag_total", "DAG_NAMES", "LossOptions", "loss_terms", "objective"]

DAG_NAMES = ("dag_A", "dag_P", "dag_G")


def masked_loss(logits: jax.Array, targets: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Masked cross-entropy and accuracy over targets != pad_id (as the reference).

    logits [B, L, V], targets [B, L] int.  Returns (mean CE over real targets, accuracy), float32
    scalars; both are 0 when there is no real target.
    """
    logits = logits.astype(jnp.float32)
    real = (targets != pad_id).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    n = jnp.maximum(real.sum(), 1.0)
    loss = ((logz - tgt) * real).sum() / n
    acc = ((jnp.argmax(logits, -1) == targets).astype(jnp.float32) * real).sum() / n
    return loss, acc


def dag_loss(deductive: dict) -> dict:
    """DAG values {"A_LM", "A_P", "G_LM"} of deductive outputs [layers, B, H, dk, dk] (or any
    leading axes): mean over layers, batch and heads of |log(trace(expm(M * M)) / dk)|."""
    return {k: dag(deductive[k]) for k in ("A_LM", "A_P", "G_LM") if k in deductive}


def dag_total(deductive: dict, coeffs: tuple[float, float, float]) -> jax.Array:
    """c_A * dag(A_LM) + c_P * dag(A_P) + c_G * dag(G_LM); zero coefficients skip their expm."""
    total = jnp.float32(0.0)
    for c, k in zip(coeffs, ("A_LM", "A_P", "G_LM")):
        if c:
            total = total + c * dag(deductive[k])
    return total


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """How `loss_terms` runs (resolved values; `train.step.StepOptions` derives them from the backend
    choices).  dag_coeffs: (c_A, c_P, c_G); pad_aware_A: mask padding out of A; remat: the layers'
    rematerialisation ("none" | "dots" | "full"); unroll_layers: per-layer Python loop (True) or
    `lax.scan`; kernels: "xla" | "cpu" (`ops.layers.linear`); head_chunk_bytes: the head +
    cross-entropy over sequence chunks of at most this many bytes of float32 logits (0 = whole);
    attention: the full-sequence attention (a mask-less `layer.SequenceAttention`, or a fused
    subclass; `strategies.attention_strategy`)."""
    dag_coeffs: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pad_aware_A: bool = False
    remat: str = "none"
    unroll_layers: bool = False
    kernels: str = "xla"
    head_chunk_bytes: int = 0
    attention: Any = SequenceAttention()

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_policy(self.remat))

    @property
    def use_dag(self) -> bool:
        return any(self.dag_coeffs)


def loss_terms(cfg: PLDRConfig, params: Any, inputs: jax.Array, targets: jax.Array, g_lm=None,
               opts: LossOptions = LossOptions()) -> dict[str, jax.Array]:
    """Sums over one (micro-)batch: {"ce_sum", "correct", "count"} and, with DAG, the DAG values
    {"dag_A", "dag_P", "dag_G"} (means over layers, batch, heads; 0 where the coefficient is 0)."""
    if not isinstance(opts, LossOptions):       # a train.step.StepOptions
        opts = opts.loss_options()
    # fused projections (one matmul where the layer has two or three reading the same input); the
    # gradients flow back through the concatenation to the stored (unfused) parameters.  Not for
    # stacked (scanned) layers with the "xla" kernels (the accelerator default): the concatenation
    # runs on the whole stack, outside the scan -- a fused copy of every layer's q/k/v and w1/w2
    # weights plus their stacked fused gradients (experiments/README.md, "TPU plan"); nor with
    # heads / FFN width split over a tensor axis: concatenating weights split on their output axis
    # (and splitting the fused activations again) reshards them by all-to-all, forward and backward.
    run = unstack_layers(params) if opts.unroll_layers else params
    if (opts.unroll_layers or opts.kernels == "cpu") and not (splits("heads") or splits("mlp")):
        run = fuse_params(run)
    out = forward(cfg, run, inputs, g_lm, pad_aware_A=opts.pad_aware_A, remat=opts.remat, kernels=opts.kernels,
                  attention=opts.attention)
    # the output head again, fused with the loss (out.logits is then unused and compiled away)
    nll, correct = head_cross_entropy(out.hidden, params["final"]["kernel"], params["final"]["bias"], targets,
                                      kernels=opts.kernels, max_chunk_bytes=opts.head_chunk_bytes or None)
    real = (targets != 0).astype(jnp.float32)
    terms = {"ce_sum": jnp.sum(nll * real), "correct": jnp.sum(correct * real), "count": jnp.sum(real)}
    if opts.use_dag:
        keys = ("A_LM", "A_P", "G_LM")
        used = {k: out.deductive[k] for c, k in zip(opts.dag_coeffs, keys) if c}
        vals = dag_loss(used)
        for name, k in zip(DAG_NAMES, keys):
            terms[name] = vals.get(k, jnp.float32(0.0))
    return terms


def objective(terms: dict, n_total, dag_coeffs: tuple[float, float, float], micro_batches: int = 1) -> jax.Array:
    """The training objective of one micro-batch's `loss_terms`: CE sum / n_total (the real targets
    of the whole batch) + sum_i c_i dag_i / micro_batches."""
    obj = terms["ce_sum"] / n_total
    if any(dag_coeffs):
        obj = obj + sum(c * terms[n] for c, n in zip(dag_coeffs, DAG_NAMES)) / micro_batches
    return obj
