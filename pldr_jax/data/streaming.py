"""Streaming raw text: documents read lazily, tokenized inside the grain pipeline, packed on the fly.

For runs that should not wait for ``pldr-jax data prepare`` (``--data stream:SPEC``, SPEC any
:func:`~pldr_jax.data.make_source` spec).  The pipeline is a chain of ``grain.IterDataset``::

    documents of this process's share (lazy; nothing listed in memory)
      -> tokenized in chunks of ``chunk_docs`` documents by sentencepiece's batched encoder
         (``num_threads`` C++ threads, in parallel, outside the GIL), EOS appended
      -> rows: "pack" = grain's ``ConcatThenSplitIterDataset`` (documents concatenated, cut into rows
         of seq_len + 1, a row continuing into the next document); "pad" / "nopad" as in
         :func:`~pldr_jax.data.pipeline.make_rows`
      -> ``WindowShuffleIterDataset`` (a bounded window of ``shuffle_window`` rows; 0 = no shuffle)
      -> ``{"inputs", "targets"}`` int32 [batch_size, seq_len] batches.

Per-process sharding: a file source with at least as many files as processes is split by file
(process ``i`` reads files ``i, i + n, ...`` only), a Hugging Face ``IterableDataset`` with at least
as many shards by its ``shard()``; any other source by record (process ``i`` keeps
records ``i, i + n, ...``, reading but not tokenizing the others).  Validation holds out every
``round(1 / validation_fraction)``-th record of the process's share.

Checkpointable: the iterator state (grain's nested state: documents consumed, packing remainder,
shuffle window) restores exactly -- the resumed run continues at the next batch -- for the *same*
process count: unlike the prepared path, each process reads only its own share, so a state cannot be
re-sharded onto another count (refused, with the reason).  Epochs repeat the share (``num_epochs``,
None = forever, so every process always has a next batch).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections import deque
from typing import Any

import grain
import grain.experimental as gx
import numpy as np

from .shards import tokenizer_sha256
from .sources import DocumentSource, HFDatasetSource, make_source
from .tokenizer import Tokenizer

__all__ = ["StreamingDataset", "StreamIterator", "shard_source"]

PAD_ID = 0


def shard_source(spec, shard_index: int, shard_count: int) -> tuple[DocumentSource, bool]:
    """(source of this process's share, whether records still need a ``k % n == i`` filter).

    A source with a ``files`` list of at least ``shard_count`` files is split by file; a Hugging
    Face ``IterableDataset`` with at least ``shard_count`` shards by its own ``shard()``."""
    src = make_source(spec) if not isinstance(spec, DocumentSource) else spec
    if shard_count == 1:
        return src, False
    files = getattr(src, "files", None)
    if files is not None and len(files) >= shard_count:
        src = copy.copy(src)
        src.files = list(files)[shard_index::shard_count]
        return src, False
    hf = getattr(src, "dataset", None)
    n_hf = getattr(hf, "num_shards", None) or getattr(hf, "n_shards", None)
    if isinstance(src, HFDatasetSource) and hasattr(hf, "shard") and isinstance(n_hf, int) and n_hf >= shard_count \
            and not hasattr(hf, "__getitem__"):  # an IterableDataset: split by its files / shards
        src = copy.copy(src)
        src.dataset = hf.shard(num_shards=shard_count, index=shard_index)
        return src, False
    return src, True


class _DocumentTokensIterator(grain.DatasetIterator):
    """Yields ``{"tokens": int32 [n]}`` per document of the share; state ``{"epoch", "documents"}``."""

    def __init__(self, ds: "_DocumentTokens"):
        super().__init__()
        self._ds = ds
        self._epoch = 0
        self._consumed = 0  # documents of this epoch handed out
        self._queue: deque = deque()
        self._docs = ds.documents()
        self._seen_in_epoch = False

    def _refill(self) -> bool:
        ds = self._ds
        while True:
            chunk = list(itertools.islice(self._docs, ds.chunk_docs))
            if chunk:
                self._seen_in_epoch = True
                toks, lengths = ds.tokenizer.encode_flat(chunk, add_eos=True, num_threads=ds.num_threads)
                self._queue.extend(np.split(toks, np.cumsum(lengths)[:-1]))
                return True
            if not self._seen_in_epoch:
                raise ValueError(f"streaming source {ds.spec!r} gives process {ds.shard_index} of {ds.shard_count} no "
                                 f"{'validation ' if ds.validation else ''}documents")
            if ds.num_epochs is not None and self._epoch + 1 >= ds.num_epochs:
                return False
            self._epoch += 1
            self._consumed = 0
            self._seen_in_epoch = False
            self._docs = ds.documents()

    def __next__(self):
        if not self._queue and not self._refill():
            raise StopIteration
        self._consumed += 1
        return {"tokens": self._queue.popleft()}

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "documents": self._consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._consumed = int(state["epoch"]), int(state["documents"])
        self._queue.clear()
        self._docs = itertools.islice(self._ds.documents(), self._consumed, None)  # read, not tokenized
        self._seen_in_epoch = self._consumed > 0


class _DocumentTokens(grain.IterDataset):
    """This process's documents of a source, tokenized lazily (see the module docstring)."""

    def __init__(self, spec, tokenizer: Tokenizer, *, shard_index: int, shard_count: int, num_epochs: int | None,
                 chunk_docs: int, num_threads: int, holdout: int, validation: bool):
        super().__init__()
        self.spec, self.tokenizer = spec, tokenizer
        self.shard_index, self.shard_count, self.num_epochs = shard_index, shard_count, num_epochs
        self.chunk_docs, self.num_threads, self.holdout, self.validation = chunk_docs, num_threads, holdout, validation
        self._source, self._by_record = shard_source(spec, shard_index, shard_count)

    def documents(self):
        """A fresh pass over this process's share (documents of the split)."""
        k_share = 0
        for k, doc in enumerate(self._source):
            if self._by_record and k % self.shard_count != self.shard_index:
                continue
            if self.holdout and ((k_share % self.holdout) == self.holdout - 1) != self.validation:
                k_share += 1
                continue
            k_share += 1
            yield doc

    def __iter__(self) -> _DocumentTokensIterator:
        return _DocumentTokensIterator(self)

    def __str__(self) -> str:
        return f"_DocumentTokens({self.spec!r}, shard {self.shard_index}/{self.shard_count})"


def _pad_row(width: int):
    def fn(el):
        t = el["tokens"][:width]
        if len(t) == width:
            return t
        row = np.full(width, PAD_ID, np.int32)
        row[:len(t)] = t
        return row
    return fn


def _split(row) -> dict[str, np.ndarray]:
    row = row["tokens"] if isinstance(row, dict) else row
    return {"inputs": np.asarray(row[:-1], np.int32), "targets": np.asarray(row[1:], np.int32)}


def _tuples_back(state):
    """grain's packing state after a JSON round trip: its ``remainder_slices`` are compared with the
    tuple ``(-1, -1)``, so the lists JSON made of them become tuples again."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in x.items()} if k == "remainder_slices" and isinstance(x, dict)
                    else _tuples_back(x)) for k, x in state.items()}
    if isinstance(state, list):
        return [_tuples_back(x) for x in state]
    return state


class StreamIterator(grain.DatasetIterator):
    """Checkpointable batch iterator of a :class:`StreamingDataset`; ``get_state()`` is a
    JSON-serialisable dict ``{"stream", "pipeline", "shard", "batches"}``; ``set_state`` refuses a
    state of another pipeline or of another process / process count."""

    def __init__(self, parent: grain.DatasetIterator, fingerprint: str, shard: tuple[int, int]):
        super().__init__(parent)
        self._fingerprint, self._shard, self._batches = fingerprint, list(shard), 0

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self._parent)
        self._batches += 1
        return b

    @property
    def step(self) -> int:
        return self._batches

    def get_state(self) -> dict[str, Any]:
        return json.loads(json.dumps({"stream": self._parent.get_state(), "pipeline": self._fingerprint,
                                      "shard": self._shard, "batches": self._batches}))

    def set_state(self, state: dict[str, Any] | bytes | str) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if not isinstance(state, dict) or "stream" not in state:
            raise ValueError(f"state must be a dict from a streaming pipeline's get_state(), got {str(state)[:200]}")
        if state.get("pipeline") != self._fingerprint:
            raise ValueError(f"iterator state belongs to a different streaming pipeline (state pipeline="
                             f"{state.get('pipeline')!r}, this pipeline={self._fingerprint!r}): data, tokenizer, "
                             "seq_len, mode, seed or global batch size changed")
        if list(state.get("shard", [])) != self._shard:
            raise ValueError(f"streaming iterator state of process {state.get('shard')} (index, count) restored on "
                             f"process {self._shard}: a streaming position is per process and cannot be re-sharded; "
                             "resume with the same process count, or use a prepared directory (tokens:DIR)")
        self._parent.set_state(_tuples_back(state["stream"]))
        self._batches = int(state.get("batches", 0))

    def __str__(self) -> str:
        return f"StreamIterator(pipeline={self._fingerprint}, shard={self._shard})"


class StreamingDataset:
    """Batches ``{"inputs", "targets"}`` int32 [batch_size, seq_len] streamed from raw text.

    spec: a :func:`~pldr_jax.data.make_source` spec (or a DocumentSource).  tokenizer: a Tokenizer.
    batch_size: per-process rows.  mode: "pack" | "pad" | "nopad".  seed / shuffle_window: the
    window shuffle of rows (0 = none).  shard_index / shard_count: this process's share.
    num_epochs: passes over the share (None = forever).  split: "train" | "validation" | "all" with
    ``validation_fraction`` (every ``round(1 / fraction)``-th record held out).  chunk_docs /
    num_threads: documents per tokenizer call and sentencepiece threads.
    ``iter(ds)`` / ``ds.iterator()`` give a :class:`StreamIterator`.
    """

    def __init__(self, spec, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, mode: str = "pack",
                 seed: int = 0, shuffle_window: int = 1024, shard_index: int = 0, shard_count: int = 1,
                 num_epochs: int | None = None, split: str = "train", validation_fraction: float = 0.0,
                 chunk_docs: int = 256, num_threads: int = 2):
        if mode not in ("pack", "pad", "nopad"):
            raise ValueError(f"mode must be one of ('pack', 'pad', 'nopad'), got {mode!r}")
        for name, v, lo in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("shard_count", shard_count, 1),
                            ("chunk_docs", chunk_docs, 1), ("num_threads", num_threads, 1),
                            ("shuffle_window", shuffle_window, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index!r}")
        if split not in ("train", "validation", "all"):
            raise ValueError(f"split must be 'train', 'validation' or 'all', got {split!r}")
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
        if split == "validation" and validation_fraction == 0:
            raise ValueError("split='validation' needs validation_fraction > 0")
        self.seq_len, self.batch_size, self.mode, self.seed = int(seq_len), int(batch_size), mode, int(seed)
        self.shard_index, self.shard_count, self.num_epochs = int(shard_index), int(shard_count), num_epochs
        holdout = max(2, round(1 / validation_fraction)) if validation_fraction > 0 and split != "all" else 0
        width = self.seq_len + 1
        ds: grain.IterDataset = _DocumentTokens(spec, tokenizer, shard_index=self.shard_index,
                                                shard_count=self.shard_count, num_epochs=num_epochs,
                                                chunk_docs=int(chunk_docs), num_threads=int(num_threads),
                                                holdout=holdout, validation=split == "validation")
        if mode == "pack":
            ds = gx.ConcatThenSplitIterDataset(ds, length_struct={"tokens": width})
            ds = ds.map(lambda el: el["tokens"].astype(np.int32))
        else:
            if mode == "nopad":
                ds = ds.filter(lambda el: len(el["tokens"]) >= width)
            ds = ds.map(_pad_row(width))
        if shuffle_window:
            ds = gx.WindowShuffleIterDataset(ds, window_size=int(shuffle_window), seed=self.seed)
        self.iter_dataset = ds.map(_split).batch(self.batch_size, drop_remainder=True)
        spec_id = spec if isinstance(spec, str) else repr(spec)
        cfg = dict(stream=spec_id, tokenizer=tokenizer_sha256(tokenizer), seq_len=self.seq_len, mode=mode,
                   global_batch=self.batch_size * self.shard_count, seed=self.seed, window=int(shuffle_window),
                   split=split, holdout=holdout, epochs=num_epochs, chunk=int(chunk_docs))
        self.fingerprint = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]

    def iterator(self, start_step: int = 0) -> StreamIterator:
        """A fresh iterator, advanced by ``start_step`` batches (read and dropped: a stream has no index)."""
        it = StreamIterator(iter(self.iter_dataset), self.fingerprint, (self.shard_index, self.shard_count))
        for _ in range(int(start_step)):
            next(it)
        return it

    def __iter__(self) -> StreamIterator:
        return self.iterator()

    def __repr__(self) -> str:
        return (f"StreamingDataset(mode={self.mode!r}, seq_len={self.seq_len}, batch_size={self.batch_size}, "
                f"shard={self.shard_index}/{self.shard_count}, num_epochs={self.num_epochs})")
