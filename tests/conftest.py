"""Shared fixtures: the golden reference folder and tiny models.

The golden files come from `../shared/reference` (the authors' PyTorch outputs, next to the
repository) when it is there, else from `tests/data/` (a copy of the small files the golden tests
need: the tiny models, their outputs, gradients, generations, and the paper's learned G list), so a
clean clone runs every golden test.  `PLDR_JAX_REFERENCE=<dir>` picks a folder explicitly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# the suite runs on XLA:CPU: with libtpu installed (the test extra), JAX would otherwise probe for TPU
# hardware first; subprocesses inherit this too.  Tests that need TPU devices compile for a TPU
# topology ahead of time (tests/test_aot.py), which works under JAX_PLATFORMS=cpu.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED_REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
DATA = Path(__file__).resolve().parent / "data"
REF = Path(os.environ["PLDR_JAX_REFERENCE"]) if os.environ.get("PLDR_JAX_REFERENCE") else (
    SHARED_REF if SHARED_REF.is_dir() else DATA)


def ref_path(name: str) -> Path:
    p = REF / name
    if not p.exists():
        pytest.skip(f"golden file {p} not available")
    return p


@pytest.fixture(scope="session")
def ref():
    """Path to the golden folder (../shared/reference or tests/data; skips when absent)."""
    if not REF.exists():
        pytest.skip(f"golden folder {REF} not available")
    return REF


def load_reference_model(name: str):
    """(cfg, params) of a golden reference model, e.g. "tiny_v510" or "tiny_v510G_identity"."""
    import pldr_jax
    from pldr_jax.io.state_dict import state_dict_to_params
    hp = json.loads(ref_path(f"{name}.json").read_text())
    overrides = {}
    hp_inner = hp.get("hyperparameters", hp)
    if "A_dff" not in hp_inner:
        overrides["custom_G_type"] = "identity"
    cfg = pldr_jax.PLDRConfig.from_reference_hparams({**hp_inner, **overrides})
    sd = dict(np.load(ref_path(f"{name}_params.npz")))
    return cfg, state_dict_to_params(cfg, sd)


@pytest.fixture(scope="session")
def tiny_v510():
    return load_reference_model("tiny_v510")


@pytest.fixture(scope="session")
def tiny_v510g():
    return load_reference_model("tiny_v510G_identity")
