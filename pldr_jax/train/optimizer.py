"""The reference's optimiser: gradient clipping, then AdamW with linear warm-up + cosine decay.

Reference recipe (authors' PyTorch training code, docs/model.md "Pretraining recipe")::

    clip_grad_value_(params, 1.0)
    AdamW(lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)     # decoupled decay on every param
    LambdaLR: factor(s) = s / warmup                                  for s <= warmup
              factor(s) = (1 - alpha) * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup))) + alpha
              with s = min(step, total)

The k-th optimiser update (k = 0, 1, ...) uses ``lr * factor(k)``: the first update has learning
rate 0: the Adam moments advance but the parameters stay unchanged (the decoupled weight decay
is scaled by the learning rate too).  optax calls the schedule with the number of
updates done so far, which is exactly ``k`` (`schedule_count`; skipped non-finite steps do not
count).

``optax.adamw`` computes ``p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``, which is torch's
``p * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps)`` term for term.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

__all__ = ["lr_schedule", "reference_lr_factor", "make_optimizer", "schedule_count"]


def reference_lr_factor(step: int | float, warmup_steps: int, total_steps: int, alpha: float) -> float:
    """The reference's LambdaLR factor at `step` in float64 (a plain-Python mirror, for checks)."""
    total, warmup, alpha, step = float(total_steps), float(warmup_steps), float(alpha), float(step)
    step = min(step, total)
    if step <= warmup:
        return step / warmup if warmup > 0 else 1.0
    decay_rate = total - warmup
    return (1 - alpha) * 0.5 * (1 + math.cos(math.pi * ((step - warmup) / decay_rate))) + alpha


def _check(learning_rate, warmup_steps, total_steps, alpha):
    if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate < 0:
        raise ValueError(f"learning_rate must be a finite number >= 0, got {learning_rate!r}")
    for name, v in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def lr_schedule(learning_rate: float = 1e-3, warmup_steps: int = 2000, total_steps: int = 250_000,
                alpha: float = 0.1) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `alpha * learning_rate` at
    `total_steps` (constant after), as the reference's `LinearWarmupCosineLRSchedule`.

    Returns an optax schedule `count -> lr` (float32) where `count` is the number of updates
    already applied; `schedule(0) == 0` when warmup_steps > 0.

    Built from optax's pieces, `optax.join_schedules([warm-up, optax.cosine_decay_schedule(lr,
    total - warmup, alpha)], [warmup])`: the structure of `optax.warmup_cosine_decay_schedule`
    (which it equals to 1e-7 x lr, tested) with the warm-up written ``lr * count / warmup``, the
    reference's form.  optax's `linear_schedule` computes ``lr - lr * (1 - count / warmup)``, which
    cancels: at count 1 of 2000 warm-up steps its float32 value is 1e-4 off relative (the reference
    computes the factor in float64); this form is exact to float32 rounding at every count.
    """
    _check(learning_rate, warmup_steps, total_steps, alpha)
    lr, w = float(learning_rate), int(warmup_steps)

    def warmup(count):
        return lr * (jnp.asarray(count, jnp.float32) / float(w))

    if w == total_steps:  # all warm-up: the reference holds lr * min(step, total) / warmup = lr after
        return optax.join_schedules([warmup, optax.constant_schedule(lr)], [w])
    decay = optax.cosine_decay_schedule(lr, total_steps - w, alpha)
    if w == 0:
        return decay
    return optax.join_schedules([warmup, decay], [w])


def schedule_count(opt_state, default=None):
    """The number of updates optax applied: the `count` that `make_optimizer`'s learning-rate
    schedule reads (its `ScaleByScheduleState`).

    A skipped non-finite step (`faults.apply_gradients_guarded`) advances `TrainState.step` (the
    batches consumed) but not this count, so the learning rate of the next update is
    `schedule(schedule_count(opt_state))`, not `schedule(state.step)`.  Returns `default` when
    `opt_state` holds no schedule state (a transformation without a schedule) and raises when it
    holds several (ambiguous).
    """
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
    found = [x.count for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_sched) if is_sched(x)]
    if not found:
        return default
    if len(found) > 1:
        raise ValueError(f"the optimiser state holds {len(found)} learning-rate schedules; which one the "
                         f"logged lr should follow is ambiguous")
    return found[0]


def make_optimizer(learning_rate: float = 1e-3, warmup_steps: int = 2000, total_steps: int = 250_000,
                   alpha: float = 0.1, weight_decay: float = 0.1, clip_value: float | None = 1.0, *,
                   clip_norm: float | None = None, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-5) -> optax.GradientTransformation:
    """The reference's optimiser as one optax transformation.

    `clip_value` clips every gradient element to [-clip_value, clip_value] (the reference's
    `clip_grad_value_(1.0)`); `clip_norm` clips by global norm instead (or as well, applied after
    the value clip).  None disables a clip.  Then AdamW(b1, b2, eps, weight_decay) with
    `lr_schedule(learning_rate, warmup_steps, total_steps, alpha)`; weight decay applies to every
    parameter (as torch's AdamW on `model.parameters()`).
    """
    if clip_value is not None and not (isinstance(clip_value, (int, float)) and clip_value > 0):
        raise ValueError(f"clip_value must be > 0 or None, got {clip_value!r}")
    if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    schedule = lr_schedule(learning_rate, warmup_steps, total_steps, alpha)
    parts = []
    if clip_value is not None:
        parts.append(optax.clip(float(clip_value)))
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(float(clip_norm)))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=float(weight_decay)))
    return optax.chain(*parts)
