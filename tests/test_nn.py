"""The linen wrapper holds the same params tree and computes the same outputs as `forward`."""

import jax
import jax.numpy as jnp
import numpy as np

import pldr_jax
from pldr_jax.nn import PLDRModule


def test_linen_module_matches_functional_forward():
    cfg = pldr_jax.PLDRConfig.preset("tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 6)), jnp.int32)
    module = PLDRModule(cfg)
    variables = module.init(jax.random.key(0), tokens)
    params = variables["params"]["pldr"]
    assert pldr_jax.count_params(params) == pldr_jax.count_params(cfg)
    out = module.apply(variables, tokens)
    np.testing.assert_array_equal(out.logits, pldr_jax.forward(cfg, params, tokens).logits)
