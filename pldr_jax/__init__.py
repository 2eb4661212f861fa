"""pldr_jax: PLDR-LLM (Power Law Decoder Representations) in JAX, exact to the authors' PyTorch code.

Public API (see README.md):
    PLDRConfig, init_params, forward, masked_loss, dag_loss, load_torch_checkpoint, ...
"""

from .config import PRESETS, PLDRConfig
from .losses import dag_loss, dag_total, masked_loss
from .model import ForwardOutput, forward
from .params import (abstract_params, count_params, init_params, logical_axes, stack_layers,
                     unstack_layers)

__all__ = ["PLDRConfig", "PRESETS", "init_params", "abstract_params", "count_params", "logical_axes",
           "stack_layers", "unstack_layers", "forward", "ForwardOutput", "masked_loss", "dag_loss",
           "dag_total"]

# Optional parts are imported lazily-but-eagerly here as they land; each module is self-contained.
try:  # noqa: SIM105
    from .io import load_g_lm_list, load_hf, load_torch_checkpoint, save_hf, save_torch_checkpoint  # noqa: F401
    __all__ += ["load_torch_checkpoint", "save_torch_checkpoint", "load_g_lm_list", "load_hf", "save_hf"]
except ImportError:  # pragma: no cover - io package not yet present
    pass
