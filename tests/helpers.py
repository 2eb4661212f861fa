"""Helpers shared by several test modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import abstract_params


def fast_params(cfg, seed=0):
    """Random parameters with the model's structure (numpy; much faster than compiling init_params)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(s.shape, jnp.float32)
        if "embedding" in name:
            return jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
        if "bias" in name or name.endswith("['b']") or name.endswith("['ba']"):
            return jnp.asarray(0.02 * rng.standard_normal(s.shape), jnp.float32)
        if "plga" in name:  # W, P, a: the reference's xavier-normal scale
            return jnp.asarray(0.15 * rng.standard_normal(s.shape), jnp.float32)
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[-2]), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))
