"""Several training sources mixed by weight (``--data A@0.7 --data B@0.3``), with grain's mixing.

Each source is turned into token rows exactly as a single source is (`pldr_jax.data.pipeline`:
in-memory documents or a prepared ``tokens:DIR``), shuffled with its own seed (``seed + i``) and
repeated forever; `grain.MapDataset.mix` interleaves the row streams in the weights' proportions
(a deterministic index map, no random draws), and the mixed stream is cut into global batches
and sharded over processes as in `PretrainDataset`.  So the sequence of global batches depends on
the sources, weights, seq_len, mode, seed and global batch size only, and the iterator state is the
next batch index (plus the running per-source token counts): resuming is exact.

Batches are ``{"inputs", "targets"}`` as from a single source; the iterator counts the non-pad
target tokens each source contributed on this process (`MixtureIterator.source_tokens`, part of the
checkpointed state) for the metrics (``tokens_by_source``).  Validation: each source's validation
split, mixed with the same weights, one pass (``stream:`` sources are not mixable: they are not
random-access).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np

from .pipeline import PAD_ID, _GlobalBatchSlice, _RowSource, make_dataset
from .rows import DocumentRows, PackedRows

_KINDS = ("text", "paragraphs", "jsonl", "parquet", "hf", "tokens")

__all__ = ["parse_mixture", "source_names", "MixtureDataset", "MixtureIterator", "make_mixture"]


def parse_mixture(items: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """((spec, weight), ...) of "SPEC@WEIGHT" items (no "@WEIGHT": weight 1)."""
    out = []
    for item in items:
        spec, sep, w = str(item).rpartition("@")
        if not sep:
            spec, w = item, "1"
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--data {item!r}: the weight after '@' must be a number (e.g. builtin@0.7)") from None
        if not spec or not weight > 0:
            raise ValueError(f"--data {item!r}: expected SPEC@WEIGHT with a weight > 0")
        if spec.startswith("stream:"):
            raise ValueError(f"--data {item!r}: streamed sources cannot be mixed (they are not random-access); "
                             "prepare them with pldr-jax data prepare and mix tokens:DIR")
        out.append((spec, weight))
    return tuple(out)


def source_names(specs: Sequence[str]) -> list[str]:
    """Short metric names of the sources: the file or folder name of each spec without its
    extension ("jsonl:data/web.jsonl:text" -> "web", "tokens:prepared/books" -> "books", "builtin"),
    non-word characters as "_", prefixed by the position when two would collide."""
    names = []
    for s in specs:
        kind, sep, rest = s.partition(":")
        path = rest.split(":")[0] if sep and kind in _KINDS else s
        names.append(re.sub(r"\W+", "_", Path(path.rstrip("/")).stem).strip("_")[-40:] or "source")
    return [f"{i}_{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class MixtureIterator(grain.DatasetIterator):
    """Checkpointable iterator of a `MixtureDataset` (state: next batch index, pipeline fingerprint,
    per-source token counts of this process)."""

    def __init__(self, parent: grain.DatasetIterator, fingerprint: str, names: Sequence[str]):
        super().__init__(parent)
        self._fingerprint = fingerprint
        self.names = list(names)
        self.source_tokens = {n: 0 for n in self.names}

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self._parent)
        src = b.pop("source")
        for i, n in enumerate(self.names):
            self.source_tokens[n] += int(np.count_nonzero(b["targets"][src == i] != PAD_ID))
        return b

    @property
    def step(self) -> int:
        return int(self._parent.get_state()["next_index"])

    def get_state(self) -> dict[str, Any]:
        return {**self._parent.get_state(), "pipeline": self._fingerprint, "source_tokens": dict(self.source_tokens)}

    def set_state(self, state) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if not isinstance(state, dict) or "next_index" not in state:
            raise ValueError(f"state must be a dict from get_state() with 'next_index', got {state!r}")
        if state.get("pipeline") not in (None, self._fingerprint):
            raise ValueError(f"iterator state belongs to a different data mixture (state pipeline="
                             f"{state.get('pipeline')!r}, this one={self._fingerprint!r}): sources, weights, "
                             "seq_len, mode, seed or global batch size changed")
        self.source_tokens = {n: int(state.get("source_tokens", {}).get(n, 0)) for n in self.names}
        self._parent.set_state({"next_index": int(state["next_index"])})


class MixtureDataset:
    """Batches mixed from several sources' rows (see the module docstring).

    rows: per source, an int32 [R, seq_len + 1] array or a lazy row source (`PretrainDataset.rows`);
    data_ids: per source, a fingerprint of its data; weights: > 0 (normalised by grain).
    train=True: shuffled (seed + i), repeated forever, full global batches; False: one pass in order,
    a partial last global batch padded with pad rows.
    """

    def __init__(self, rows: Sequence[Any], data_ids: Sequence[str], names: Sequence[str], weights: Sequence[float],
                 *, seq_len: int, batch_size: int, mode: str = "pack", seed: int = 0, shard_index: int = 0,
                 shard_count: int = 1, train: bool = True):
        if len(rows) < 2 or not (len(rows) == len(weights) == len(names) == len(data_ids)):
            raise ValueError("a mixture needs two or more sources, each with a name and a weight")
        self.names, self.weights = list(names), [float(w) for w in weights]
        self.seq_len, self.batch_size, self.shard_count = int(seq_len), int(batch_size), int(shard_count)
        parts = []
        for i, r in enumerate(rows):
            ds = grain.MapDataset.source(r if isinstance(r, (PackedRows, DocumentRows)) else _RowSource(r))
            if train:
                ds = ds.shuffle(seed=int(seed) + i).repeat(None)
            parts.append(ds.map(lambda row, i=i: (i, row)))
        mixed = grain.MapDataset.mix(parts, self.weights)
        pad = None if train else (-1, np.full(self.seq_len + 1, PAD_ID, np.int32))
        ds = _GlobalBatchSlice(mixed, int(shard_index), self.shard_count, self.batch_size, pad)
        ds = ds.map(lambda t: {"inputs": np.asarray(t[1][:-1], np.int32), "targets": np.asarray(t[1][1:], np.int32),
                               "source": np.int32(t[0])})
        self.map_dataset = ds.batch(self.batch_size, drop_remainder=train)
        cfg = dict(data=list(data_ids), weights=self.weights, seq_len=self.seq_len, mode=mode, seed=int(seed),
                   global_batch=self.batch_size * self.shard_count, train=bool(train))
        self.fingerprint = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.map_dataset)

    def iterator(self, start_step: int = 0) -> MixtureIterator:
        it = MixtureIterator(self.map_dataset.to_iter_dataset().__iter__(), self.fingerprint, self.names)
        if start_step:
            it.set_state({"next_index": int(start_step)})
        return it

    def __iter__(self) -> MixtureIterator:
        return self.iterator()


def make_mixture(tokenizer, mixture: Sequence[tuple[str, float]], *, seq_len: int, batch_size: int,
                 mode: str = "pack", seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                 validation_fraction: float = 0.0, split_seed: int = 0, names: Sequence[str] | None = None):
    """(train MixtureDataset, validation MixtureDataset or None) of ((spec, weight), ...) sources for
    this process (batch_size: per process).  A spec is anything `make_dataset` reads (a source spec,
    ``tokens:DIR``, a `TokenizedCorpus`); names: metric names (default `source_names`).  Each source
    is split into train / validation documents as a single source would be."""
    specs = [s for s, _ in mixture]
    names = list(names) if names is not None else source_names([str(s) for s in specs])
    common = dict(seq_len=seq_len, batch_size=batch_size, mode=mode, shard_index=0, shard_count=1,
                  validation_fraction=validation_fraction, split_seed=split_seed)
    train_parts = [make_dataset(tokenizer, s, split="train", seed=seed, **common) for s in specs]
    weights = [w for _, w in mixture]
    sharding = dict(seq_len=seq_len, batch_size=batch_size, mode=mode, shard_index=shard_index,
                    shard_count=shard_count)
    train = MixtureDataset([p.rows for p in train_parts], [p.fingerprint for p in train_parts], names, weights,
                           seed=seed, train=True, **sharding)
    val = None
    if validation_fraction > 0:
        val_parts = [make_dataset(tokenizer, s, split="validation", **common) for s in specs]
        val = MixtureDataset([p.rows for p in val_parts], [p.fingerprint for p in val_parts], names, weights,
                             train=False, **sharding)
    return train, val
