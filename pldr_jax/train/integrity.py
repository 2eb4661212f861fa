"""Checkpoint integrity: a sharding-independent digest of array trees, file checks, and telling
corruption from every other failure.

* `tree_digest(tree)` -- per leaf, two 32-bit checksums of the array's bits weighted by a hash of
  each element's global index, computed where the shards live (inside `jax.jit`, on any mesh, any
  process count: each device sums its shard, one all-reduce of 8 bytes per leaf combines them).
  Integer sums wrap modulo 2**32, so the result does not depend on the sharding or the reduction
  order: the digest written with a checkpoint saved on 8 devices of 2 processes is recomputed on
  the state restored onto 1 device (or 4 processes) and must match.  Any single changed element
  changes both sums (the weights are odd, hence invertible modulo 2**32); several changed
  elements go unnoticed with probability about 2**-64.  The state is never copied to a host for it.
* `check_step_files(step_dir)` -- what can be read without the arrays: orbax's step metadata, the
  state item, the JSON items (config, per-process data-iterator states) parse.
* `is_corruption(exc)` -- whether an exception raised while restoring proves the checkpoint's
  bytes bad (a file of the checkpoint missing, truncated, undecodable, unparseable).  Everything
  else -- a timeout, a barrier or topology problem, a missing library, permissions, memory, a shape
  mismatch -- is *not* corruption: the caller must stop and report, never move the checkpoint.
* `quarantine(directory, step)` -- moves a proven-corrupt step to ``<directory>.corrupt/<step>-<time>``
  (nothing is deleted) and returns the new path.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DIGEST_ALGORITHM", "tree_digest", "digest_mismatches", "check_step_files", "is_corruption",
           "quarantine", "error_summary", "jsonable_digest"]

DIGEST_ALGORITHM = "pldr-index-weighted-sum32x2-v1"
_SEEDS = (0x9E3779B9, 0x85EBCA6B)


def _mix32(h):
    """murmur3's 32-bit finaliser (uint32 -> uint32, a bijection)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_uint32(x) -> jax.Array:
    """The bits of `x` as uint32 elements (same shape, plus a trailing 2 for 8-byte dtypes)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_sums(x) -> jax.Array:
    """uint32 [2]: the index-weighted sums of one array (global, any sharding)."""
    bits = _as_uint32(x)
    index = jnp.zeros(bits.shape, jnp.uint32)  # row-major global index, wrapping; no reshape (keeps shards local)
    stride = 1
    for d in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[d]
    sums = [jnp.sum(bits * (_mix32(index ^ jnp.uint32(seed)) | jnp.uint32(1)), dtype=jnp.uint32)
            for seed in _SEEDS]
    return jnp.stack(sums)


@jax.jit
def _tree_sums(tree):
    return jax.tree_util.tree_map(_leaf_sums, tree)


def tree_digest(tree) -> dict[str, str]:
    """{leaf path: 16 hex digits} of every array leaf of `tree` (see the module docstring).

    Call it on the same processes that hold `tree` (every process of a multi-process run, as for any
    jitted function of global arrays); each gets the same dict."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        return {}
    sums = jax.device_get(_tree_sums(tree))
    flat = jax.tree_util.tree_leaves(sums)
    return {jax.tree_util.keystr(kp): "".join(f"{int(v):08x}" for v in np.asarray(s))
            for (kp, _), s in zip(leaves, flat)}


def digest_mismatches(expected: dict[str, str], tree) -> list[str]:
    """Leaf paths whose digest differs from `expected` (or is missing on either side)."""
    got = tree_digest(tree)
    return sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))


# --------------------------------------------------------------------------- files
def _read_json(path: Path, what: str, problems: list[str]):
    if not path.is_file():
        problems.append(f"{what} missing ({path.name})")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{what} unreadable ({path.name}: {type(e).__name__}: {e})")
        return None


def check_step_files(step_dir: str | Path, required_items=("state",)) -> tuple[list[str], dict | None]:
    """(problems, config) of the files of one checkpoint step directory, without reading arrays.

    Problems: orbax's ``_CHECKPOINT_METADATA`` missing or unparseable, a required item missing, the
    state's ``_METADATA``, the config item or a per-process data-iterator state unparseable.
    config: the parsed config item (None when absent or unreadable)."""
    d = Path(step_dir)
    problems: list[str] = []
    if not d.is_dir():
        return [f"step directory {str(d)!r} missing"], None
    _read_json(d / "_CHECKPOINT_METADATA", "orbax checkpoint metadata", problems)
    items = {p.name for p in d.iterdir() if p.is_dir()}
    for name in required_items:
        if name not in items:
            problems.append(f"item {name!r} missing (have {sorted(items)})")
    if "state" in items:
        _read_json(d / "state" / "_METADATA", "state metadata", problems)
    config = _read_json(d / "config" / "metadata", "config item", problems) if "config" in items else None
    if "data" in items:
        for f in sorted((d / "data").glob("process_*-of-*.json")):
            _read_json(f, "data-iterator state", problems)
    return problems, config if isinstance(config, dict) else None


# --------------------------------------------------------------------------- classification
#: tensorstore status codes that, raised while reading a checkpoint's files, prove them bad
_CORRUPT_CODES = ("DATA_LOSS:", "NOT_FOUND:", "OUT_OF_RANGE:")
_CORRUPT_PRECONDITION = ("Truncated", "Error decoding", "corrupt", "checksum", "Invalid")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_corruption(exc: BaseException) -> bool:
    """True when `exc` (raised while restoring a checkpoint) proves the checkpoint's files bad."""
    for e in _chain(exc):
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
            return True
        msg = str(e).lstrip()
        if msg.startswith(_CORRUPT_CODES):
            return True
        if msg.startswith("FAILED_PRECONDITION:") and any(w in msg for w in _CORRUPT_PRECONDITION):
            return True
    return False


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """One line naming `exc` and its innermost cause (tensorstore's long specs cut off)."""
    parts = []
    for e in _chain(exc):
        text = " ".join(str(e).split(" See full TensorStore details")[0].split(" [tensorstore_spec=")[0].split())
        parts.append(f"{type(e).__name__}: {text[:limit]}")
    return " <- ".join(parts[:1] + parts[-1:]) if len(parts) > 1 else parts[0]


def quarantine(directory: str | Path, step: int) -> Path:
    """Move step `step` of `directory` to ``<directory>.corrupt/<step>-<unix time>``; returns it."""
    root = Path(directory).absolute()
    dest_root = root.parent / (root.name + ".corrupt")
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / f"{step}-{int(time.time())}"
    n = 1
    while dest.exists():
        dest = dest_root / f"{step}-{int(time.time())}-{n}"
        n += 1
    shutil.move(str(root / str(step)), str(dest))
    return dest


def jsonable_digest(digest: dict[str, str]) -> dict[str, Any]:
    """The record stored in a checkpoint's config under "digest"."""
    return {"algorithm": DIGEST_ALGORITHM, "leaves": dict(digest)}
