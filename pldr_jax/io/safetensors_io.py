"""Reading safetensors files (a leaf module: the Hugging Face folders and bare state-dict files
both read them)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["read_safetensors"]


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file, name -> numpy array (bfloat16 via ml_dtypes).

    FileNotFoundError if there is no such file; ValueError if it is not a readable safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file: {type(e).__name__}: {e}") from e
