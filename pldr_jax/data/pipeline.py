"""Grain pipeline: documents → token rows → shuffled, sharded, batched ``{"inputs", "targets"}``.

(A prepared token directory, ``make_dataset(..., "tokens:DIR")``, skips the tokenizing: its rows are
read from the shards on demand by :mod:`pldr_jax.data.rows`, and everything below holds the same.)

Documents are tokenized **once, up front** into a flat int32 token stream (each document followed by
EOS, no BOS, as the reference), then turned into rows of ``seq_len + 1`` tokens:

* ``pack``  — concatenate all documents and cut the stream into consecutive rows of ``seq_len + 1``
  tokens (a document that does not fit continues in the next row); the final partial row is dropped.
* ``pad``   — one row per document, truncated or right-padded with 0 (pad id) to ``seq_len + 1``.
* ``nopad`` — one row per document of at least ``seq_len + 1`` tokens, truncated; shorter ones dropped.

Each row gives ``inputs = row[:-1]``, ``targets = row[1:]`` (both ``[seq_len]`` int32); pad (0) targets
are ignored by the masked loss. All rows are shuffled with a seed (a new permutation each epoch),
repeated ``num_epochs`` times (None = forever) and cut into *global* batches of
``batch_size * shard_count`` rows; shard ``i`` (a host: ``jax.process_index()``) takes rows
``[i * batch_size, (i + 1) * batch_size)`` of each global batch, as ``[batch_size, seq_len]`` arrays.
So the sequence of global batches depends only on the data, ``seq_len``, mode, seed and the global
batch size -- not on how many hosts read it: a run resumed on another number of hosts continues with
exactly the global batches the uninterrupted run would have used (the iterator state, the index of
the next batch, is the same on every host). Everything is a ``grain.MapDataset``,
so iteration is deterministic and the iterator state is a tiny JSON dict (``get_state``/``set_state``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from .rows import DocumentRows, PackedRows, token_rows
from .shards import PreparedTokens
from .sources import DocumentSource, make_source
from .tokenizer import Tokenizer

__all__ = ["TokenizedCorpus", "tokenize_documents", "split_documents", "make_rows", "PretrainDataset",
           "PipelineIterator", "make_dataset", "MODES", "PIPELINE_VERSION", "DATA_STATE_POLICIES", "DataStateMismatch",
           "restore_position"]

MODES = ("pack", "pad", "nopad")
PAD_ID = 0


@dataclass
class TokenizedCorpus:
    """Flat token stream: ``tokens`` int32 [N] (documents back to back, each ending with EOS) and
    ``offsets`` int64 [D + 1] (document d is ``tokens[offsets[d]:offsets[d + 1]]``)."""

    tokens: np.ndarray
    offsets: np.ndarray

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, dtype=np.int32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 or \
                self.offsets[-1] != len(self.tokens) or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing, start at 0 and end at len(tokens)")

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [D] tokens per document (EOS included)."""
        return np.diff(self.offsets)

    def document(self, d: int) -> np.ndarray:
        """int32 tokens of document ``d``."""
        return self.tokens[self.offsets[d]:self.offsets[d + 1]]

    def select(self, doc_indices: Sequence[int]) -> "TokenizedCorpus":
        """Sub-corpus of the given documents (in the given order)."""
        idx = np.asarray(doc_indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_documents):
            raise IndexError(f"doc_indices out of range [0, {self.num_documents})")
        lens = self.lengths[idx]
        new_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        # token k of the new stream comes from offsets[doc] + (k - new_offsets[doc's new position])
        src = np.repeat(self.offsets[idx] - new_offsets[:-1], lens) + np.arange(new_offsets[-1])
        return TokenizedCorpus(self.tokens[src], new_offsets)

    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``.npz`` (tokens, offsets)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        np.savez(p, tokens=self.tokens, offsets=self.offsets)
        return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenizedCorpus":
        """Load a corpus written by :meth:`save`."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenized corpus not found: path={str(p)!r}")
        with np.load(p) as z:
            return cls(z["tokens"], z["offsets"])

    def fingerprint(self) -> str:
        """Short sha256 of tokens and offsets (identifies the data in iterator states)."""
        h = hashlib.sha256(self.tokens.tobytes())
        h.update(self.offsets.tobytes())
        return h.hexdigest()[:16]


def tokenize_documents(tokenizer: Tokenizer, documents: Iterable[str], *, add_eos: bool = True,
                       num_threads: int = 1, chunk_size: int = 4096) -> TokenizedCorpus:
    """Tokenize ``documents`` (any iterable/source of str) into a :class:`TokenizedCorpus` (EOS appended)."""
    if isinstance(documents, (str, os.PathLike)):
        raise TypeError("documents must be an iterable of str; use make_source(spec) for a path/spec")
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    chunk: list[str] = []

    def flush():
        for ids in tokenizer.encode_batch(chunk, add_eos=add_eos, num_threads=num_threads):
            parts.append(np.asarray(ids, dtype=np.int32))
            lengths.append(len(ids))
        chunk.clear()

    for doc in documents:
        chunk.append(doc)
        if len(chunk) >= chunk_size:
            flush()
    if chunk:
        flush()
    if not parts:
        raise ValueError("documents is empty: nothing to tokenize")
    return TokenizedCorpus(np.concatenate(parts), np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))


def num_validation_documents(num_documents: int, validation_fraction: float) -> int:
    """Documents held out for validation: 0 for a fraction of 0, else ``ceil(fraction * D)`` clipped
    to [1, D - 1]."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    if validation_fraction == 0.0:
        return 0
    if num_documents < 2:
        raise ValueError(f"need at least 2 documents for a validation split, got {num_documents}")
    return min(max(1, math.ceil(validation_fraction * num_documents)), num_documents - 1)


def split_documents(num_documents: int, validation_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic document-level split: (train_indices, validation_indices), each sorted, int64.

    ``ceil(validation_fraction * num_documents)`` documents (at least 1 when the fraction is > 0, and
    at most ``num_documents - 1``) are drawn with ``np.random.default_rng(seed)``.
    """
    n_val = num_validation_documents(num_documents, validation_fraction)
    if n_val == 0:
        return np.arange(num_documents, dtype=np.int64), np.zeros(0, np.int64)
    perm = np.random.default_rng(seed).permutation(num_documents)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def make_rows(corpus: TokenizedCorpus, seq_len: int, mode: str = "pack") -> np.ndarray:
    """int32 [num_rows, seq_len + 1] rows for ``mode`` in ("pack", "pad", "nopad") (see module doc)."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    width = int(seq_len) + 1
    if mode == "pack":
        n = corpus.num_tokens // width
        return corpus.tokens[:n * width].reshape(n, width)
    lens = corpus.lengths
    docs = range(corpus.num_documents) if mode == "pad" else np.flatnonzero(lens >= width)
    rows = np.full((len(docs), width), PAD_ID, dtype=np.int32)
    for r, d in enumerate(docs):
        t = corpus.document(int(d))[:width]
        rows[r, :len(t)] = t
    return rows


class _RowSource:
    """Random-access grain source over a [R, seq_len + 1] row array."""

    def __init__(self, rows: np.ndarray):
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        return self._rows[i]

    def __repr__(self) -> str:
        return f"_RowSource(rows={self._rows.shape})"


def _split_row(row: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": np.asarray(row[:-1], np.int32), "targets": np.asarray(row[1:], np.int32)}


class _GlobalBatchSlice(grain.MapDataset):
    """Process ``index`` of ``count``'s part of every global batch of ``local_batch * count`` rows.

    Element ``k`` of this dataset is element ``(k // B) * B * count + index * B + k % B`` of the
    parent (B = local_batch): the parent's stream cut into global batches, of which this process
    takes rows ``[index * B, (index + 1) * B)``.  With ``pad_row`` (a partial last global batch
    kept), positions past the parent's end are that all-pad row."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, local_batch: int,
                 pad_row: np.ndarray | None):
        super().__init__(parent)
        self._index, self._count, self._b, self._pad_row = index, count, local_batch, pad_row

    def __len__(self) -> int:
        n, gb = len(self._parent), self._b * self._count
        full = n // gb
        return (full + (self._pad_row is not None and n > full * gb)) * self._b

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        g = (k // self._b) * self._b * self._count + self._index * self._b + k % self._b
        if g >= len(self._parent):
            return self._pad_row
        return self._parent[g]

    def __str__(self) -> str:
        return f"_GlobalBatchSlice(index={self._index}, count={self._count}, local_batch={self._b})"


#: Version of the batch order: bumped whenever the same inputs give other batches.  Version 0
#: (before 2026-11-29): every process shuffled its own ``rows[i::n]``; version 1: global batches
#: (this order), states without a version; version 2: this order, the version stored in the state.
PIPELINE_VERSION = 2
DATA_STATE_POLICIES = ("exact", "restart", "skip")


class DataStateMismatch(ValueError):
    """A data-iterator state that this pipeline cannot continue exactly (`restore_position`)."""

    def __init__(self, message: str, next_index: int):
        super().__init__(message)
        self.next_index = next_index


class PipelineIterator(grain.DatasetIterator):
    """Checkpointable batch iterator (a ``grain.DatasetIterator``, so grain/orbax checkpoint handlers
    accept it). ``get_state()`` → JSON-serialisable dict ``{"next_index": int, "pipeline": str,
    "pipeline_version": int}``: the position (global batches consumed), the fingerprint of the
    inputs (data, seq_len, mode, seed, global batch, ...) and the batch-order version.  ``set_state``
    continues a state exactly when the inputs are equal and the position means the same batches in
    this version (`PIPELINE_VERSION`; the states of earlier versions are recognised), and raises
    `DataStateMismatch` otherwise (see `restore_position` for continuing anyway)."""

    def __init__(self, parent: grain.DatasetIterator, fingerprint: str, legacy_fingerprints: dict | None = None):
        super().__init__(parent)
        self._fingerprint = fingerprint
        self._legacy = dict(legacy_fingerprints or {})  # version -> (fingerprint of these inputs, position carries)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    @property
    def step(self) -> int:
        """Number of batches consumed so far (the index of the next batch)."""
        return int(self._parent.get_state()["next_index"])

    def get_state(self) -> dict[str, Any]:
        return {**self._parent.get_state(), "pipeline": self._fingerprint, "pipeline_version": PIPELINE_VERSION}

    def set_state(self, state: dict[str, Any] | bytes | str) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if not isinstance(state, dict) or "next_index" not in state:
            raise ValueError(f"state must be a dict from get_state() with 'next_index', got {state!r}")
        self._check(state)
        inner = {k: v for k, v in state.items() if k not in ("pipeline", "pipeline_version")}
        self._parent.set_state(inner)

    def _check(self, state: dict) -> None:
        fp, version, n = state.get("pipeline"), state.get("pipeline_version"), int(state["next_index"])
        if fp is None:
            return
        if version == PIPELINE_VERSION:
            if fp != self._fingerprint:
                raise DataStateMismatch(f"the data position ({n} batches) was saved for other inputs: the data, "
                                        "seq_len, mode, seed or global batch size changed", n)
            return
        if version is None:  # written before versions were stored: version 1 or 0
            for v in (1, 0):
                legacy_fp, carries = self._legacy.get(v, (None, False))
                if fp == legacy_fp:
                    if carries:
                        return
                    raise DataStateMismatch(f"the data position ({n} batches) was saved by data-pipeline version {v}, "
                                            f"whose batches differ from this version's ({PIPELINE_VERSION}) for "
                                            "these inputs", n)
            raise DataStateMismatch(f"the data position ({n} batches) was saved for other inputs (the data, seq_len, "
                                    "mode, seed or global batch size changed) or by an older data pipeline", n)
        raise DataStateMismatch(f"the data position ({n} batches) was saved by data-pipeline version {version}, "
                                f"this is version {PIPELINE_VERSION}", n)

    def __str__(self) -> str:
        return f"PipelineIterator(pipeline={self._fingerprint})"


def restore_position(iterator, state: dict, policy: str = "exact") -> str | None:
    """Put a resumed run's data `iterator` at the saved `state`; returns a note for the user, or None.

    policy "exact" (the default): the state is continued exactly, or `DataStateMismatch` names the
    other choices.  When the state cannot be continued exactly (other inputs, or a batch order of
    another pipeline version): "restart" starts the data from its first batch, "skip" continues
    after as many batches as the state had consumed (in this pipeline's order: the examples already
    seen are skipped only where the order is the same).  Iterators other than `PipelineIterator`
    (e.g. streamed data) take their state as they are, or start afresh with "restart"."""
    if policy not in DATA_STATE_POLICIES:
        raise ValueError(f"data-state policy must be one of {DATA_STATE_POLICIES}, got {policy!r}")
    try:
        iterator.set_state(state)
        return None
    except DataStateMismatch as e:
        if policy == "exact":
            raise DataStateMismatch(f"cannot continue the training data where the checkpoint left it: {e}. To go on "
                                    "with the checkpoint's model and optimiser state, pass --data-state restart "
                                    f"(the data from its first batch) or --data-state skip (past the first "
                                    f"{e.next_index} batches)", e.next_index) from None
        if policy == "restart":
            return f"data restarted from its first batch (--data-state restart): {e}"
        iterator.set_state({"next_index": e.next_index})
        return f"data continues after its first {e.next_index} batches (--data-state skip): {e}"
    except ValueError:
        if policy == "restart":
            return "data restarted from its first batch (--data-state restart): its saved state does not fit"
        raise


class PretrainDataset:
    """Batches of ``{"inputs": int32 [batch_size, seq_len], "targets": int32 [batch_size, seq_len]}``.

    ``iter(ds)`` (or ``ds.iterator(start_step)``) gives a :class:`PipelineIterator`; ``ds[i]`` is batch
    ``i``; ``len(ds)`` is the number of batches (``sys.maxsize``-ish when repeating forever).
    ``corpus``: a :class:`TokenizedCorpus` (rows built in memory by :func:`make_rows`) or the rows
    of a prepared directory (:func:`pldr_jax.data.rows.token_rows`: built on the fly from the shards,
    nothing loaded).  Attributes: ``rows`` (int32 [R, seq_len + 1] array, or the lazy row
    source: all rows, every shard's, before shuffling), ``corpus`` (the TokenizedCorpus or the
    :class:`~pldr_jax.data.shards.PreparedTokens`), ``batches_per_epoch`` (global batches per pass
    over ``rows``), ``tokens_per_epoch`` (non-pad targets of ``rows``) and the constructor settings.
    Shard ``shard_index`` of ``shard_count`` yields its ``batch_size`` rows of each global batch (see
    the module docstring).
    """

    def __init__(self, corpus: TokenizedCorpus | PackedRows | DocumentRows, *, seq_len: int, batch_size: int,
                 mode: str = "pack",
                 seed: int = 0, shuffle: bool = True, shard_index: int = 0, shard_count: int = 1,
                 num_epochs: int | None = None, drop_remainder: bool = True,
                 prefetch_threads: int = 0, prefetch_buffer: int = 16):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(shard_count, (int, np.integer)) or shard_count < 1:
            raise ValueError(f"shard_count must be a positive int, got {shard_count!r}")
        if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index!r}")
        if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
            raise ValueError(f"num_epochs must be a positive int or None (forever), got {num_epochs!r}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        self.seq_len, self.batch_size, self.mode = int(seq_len), int(batch_size), mode
        self.seed, self.shuffle, self.num_epochs, self.drop_remainder = int(seed), shuffle, num_epochs, drop_remainder
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)

        if isinstance(corpus, (PackedRows, DocumentRows)):
            want = "pack" if isinstance(corpus, PackedRows) else corpus.mode
            if corpus.width != self.seq_len + 1 or want != mode:
                raise ValueError(f"row source {corpus!r} does not give mode={mode!r} rows of seq_len+1={seq_len + 1}")
            self.rows, self.corpus, data_id = corpus, corpus.store, corpus.fingerprint
        else:
            self.rows, self.corpus, data_id = make_rows(corpus, seq_len, mode), corpus, corpus.fingerprint()
        global_batch = self.batch_size * self.shard_count
        if len(self.rows) == 0:
            raise ValueError(f"no training rows: {self.corpus.num_tokens} tokens in {self.corpus.num_documents} "
                             f"documents give no row of seq_len+1={seq_len + 1} tokens in mode={mode!r}; use more "
                             "data, a smaller seq_len" + (" or mode='pad'" if mode == "nopad" else ""))
        if len(self.rows) < global_batch and drop_remainder:
            raise ValueError(f"the global batch ({batch_size} rows x {shard_count} shards = {global_batch}) exceeds "
                             f"the {len(self.rows)} rows of the data (drop_remainder=True would give no batch); lower "
                             "batch_size or seq_len")
        self.batches_per_epoch = (len(self.rows) // global_batch if drop_remainder
                                  else math.ceil(len(self.rows) / global_batch))
        self.tokens_per_epoch = (int(np.count_nonzero(self.rows[:, 1:])) if isinstance(self.rows, np.ndarray)
                                 else self.rows.tokens_per_epoch)  # non-pad targets, all shards
        self.read_options = grain.ReadOptions(num_threads=prefetch_threads,
                                              prefetch_buffer_size=prefetch_buffer if prefetch_threads else 0)

        ds = grain.MapDataset.source(self.rows if isinstance(self.rows, (PackedRows, DocumentRows))
                                     else _RowSource(self.rows))
        if shuffle:
            ds = ds.shuffle(seed=self.seed)
        ds = ds.repeat(num_epochs)
        pad_row = None if drop_remainder else np.full(self.seq_len + 1, PAD_ID, np.int32)
        ds = _GlobalBatchSlice(ds, self.shard_index, self.shard_count, self.batch_size, pad_row)
        ds = ds.map(_split_row)
        ds = ds.batch(self.batch_size, drop_remainder=drop_remainder)
        self.map_dataset: grain.MapDataset = ds
        # The position (next batch index) means the same global batch for every shard count: the
        # fingerprint names the global batch, not this shard, so a state re-shards onto any count.
        cfg = dict(data=data_id, seq_len=self.seq_len, global_batch=global_batch, mode=mode,
                   seed=self.seed, shuffle=bool(shuffle), epochs=num_epochs, drop=bool(drop_remainder))
        self.fingerprint = _sha16(cfg)
        # The fingerprints the earlier versions gave these inputs, and whether their positions mean the
        # same batches here: version 1 had this order; version 0's only with one process (rows[0::1]).
        v0 = dict(data=data_id, seq_len=self.seq_len, batch=self.batch_size, mode=mode, seed=self.seed,
                  shuffle=bool(shuffle), shard=[self.shard_index, self.shard_count], epochs=num_epochs,
                  drop=bool(drop_remainder))
        self.legacy_fingerprints = {1: (self.fingerprint, True),
                                    0: (_sha16(v0), self.shard_count == 1 and bool(drop_remainder))}

    def __len__(self) -> int:
        return len(self.map_dataset)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.map_dataset[i]

    def iterator(self, start_step: int = 0) -> PipelineIterator:
        """A fresh iterator positioned at batch ``start_step``."""
        it = PipelineIterator(self.map_dataset.to_iter_dataset(self.read_options).__iter__(), self.fingerprint,
                              self.legacy_fingerprints)
        if start_step:
            it.set_state({"next_index": int(start_step)})
        return it

    def __iter__(self) -> PipelineIterator:
        return self.iterator()

    def __repr__(self) -> str:
        return (f"PretrainDataset(mode={self.mode!r}, seq_len={self.seq_len}, batch_size={self.batch_size}, "
                f"rows={len(self.rows)}, batches_per_epoch={self.batches_per_epoch}, "
                f"shard={self.shard_index}/{self.shard_count}, num_epochs={self.num_epochs})")


def _sha16(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def make_dataset(tokenizer: Tokenizer | None, source, seq_len: int, batch_size: int, mode: str = "pack",
                 seed: int = 0, shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None, *,
                 split: str = "train", validation_fraction: float = 0.0, split_seed: int = 0,
                 shuffle: bool | None = None, drop_remainder: bool | None = None, num_threads: int = 1,
                 prefetch_threads: int = 0) -> PretrainDataset:
    """Build the training (or validation) batch pipeline.

    tokenizer: used to tokenize ``source`` (may be None when ``source`` is a :class:`TokenizedCorpus`);
        with a prepared directory it is optional and, when given, must be the one the shards were
        made with (refused otherwise).
    source: a :class:`TokenizedCorpus`, a ``DocumentSource``, a list of str, a spec for
        :func:`make_source` ("builtin", a path, "jsonl:PATH:FIELD", "parquet:PATH:COLUMN", ...), or a
        prepared directory: ``"tokens:DIR"`` or a :class:`~pldr_jax.data.shards.PreparedTokens`
        (rows built on the fly, read from the shards; the validation split is then the *last*
        ``validation_fraction`` of the documents in prepare order, contiguous, so that no document
        list is needed -- prepare from a shuffled source, or a separate validation directory).
    seq_len: model input length L; rows hold L + 1 tokens. batch_size: per-host batch B.
    mode: "pack" | "pad" | "nopad". seed: shuffle seed (each epoch reshuffled).
    shard_index / shard_count: this host's part (e.g. ``jax.process_index()``, ``jax.process_count()``).
    num_epochs: passes over the data; None = repeat forever.
    split: "train" | "validation" | "all"; the document-level split keeps ``validation_fraction`` of the
        documents (chosen with ``split_seed``, independent of ``seed``) for validation.
        Validation defaults: ``shuffle=False``, ``num_epochs=1`` (None means 1 here), partial last batch
        padded with pad rows (``drop_remainder=False``).
    num_threads: sentencepiece threads for tokenizing.
    Returns a :class:`PretrainDataset`; ``iter()`` of it yields ``{"inputs", "targets"}`` int32 [B, L].
    """
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split must be 'train', 'validation' or 'all', got {split!r}")
    if split == "validation" and validation_fraction <= 0:
        raise ValueError("split='validation' needs validation_fraction > 0")
    if isinstance(source, str) and source.startswith("tokens:"):
        source = PreparedTokens(source[len("tokens:"):], tokenizer)
    if isinstance(source, PreparedTokens):
        if tokenizer is not None:
            source.check_tokenizer(tokenizer)
        n_docs = source.num_documents
        n_val = num_validation_documents(n_docs, validation_fraction) if split != "all" else 0
        lo, hi = {"train": (0, n_docs - n_val), "validation": (n_docs - n_val, n_docs), "all": (0, n_docs)}[split]
        corpus = token_rows(source, seq_len, mode, lo, hi)
    elif isinstance(source, TokenizedCorpus):
        corpus = source
    else:
        if tokenizer is None:
            raise ValueError("tokenizer is required unless source is a TokenizedCorpus")
        src = source if isinstance(source, DocumentSource) else make_source(source)
        corpus = tokenize_documents(tokenizer, src, add_eos=True, num_threads=num_threads)
    if split != "all" and isinstance(corpus, TokenizedCorpus):
        train_idx, val_idx = split_documents(corpus.num_documents, validation_fraction, split_seed)
        if validation_fraction > 0:
            corpus = corpus.select(val_idx if split == "validation" else train_idx)
    is_val = split == "validation"
    if is_val and num_epochs is None:
        num_epochs = 1  # a validation pass is always finite
    return PretrainDataset(corpus, seq_len=seq_len, batch_size=batch_size, mode=mode, seed=seed,
                           shuffle=(not is_val) if shuffle is None else shuffle,
                           shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
                           drop_remainder=(not is_val) if drop_remainder is None else drop_remainder,
                           prefetch_threads=prefetch_threads)
