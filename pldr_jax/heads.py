"""Task heads over the PLDR-LLM decoder, as the authors' Hugging Face port defines them.

Three heads read the last decoder layer's hidden states (`model.forward(...).hidden`; the decoder
params need no LM output head "final"):

  * "seq-cls"   (`PldrllmForSequenceClassification`): a bias-free linear `score` [D, num_labels] on
    the hidden state of each row's last non-pad token (the rightmost token != pad_token_id, so left
    and right padding both work; with no pad id only a batch of one row is accepted, as theirs).
  * "token-cls" (`PldrllmForTokenClassification`): a linear `score` with bias on every position
    (their dropout is inactive at evaluation and is not applied here).
  * "qa"        (`PldrllmForQuestionAnswering`): a linear `qa_outputs` [D, 2] with bias -> start and
    end logits [B, L].

Losses are Hugging Face's `loss_function` for each class: sequence classification by `problem_type`
("regression" = MSE, "single_label_classification" = cross-entropy ignoring label -100,
"multi_label_classification" = BCE-with-logits; None picks by `num_labels` and the labels' dtype as
`ForSequenceClassificationLoss` does), token classification = cross-entropy ignoring -100,
question answering = mean of the start and end cross-entropies with positions clamped to [0, L] and
L ignored.

Head params: {"kernel": [D, n], "bias": [n]} (no "bias" for seq-cls), initialised as the port's
`_init_weights` (Xavier-uniform kernel, zero bias); `head_logical_axes` names their sharding axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .config import PLDRConfig
from .model import forward

TASKS = ("seq-cls", "token-cls", "qa")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
ARCHITECTURES = {"seq-cls": "PldrllmForSequenceClassification",
                 "token-cls": "PldrllmForTokenClassification",
                 "qa": "PldrllmForQuestionAnswering"}
TASK_OF_ARCHITECTURE = {v: k for k, v in ARCHITECTURES.items()}
HEAD_NAMES = {"seq-cls": "score", "token-cls": "score", "qa": "qa_outputs"}   # the port's module names
IGNORE_INDEX = -100

__all__ = ["TASKS", "PROBLEM_TYPES", "ARCHITECTURES", "HeadConfig", "init_head", "head_logical_axes",
           "last_token_index", "head_logits", "apply_head", "head_loss", "pick_problem_type"]


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """One task head (hashable: a static argument of jitted functions).

    task: "seq-cls" | "token-cls" | "qa".  num_labels: outputs of the head (2 for "qa": start, end).
    problem_type: for "seq-cls", one of `PROBLEM_TYPES` or None (picked from num_labels and the
    labels' dtype at the loss, as Hugging Face does).  pad_token_id: the id that marks padding for
    the seq-cls pooling (None: no padding, batch of one only).  labels: the label names in id order
    (id2label), () when unnamed.
    """
    task: str
    num_labels: int
    problem_type: str | None = None
    pad_token_id: int | None = 0
    labels: tuple[str, ...] = ()

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {list(TASKS)}")
        if self.task == "qa" and self.num_labels != 2:
            raise ValueError(f"a question-answering head has 2 outputs (start, end), got num_labels={self.num_labels}")
        if int(self.num_labels) < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.problem_type is not None:
            if self.task != "seq-cls":
                raise ValueError(f"problem_type applies to sequence classification only (task {self.task!r})")
            if self.problem_type not in PROBLEM_TYPES:
                raise ValueError(f"unknown problem_type {self.problem_type!r}; choose from {list(PROBLEM_TYPES)}")
        if self.labels and len(self.labels) != self.num_labels:
            raise ValueError(f"{len(self.labels)} label names for num_labels={self.num_labels}")

    @property
    def has_bias(self) -> bool:
        return self.task != "seq-cls"

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.task]

    def id2label(self) -> dict[int, str]:
        return {i: (self.labels[i] if self.labels else f"LABEL_{i}") for i in range(self.num_labels)}


def init_head(cfg: PLDRConfig, hcfg: HeadConfig, key: jax.Array) -> dict:
    """Fresh head params as the port's `_init_weights`: Xavier-uniform kernel, zero bias."""
    D, n = cfg.d_model, hcfg.num_labels
    dtype = jnp.dtype(cfg.param_dtype)
    bound = math.sqrt(6.0 / (D + n))
    head = {"kernel": jax.random.uniform(key, (D, n), dtype, -bound, bound)}
    if hcfg.has_bias:
        head["bias"] = jnp.zeros((n,), dtype)
    return head


def head_logical_axes(hcfg: HeadConfig) -> dict:
    """Logical sharding axes of the head params: hidden as the model's "embed"; the few labels
    replicated, under the rule table's "norm" name (mapped to no mesh axis)."""
    axes = {"kernel": ("embed", "norm")}
    if hcfg.has_bias:
        axes["bias"] = ("norm",)
    return axes


def last_token_index(tokens: jax.Array, pad_token_id: int | None) -> jax.Array:
    """[B] index of each row's rightmost non-pad token (the port's rule: argmax of
    position * (token != pad), so a row of pads gives 0).  No pad id: the last position, and only
    a batch of one row (the port's ValueError otherwise)."""
    B, L = tokens.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        return jnp.full((B,), L - 1, jnp.int32)
    pos = jnp.arange(L, dtype=jnp.int32) * (tokens != pad_token_id).astype(jnp.int32)
    return jnp.argmax(pos, axis=-1).astype(jnp.int32)


def apply_head(hcfg: HeadConfig, head: Mapping, hidden: jax.Array, tokens: jax.Array):
    """Head outputs from hidden states [B, L, D]: seq-cls logits [B, n]; token-cls logits
    [B, L, n]; qa (start_logits, end_logits) each [B, L].  float32."""
    h = hidden.astype(jnp.float32)
    k = jnp.asarray(head["kernel"], jnp.float32)
    if hcfg.task == "seq-cls":
        idx = last_token_index(tokens, hcfg.pad_token_id)
        pooled = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
        return pooled @ k
    out = h @ k + jnp.asarray(head["bias"], jnp.float32)
    if hcfg.task == "token-cls":
        return out
    return out[..., 0], out[..., 1]


def head_logits(cfg: PLDRConfig, hcfg: HeadConfig, params: Mapping, head: Mapping, tokens: jax.Array,
                g_lm: jax.Array | None = None, **forward_kw):
    """tokens [B, L] int (0 = pad for the decoder's attention mask) -> the head's outputs
    (`apply_head`), the decoder run by `model.forward` (its keywords pass through)."""
    if "final" in params:
        params = {k: v for k, v in params.items() if k != "final"}
    out = forward(cfg, params, tokens, g_lm, **forward_kw)
    return apply_head(hcfg, head, out.hidden, tokens)


# --------------------------------------------------------------------------- losses
def pick_problem_type(hcfg: HeadConfig, labels) -> str:
    """`ForSequenceClassificationLoss`'s choice: the configured one, else regression for one
    label, single-label for integer labels, multi-label otherwise."""
    if hcfg.problem_type is not None:
        return hcfg.problem_type
    if hcfg.num_labels == 1:
        return "regression"
    if jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def _ce(logits: jax.Array, labels: jax.Array, ignore: int, weights: jax.Array | None):
    """Mean cross-entropy over labels != ignore (times optional per-item weights); (sum, count)."""
    logits = logits.astype(jnp.float32)
    keep = labels != ignore
    safe = jnp.where(keep, labels, 0).astype(jnp.int32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]
    w = keep.astype(jnp.float32) if weights is None else keep * weights.astype(jnp.float32)
    return (nll * w).sum(), w.sum()


def head_loss(hcfg: HeadConfig, outputs, labels, *, example_mask: jax.Array | None = None,
              problem_type: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(loss, count): Hugging Face's loss for the head's outputs (`apply_head`) and labels.

    seq-cls labels: [B] int (single-label), [B, n] float (multi-label), [B] or [B, n] float
    (regression); token-cls labels [B, L] int (-100 = ignored); qa labels (start [B], end [B]).
    example_mask [B] (bool/float): rows that count (dummy rows of a padded batch get 0); None =
    every row, which gives exactly Hugging Face's value.  count: the number of terms averaged
    (for weighting accumulated batches).  0 loss when nothing counts."""
    em = None if example_mask is None else jnp.asarray(example_mask, jnp.float32)
    if hcfg.task == "qa":
        start_logits, end_logits = outputs
        start, end = labels
        L = start_logits.shape[1]
        s_sum, s_n = _ce(start_logits, jnp.clip(start, 0, L), L, em)
        e_sum, e_n = _ce(end_logits, jnp.clip(end, 0, L), L, em)
        loss = (s_sum / jnp.maximum(s_n, 1.0) + e_sum / jnp.maximum(e_n, 1.0)) / 2
        return loss, (s_n + e_n) / 2
    if hcfg.task == "token-cls":
        w = None if em is None else jnp.broadcast_to(em[:, None], labels.shape)
        s, n = _ce(outputs, labels, IGNORE_INDEX, w)
        return s / jnp.maximum(n, 1.0), n
    pt = problem_type or pick_problem_type(hcfg, labels)
    logits = outputs.astype(jnp.float32)
    B = logits.shape[0]
    if pt == "single_label_classification":
        s, n = _ce(logits, labels, IGNORE_INDEX, em)
        return s / jnp.maximum(n, 1.0), n
    y = jnp.asarray(labels, jnp.float32).reshape(B, -1)
    if pt == "regression":
        err = (logits.reshape(B, -1) - y) ** 2
    else:   # multi_label_classification: BCE with logits
        err = jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    w = jnp.ones((B,), jnp.float32) if em is None else em
    n = w.sum() * err.shape[1]
    return (err * w[:, None]).sum() / jnp.maximum(n, 1.0), n


def labels_to_numpy(hcfg: HeadConfig, labels) -> Any:
    """Labels as numpy arrays with the dtype the loss expects (int32 ids, float32 targets)."""
    if hcfg.task == "qa":
        return tuple(np.asarray(x, np.int32) for x in labels)
    arr = np.asarray(labels)
    if hcfg.task == "token-cls" or pick_problem_type(hcfg, arr) == "single_label_classification":
        return arr.astype(np.int32)
    return arr.astype(np.float32)
