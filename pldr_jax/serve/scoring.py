"""Prompt log-probabilities (OpenAI ``echo`` + ``logprobs``; lm-eval's ``local-completions``).

A prompt's token i (i >= 1) is scored by one pass of `model.forward` over the prompt less its last
token, with A over every token of that pass (pad-aware): what ``pldr-jax eval harness`` computes
for a context/continuation split of the prompt in its default ``"full"`` mode
(`eval.multiple_choice`: input ``(context + continuation)[:-1]``).  PLDR's metric tensor A sums over
the pass, so a prompt token is never an input of its own score.  Lengths are padded to the scorer's
power-of-two buckets (`eval.multiple_choice.bucket_length`): one compilation per bucket.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig
from ..eval.multiple_choice import bucket_length
from ..model import forward
from ..ops.layers import linear
from .slots import TOP_LOGPROBS

__all__ = ["prompt_logprobs"]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score(cfg: PLDRConfig, params, inputs, targets, g_lm):
    """inputs, targets [1, L] -> log p(targets) [1, L], top ids [1, L, K], top log p [1, L, K]."""
    hidden = forward(cfg, params, inputs, g_lm, pad_aware_A=True).hidden
    logp = jax.nn.log_softmax(linear(params["final"], hidden).astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], top_ids, top_lp


def prompt_logprobs(cfg: PLDRConfig, params, prompt, g_lm=None):
    """(log p [n - 1], top ids [n - 1, K], top log p [n - 1, K]) of prompt tokens 1 .. n-1 (see the
    module docstring); empty arrays for a one-token prompt.  params: the model's (stacked or
    per-layer); g_lm: None or a fixed G_LM [num_layers, 1, H, dk, dk]."""
    ids = [int(t) for t in prompt]
    n = len(ids)
    if n < 2:
        return np.zeros((0,), np.float32), np.zeros((0, TOP_LOGPROBS), np.int32), np.zeros((0, TOP_LOGPROBS),
                                                                                            np.float32)
    L = bucket_length(n - 1, cfg.max_seq_len)
    inputs = np.zeros((1, L), np.int32)
    targets = np.zeros((1, L), np.int32)
    inputs[0, :n - 1] = ids[:-1]
    targets[0, :n - 1] = ids[1:]
    lp, top_ids, top_lp = jax.device_get(_score(cfg, params, jnp.asarray(inputs), jnp.asarray(targets), g_lm))
    return lp[0, :n - 1], top_ids[0, :n - 1], top_lp[0, :n - 1]
