"""pldr_jax: PLDR-LLM (Power Law Decoder Representations) in JAX, exact to the authors' PyTorch code.

The public API is re-exported here; the subpackages hold the rest:
`ops` (pure math), `io` (checkpoint formats), `decode` (generation with KV- and G-cache),
`data` (sentencepiece + grain), `train` (sharded optax training, orbax checkpoints),
`analysis` (invariance of deductive outputs), `eval` (perplexity, multiple choice, lm-eval adapter),
`nnx` (the model as a Flax NNX module over the same functions: `pldr_jax.nnx.PLDRLLM`).
"""

from .config import PRESETS, PLDRConfig
from .decode import GenerateOutput, Sampler, generate, init_cache
from .decode.stream import stream_generate
from .decode.text import generate_text
from .g_sources import (drop_deep_net, external_g, identity_g, make_g, random_normal_g, random_uniform_g,
                        sweep_forward, transferred_g)
from .io import (load_g_lm_list, load_hf, load_model, load_torch_checkpoint, save_hf, save_model,
                 save_torch_checkpoint)
from .losses import dag_loss, dag_total, masked_loss
from .model import ForwardOutput, forward
from .params import (abstract_params, count_params, init_params, logical_axes, stack_layers,
                     unstack_layers)
from .train import TrainConfig, TrainResult, lr_schedule, make_optimizer  # the loop: pldr_jax.train.train

__all__ = [
    "PLDRConfig", "PRESETS",
    "init_params", "abstract_params", "count_params", "logical_axes", "stack_layers", "unstack_layers",
    "forward", "ForwardOutput", "masked_loss", "dag_loss", "dag_total",
    "load_torch_checkpoint", "save_torch_checkpoint", "load_g_lm_list", "load_hf", "save_hf",
    "load_model", "save_model",
    "Sampler", "generate", "GenerateOutput", "init_cache", "stream_generate", "generate_text",
    "identity_g", "random_normal_g", "random_uniform_g", "transferred_g", "external_g", "make_g",
    "sweep_forward", "drop_deep_net",
    "make_optimizer", "lr_schedule", "TrainConfig", "TrainResult",
]
