"""The fine-tuning steps: each task's objective, the trained / frozen split, and the jitted train and
eval steps on the pretraining mesh with the one partitioning rule table.

The trained tree is a `train.state.TrainState`'s params: the decoder's params plus, for a task head,
"head" (the head's params); SFT trains the whole LM, "final" included -- pretraining's own layout,
so `pldr-jax generate WORKDIR` loads an SFT run.  Every leaf is placed by its logical axes
(`params.logical_axes`, `heads.head_logical_axes`) through `partitioning.RULES` (overrides:
`rules`), optimiser moments like their parameters, the batch split over ("data", "fsdp"), and the
activations constrained as in pretraining (`partitioning.activation_sharding`).

Frozen leaves (`frozen_mask`: the decoder with ``freeze_decoder``; the metric learner that derives
G_LM -- ``metric_norm``, ``metric_res``, ``plga`` -- with ``fixed_g``) are cut from the gradient
(`jax.lax.stop_gradient`: no backward pass through them) and updated by `optax.set_to_zero` (no
optimiser moments, no weight decay): they stay bitwise as loaded.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from ..config import PLDRConfig
from ..heads import HeadConfig, apply_head, head_logical_axes, head_loss
from ..losses import masked_loss
from ..model import forward
from ..params import logical_axes
from ..partitioning import activation_sharding, merged_rules
from ..train.faults import apply_gradients_guarded
from ..train.optimizer import lr_schedule, make_optimizer, schedule_count
from ..train.setup import CompiledSteps
from ..train.sharding import batch_sharding, replicated, state_shardings_for, tree_partition_specs
from ..train.state import TrainState, create_train_state

__all__ = ["METRIC_LEARNER", "sft_targets", "sft_loss", "task_loss", "frozen_mask", "finetune_optimizer",
           "param_shardings", "abstract_state", "init_state", "make_steps"]

#: the per-layer params of the metric learner that derives G_LM (unused when G_LM is given)
METRIC_LEARNER = ("metric_norm", "metric_res", "plga")


def sft_targets(tokens: jax.Array, response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(inputs [B, L-1], targets [B, L-1]) of next-token SFT: the target of position t is
    tokens[t + 1] where response_mask[t + 1], else 0 (masked: prompt and padding targets)."""
    return tokens[:, :-1], jnp.where(response_mask[:, 1:], tokens[:, 1:], 0)


def sft_loss(cfg: PLDRConfig, params, tokens: jax.Array, response_mask: jax.Array, g_lm=None):
    """(mean next-token cross-entropy over response targets only, their count)."""
    inputs, targets = sft_targets(tokens, response_mask)
    logits = forward(cfg, params, inputs, g_lm).logits
    return masked_loss(logits, targets, pad_id=0)[0], jnp.sum(targets != 0)


def _labels(task: str, batch: Mapping[str, jax.Array]):
    return (batch["start"], batch["end"]) if task == "qa" else batch["labels"]


def task_loss(cfg: PLDRConfig, hcfg: HeadConfig | None, task: str, params, batch, g_lm=None):
    """(loss, count, head outputs or None) of one batch {"inputs", "mask" (real rows), labels: "labels"
    or QA's "start" / "end"}: SFT's response loss, else the head's Hugging Face loss."""
    decoder = {k: v for k, v in params.items() if k != "head"}
    if task == "sft":
        loss, n = sft_loss(cfg, decoder, batch["inputs"], batch["labels"], g_lm)
        return loss, n, None
    hidden = forward(cfg, decoder, batch["inputs"], g_lm).hidden
    out = apply_head(hcfg, params["head"], hidden, batch["inputs"])
    loss, n = head_loss(hcfg, out, _labels(task, batch), example_mask=batch["mask"])
    return loss, n, out


def frozen_mask(params, *, freeze_decoder: bool = False, fixed_g: bool = False):
    """A tree like `params` of bools, True = frozen (see the module docstring); the head is trained."""
    def frozen(path, _):
        top = path[0].key
        if top == "head":
            return False
        if freeze_decoder:
            return True
        return bool(fixed_g and top == "layers" and len(path) > 1 and path[1].key in METRIC_LEARNER)
    return jax.tree_util.tree_map_with_path(frozen, params)


def finetune_optimizer(learning_rate: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                       weight_decay: float, clip_norm: float | None, frozen=None):
    """(tx, schedule): the project optimiser with the authors' fine-tuning recipe (global-norm
    clipping as the Hugging Face Trainer, AdamW with its betas / eps, warm-up then cosine to
    `min_lr_ratio` x lr); frozen leaves (a `frozen_mask`) get zero updates."""
    tx = make_optimizer(learning_rate, warmup_steps, total_steps, alpha=min_lr_ratio, weight_decay=weight_decay,
                        clip_value=None, clip_norm=clip_norm, b2=0.999, eps=1e-8)
    if frozen is not None and any(jax.tree_util.tree_leaves(frozen)):
        labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, lr_schedule(learning_rate, warmup_steps, total_steps, min_lr_ratio)


def param_shardings(cfg: PLDRConfig, hcfg: HeadConfig | None, params, mesh: Mesh,
                    rules: Mapping[str, Any] | None = None):
    """NamedShardings of the trained tree (decoder by `params.logical_axes`, head by its own)."""
    axes = logical_axes(cfg)
    tree_axes = {k: (head_logical_axes(hcfg) if k == "head" else axes[k]) for k in params}
    specs = tree_partition_specs(tree_axes, params, mesh, rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def _state_shardings(tx, params, p_sh, mesh):
    abstract = jax.eval_shape(lambda p: create_train_state(None, tx, 0, params=p), params)
    return abstract, state_shardings_for(tx, abstract, p_sh, mesh)


def abstract_state(tx, params, p_sh, mesh) -> TrainState:
    """The TrainState's shapes with their target shardings (the restore target of a resume)."""
    abstract, sh = _state_shardings(tx, params, p_sh, mesh)
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)


def init_state(tx, params, p_sh, mesh, seed: int) -> TrainState:
    """The step-0 TrainState of `params` (float32 master weights), placed on `mesh`."""
    params = jax.device_put(jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params), p_sh)
    _, sh = _state_shardings(tx, params, p_sh, mesh)
    return jax.jit(lambda p: create_train_state(None, tx, seed, params=p), in_shardings=(p_sh,),
                   out_shardings=sh)(params)


def make_steps(cfg: PLDRConfig, hcfg: HeadConfig | None, task: str, tx, schedule: Callable, params, p_sh,
               mesh: Mesh, example_batch: Mapping[str, Any], frozen=None, *, nonfinite_guard: bool = True,
               rules: Mapping[str, Any] | None = None) -> CompiledSteps:
    """The jitted steps with in / out shardings on `mesh`:

    train_step(state, batch, g_lm) -> (state, metrics {"loss", "tokens", "lr", "grad_norm",
    "nonfinite"}) -- the step of `train.steploop.run_steps` (non-finite updates are skipped as in
    pretraining, `train.faults`); eval_step(params, batch, g_lm) -> {"loss_sum", "count",
    "outputs"} (the head's outputs, replicated; none for SFT)."""
    table = None if rules is None else merged_rules(rules)
    frozen = frozen if frozen is not None else jax.tree_util.tree_map(lambda _: False, params)
    rep = replicated(mesh)
    b_sh = {k: batch_sharding(mesh, jnp.ndim(v)) for k, v in example_batch.items()}
    _, st_sh = _state_shardings(tx, params, p_sh, mesh)

    def objective(p, batch, g_lm):
        p = jax.tree_util.tree_map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, frozen)
        return task_loss(cfg, hcfg, task, p, batch, g_lm)[0]

    def train_step(state: TrainState, batch, g_lm=None):
        with activation_sharding(mesh, table):
            loss, grads = jax.value_and_grad(objective)(state.params, batch, g_lm)
            lr = schedule(schedule_count(state.opt_state, state.step))
            grad_norm = optax.tree.norm(grads)
            new_state, ok = apply_gradients_guarded(state, grads, tx, loss, guard=nonfinite_guard, grad_norm=grad_norm)
        real = batch["inputs"] != 0
        tokens = jnp.sum(real & (batch["mask"][:, None] > 0))
        metrics = {"loss": loss, "tokens": tokens.astype(jnp.float32), "lr": jnp.asarray(lr, jnp.float32),
                   "grad_norm": grad_norm, "nonfinite": 1.0 - ok.astype(jnp.float32)}
        return new_state, metrics

    def eval_step(params, batch, g_lm=None):
        with activation_sharding(mesh, table):
            loss, n, out = task_loss(cfg, hcfg, task, params, batch, g_lm)
        n = jnp.asarray(n, jnp.float32)
        return {"loss_sum": loss * n, "count": n, "outputs": out}

    jit_train = jax.jit(train_step, in_shardings=(st_sh, b_sh, rep), out_shardings=(st_sh, rep),
                        donate_argnums=(0,))
    jit_eval = jax.jit(eval_step, in_shardings=(p_sh, b_sh, rep), out_shardings=rep)
    return CompiledSteps(tx, schedule, lambda s, b, g=None: jit_train(s, b, g), lambda p, b, g=None: jit_eval(p, b, g))
