"""TrainState: everything the training loop carries from one step to the next (and checkpoints)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ..config import PLDRConfig
from ..params import init_params

__all__ = ["TrainState", "create_train_state"]


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar, the number of training steps run so far (batches consumed; a skipped
    non-finite step counts here but not in optax's count, see `optimizer.schedule_count`);
    params: the parameter pytree (float32 master weights); opt_state: the optax state; rng: raw
    uint32 PRNG key data [2] (`jax.random.key_data`), split once per step for step-level
    randomness (stored raw so that checkpoints and shardings treat it as a plain array)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    def apply_gradients(self, grads, tx: optax.GradientTransformation) -> "TrainState":
        """One optimiser update; returns the new state (step + 1)."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

    def next_rng(self) -> tuple["TrainState", jax.Array]:
        """(state with an advanced rng, a fresh typed key for this step)."""
        k, sub = jax.random.split(jax.random.wrap_key_data(self.rng))
        return self.replace(rng=jax.random.key_data(k)), sub


def create_train_state(cfg: PLDRConfig, tx: optax.GradientTransformation, seed: int | jax.Array = 0,
                       params: Any = None) -> TrainState:
    """A fresh state: `init_params(cfg, key(seed))` (or the given params; the same numbers as
    `pldr_jax.init_params(cfg, jax.random.key(seed))`), `tx.init`, step 0, rng derived from seed.

    Pure and jittable (seed may be traced); `sharding.init_train_state` jits it with
    `out_shardings` so the full model is never materialised on one device.
    """
    key = jax.random.key(seed) if not (isinstance(seed, jax.Array) and
                                       jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)) else seed
    k_rng = jax.random.fold_in(key, 0x5EED)
    if params is None:
        params = init_params(cfg, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(k_rng))
