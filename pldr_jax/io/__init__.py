"""Checkpoint I/O: reference `.pth`/`.npz` state dicts, the authors' Hugging Face folders, G lists.

Nothing here executes pickled code: `.pth`/`.bin` files are read with a restricted unpickler that
only rebuilds tensors (see `torch_pickle`).  torch itself is never needed.
"""

from .hf import HFMeta, hf_config_to_pldr, load_hf, load_hf_meta, pldr_to_hf_config, read_hf_state_dict, save_hf
from .loading import detect_format, load_model, save_model
from .safetensors_io import read_safetensors
from .state_dict import (expected_state_dict_shapes, load_g_lm_list, load_state_dict_file,
                         load_torch_checkpoint, params_to_state_dict, save_torch_checkpoint,
                         state_dict_to_params)
from .torch_pickle import (UnsafePickleError, load_torch_file, load_torch_state_dict, save_torch_file,
                           save_torch_state_dict)

__all__ = [
    "UnsafePickleError", "load_torch_file", "load_torch_state_dict", "save_torch_file",
    "save_torch_state_dict",
    "state_dict_to_params", "params_to_state_dict", "expected_state_dict_shapes",
    "load_state_dict_file", "load_torch_checkpoint", "save_torch_checkpoint", "load_g_lm_list",
    "HFMeta", "load_hf", "load_hf_meta", "save_hf", "hf_config_to_pldr", "pldr_to_hf_config",
    "read_safetensors", "read_hf_state_dict",
    "load_model", "save_model", "detect_format",
]
