"""Training rows built on the fly from a prepared token directory (no rows, no tokens in memory).

Random-access grain sources whose element ``i`` is an int32 row of ``width = seq_len + 1`` tokens,
with the same meaning as :func:`pldr_jax.data.pipeline.make_rows` on the same documents:

* :class:`PackedRows` -- row ``i`` is tokens ``[start + i * width, start + (i + 1) * width)`` of the
  stream (documents back to back, rows crossing document and shard boundaries); the partial last
  row is dropped.  Only the token range is kept: O(1) memory.
* :class:`DocumentRows` -- one row per document, truncated or right-padded with 0 ("pad"), or only
  documents of at least ``width`` tokens, truncated ("nopad"; the kept document ids are one int64
  each, found in one pass over the offsets, read in chunks).

Each holds a :class:`~pldr_jax.data.shards.PreparedTokens` (files opened lazily, picklable), a
``fingerprint`` naming the data and range, and ``tokens_per_epoch`` (non-pad targets of all rows).
"""

from __future__ import annotations

import hashlib

import numpy as np

from .shards import PreparedTokens

__all__ = ["PackedRows", "DocumentRows", "token_rows"]

PAD_ID = 0


class _Rows:
    """Common part: ``len``, index checks and the fingerprint of (kind, data, range, width)."""
    _n = 0

    def __len__(self) -> int:
        return self._n

    def _index(self, i) -> int:
        i = int(i)
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} outside [0, {self._n})")
        return i

    @staticmethod
    def _fingerprint(kind: str, store: PreparedTokens, lo: int, hi: int, width: int) -> str:
        return hashlib.sha256(f"{kind}:{store.fingerprint()}:{lo}:{hi}:{width}".encode()).hexdigest()[:16]


class PackedRows(_Rows):
    """Packed rows of the token range ``[token_start, token_stop)`` of ``store`` (see module doc)."""

    def __init__(self, store: PreparedTokens, width: int, token_start: int = 0, token_stop: int | None = None):
        self.store, self.width = store, int(width)
        self.token_start = int(token_start)
        self.token_stop = store.num_tokens if token_stop is None else int(token_stop)
        self._n = max(self.token_stop - self.token_start, 0) // self.width
        self.tokens_per_epoch = self._n * (self.width - 1)
        self.fingerprint = self._fingerprint("pack", store, self.token_start, self.token_stop, self.width)

    def __getitem__(self, i: int) -> np.ndarray:
        a = self.token_start + self._index(i) * self.width
        return self.store.read(a, a + self.width)

    def __repr__(self) -> str:
        return f"PackedRows({self._n} rows x {self.width}, tokens [{self.token_start}, {self.token_stop}))"


class DocumentRows(_Rows):
    """One row per document of ``[doc_start, doc_stop)``: mode "pad" or "nopad" (see module doc)."""

    def __init__(self, store: PreparedTokens, width: int, mode: str, doc_start: int = 0, doc_stop: int | None = None):
        if mode not in ("pad", "nopad"):
            raise ValueError(f"DocumentRows mode must be 'pad' or 'nopad', got {mode!r}")
        self.store, self.width, self.mode = store, int(width), mode
        self.doc_start = int(doc_start)
        self.doc_stop = store.num_documents if doc_stop is None else int(doc_stop)
        self._docs = None
        kept = 0
        tokens = 0
        ids = []
        base = self.doc_start
        for lens in store.document_lengths(self.doc_start, self.doc_stop):
            if mode == "pad":
                tokens += int(np.minimum(lens, self.width).sum() - len(lens))
                kept += len(lens)
            else:
                sel = np.flatnonzero(lens >= self.width)
                ids.append(sel + base)
                kept += len(sel)
                tokens += len(sel) * (self.width - 1)
            base += len(lens)
        if mode == "nopad":
            self._docs = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self._n = kept
        self.tokens_per_epoch = tokens
        self.fingerprint = self._fingerprint(mode, store, self.doc_start, self.doc_stop, self.width)

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._index(i)
        d = self.doc_start + i if self._docs is None else int(self._docs[i])
        a, b = self.store.document_bounds(d)
        t = self.store.read(a, min(b, a + self.width))
        if len(t) == self.width:
            return t
        row = np.full(self.width, PAD_ID, np.int32)
        row[:len(t)] = t
        return row

    def __repr__(self) -> str:
        return (f"DocumentRows({self.mode}, {self._n} rows x {self.width}, "
                f"documents [{self.doc_start}, {self.doc_stop}))")


def token_rows(store: PreparedTokens, seq_len: int, mode: str, doc_start: int = 0,
               doc_stop: int | None = None) -> PackedRows | DocumentRows:
    """The rows of documents ``[doc_start, doc_stop)`` of ``store`` for ``mode`` ("pack" | "pad" | "nopad")."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if mode == "pack":
        a = store.document_bounds(doc_start)[0] if doc_start < store.num_documents else store.num_tokens
        stop = store.num_documents if doc_stop is None else doc_stop
        b = store.document_bounds(stop - 1)[1] if stop > 0 else 0
        return PackedRows(store, seq_len + 1, a, max(a, b))
    if mode in ("pad", "nopad"):
        return DocumentRows(store, seq_len + 1, mode, doc_start, doc_stop)
    raise ValueError(f"mode must be one of ('pack', 'pad', 'nopad'), got {mode!r}")
