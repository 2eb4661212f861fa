"""Pure jnp building blocks of PLDR-LLM (no parameters held, shapes in docstrings)."""

from .attention import causal_padding_mask, plga_attention
from .cross_entropy import head_cross_entropy
from .deductive import dag, derive_g
from .layers import dense, glu, layer_norm, linear
from .metric import metric_learner, metric_tensor
from .rope import apply_rope, rope_angles, rope_tables

__all__ = ["apply_rope", "rope_angles", "rope_tables", "metric_tensor", "metric_learner", "derive_g", "dag",
           "plga_attention", "causal_padding_mask", "layer_norm", "linear", "dense", "glu", "head_cross_entropy"]
