"""Prepared token directories: the on-disk format written by ``pldr-jax data prepare`` and its reader.

A prepared directory holds the documents of a source, tokenized once (each followed by EOS), back to
back in shard files of memory-mappable ``.npy`` arrays::

    DIR/index.json                      the index (below); written last, so its presence means "complete"
    DIR/tokenizer.model                 a copy of the tokenizer the shards were made with
    DIR/shard-00000.tokens.npy          uint16 [n] (uint32 when the vocabulary exceeds 65,536 pieces)
    DIR/shard-00000.offsets.npy         int64 [d + 1]: document k of the shard is tokens[off[k]:off[k + 1]]
    ...
    DIR/progress.json                   only while preparing (or interrupted): the shards finished so far

``index.json``: ``format`` ("pldr_jax.tokens"), ``version``, ``dtype``, ``vocab_size``, ``eos_id``,
``tokenizer_sha256`` (of the sentencepiece model bytes), ``source`` (the spec), ``shard_tokens``,
``num_tokens``, ``num_documents`` and ``shards``: one ``{"tokens", "offsets", "num_tokens",
"num_documents", "sha256"}`` per shard (sha256 of the token bytes).

Why ``.npy`` and not ArrayRecord: a packed row is an arbitrary ``[start, start + L + 1)`` slice of the
token stream that crosses document (and shard) boundaries; in a flat array that is one read of
exactly those bytes with no decoding, whereas ArrayRecord stores records (documents) in chunks, so a
row costs several record reads, each deserialising its chunk; pre-packed rows would also fix seq_len
at prepare time (``experiments/bench_data.py --formats`` measures both: experiments/README.md "Data
pipeline, prepared vs streaming").

:class:`PreparedTokens` opens a directory and refuses, before any training work, a directory that
is incomplete, a shard missing or truncated, a tokenizer whose hash differs from the one
the shards were made with, and a vocabulary that does not fit the token dtype. Rows are read in
place with positional reads (``os.preadv`` into the row's buffer): a process reads only the bytes of
the rows it uses, nothing is loaded, and -- unlike a memory map -- the pages read do not count
towards the process's resident memory (measured on this machine's kernel: every row touched through
``np.memmap`` mapped a whole large page-cache folio, +351 MB peak RSS for 2048 random rows of a 390 MB
shard, still +32 MB with ``MADV_DONTNEED`` every 16 rows; ``pread``: +0.3 MB).  A read costs a
system call (6-32 us per 1025-token row on this shared machine, i.e. 30-150M tokens/s, far above
what training consumes).  :meth:`PreparedTokens.shard_tokens` still memory-maps a whole shard for
inspection.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "VERSION", "INDEX", "PROGRESS", "TOKENIZER", "PreparedTokens", "PreparedDataError",
           "token_dtype", "tokenizer_sha256", "shard_names", "is_prepared_dir"]

FORMAT = "pldr_jax.tokens"
VERSION = 1
INDEX = "index.json"
PROGRESS = "progress.json"
TOKENIZER = "tokenizer.model"


class PreparedDataError(ValueError):
    """A prepared token directory cannot be used (incomplete, damaged or made with another tokenizer)."""


def token_dtype(vocab_size: int, dtype: str | None = None) -> np.dtype:
    """The shard dtype for ``vocab_size`` pieces: uint16 when it fits, else uint32 (or ``dtype``,
    refused when the vocabulary does not fit it)."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if dtype is None:
        return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"token dtype must be uint16 or uint32, got {dtype!r}")
    if vocab_size > np.iinfo(dt).max + 1:
        raise PreparedDataError(f"a vocabulary of {vocab_size} pieces does not fit the token dtype {dt.name} "
                                f"(ids up to {np.iinfo(dt).max}); use uint32")
    return dt


def tokenizer_sha256(tokenizer) -> str:
    """sha256 (hex) of a tokenizer's serialized sentencepiece model."""
    return hashlib.sha256(tokenizer.model_proto).hexdigest()


def shard_names(i: int) -> tuple[str, str]:
    """(tokens file, offsets file) names of shard ``i``."""
    return f"shard-{i:05d}.tokens.npy", f"shard-{i:05d}.offsets.npy"


def is_prepared_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete prepared directory (its ``index.json``)."""
    return (Path(path) / INDEX).is_file()


def _pread(fd: int, out: np.ndarray, offset: int, what: str) -> np.ndarray:
    """Fill ``out`` with the bytes at ``offset`` of ``fd`` (PreparedDataError if the file is short)."""
    want = out.nbytes
    got = os.preadv(fd, [out], offset)
    while got < want:  # preadv may return less than asked (signals, network file systems)
        n = os.preadv(fd, [memoryview(out).cast("B")[got:]], offset + got)
        if n == 0:
            raise PreparedDataError(f"{what} ended early (read {got} of {want} bytes at offset {offset}): the "
                                    "file was truncated after the directory was opened; prepare it again")
        got += n
    return out


def _npy_shape(path: Path, what: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from an .npy header; PreparedDataError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            return shape, dtype, f.tell()
    except FileNotFoundError:
        raise PreparedDataError(f"{what} is missing: {str(path)!r}; the directory is damaged: prepare it again "
                                "(pldr-jax data prepare ... --out DIR)") from None
    except (ValueError, OSError) as e:
        raise PreparedDataError(f"{what} is not a readable .npy file: {str(path)!r} ({e}); prepare it again") from None


class PreparedTokens:
    """A prepared token directory, validated, read in place (positional reads of the rows used).

    ``PreparedTokens(path, tokenizer=None)``: ``tokenizer`` (a :class:`~pldr_jax.data.Tokenizer`)
    must be the one the shards were made with (sha256 of its model bytes).  Attributes: ``path``,
    ``index`` (the dict), ``dtype``, ``vocab_size``, ``eos_id``, ``num_tokens``, ``num_documents``,
    ``num_shards``, ``shard_token_starts`` int64 [S + 1] and ``shard_doc_starts`` int64 [S + 1]
    (global token / document index of each shard's first one).  Files are opened on first use
    (read-only descriptors, dropped when pickled and reopened in the new process); ``close()``.
    """

    def __init__(self, path: str | os.PathLike, tokenizer=None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"prepared token directory not found: path={str(self.path)!r} (make one with "
                                    "pldr-jax data prepare --data SPEC --tokenizer MODEL --out DIR)")
        idx_path = self.path / INDEX
        if not idx_path.is_file():
            if (self.path / PROGRESS).is_file():
                raise PreparedDataError(f"{str(self.path)!r} is an unfinished preparation ({PROGRESS} but no {INDEX}): "
                                        "run the same pldr-jax data prepare command again to finish it")
            raise PreparedDataError(f"{str(self.path)!r} is not a prepared token directory (no {INDEX}); make one with "
                                    "pldr-jax data prepare --data SPEC --tokenizer MODEL --out DIR")
        try:
            index = json.loads(idx_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PreparedDataError(f"{str(idx_path)!r} is unreadable ({e}); prepare the directory again") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise PreparedDataError(f"{str(idx_path)!r} is not a {FORMAT} index")
        if index.get("version") != VERSION:
            raise PreparedDataError(f"{str(idx_path)!r} has format version {index.get('version')!r}; this pldr_jax "
                                    f"reads version {VERSION}: prepare the directory again")
        self.index: dict[str, Any] = index
        self.vocab_size = int(index["vocab_size"])
        self.dtype = token_dtype(self.vocab_size, index["dtype"])  # refuses a vocabulary that does not fit
        self.eos_id = int(index["eos_id"])
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        shards = index["shards"]
        if not shards:
            raise PreparedDataError(f"{str(idx_path)!r} lists no shards")
        self._shards = shards
        self._data_offset: dict[tuple[int, str], int] = {}
        for i, s in enumerate(shards):  # metadata only: header + size, nothing read yet
            self._check_shard(i, s)
        ntok = np.array([s["num_tokens"] for s in shards], np.int64)
        ndoc = np.array([s["num_documents"] for s in shards], np.int64)
        self.shard_token_starts = np.concatenate([[0], np.cumsum(ntok)]).astype(np.int64)
        self.shard_doc_starts = np.concatenate([[0], np.cumsum(ndoc)]).astype(np.int64)
        self.num_tokens = int(self.shard_token_starts[-1])
        self.num_documents = int(self.shard_doc_starts[-1])
        if (self.num_tokens, self.num_documents) != (index["num_tokens"], index["num_documents"]):
            raise PreparedDataError(f"{str(idx_path)!r}: the shards' counts ({self.num_tokens} tokens, "
                                    f"{self.num_documents} documents) disagree with the index totals")
        self._fds: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ validation
    def check_tokenizer(self, tokenizer) -> None:
        """PreparedDataError unless ``tokenizer`` is the one the shards were made with."""
        got = tokenizer_sha256(tokenizer)
        if got != self.index["tokenizer_sha256"]:
            raise PreparedDataError(
                f"tokenizer mismatch: {str(self.path)!r} was prepared with a tokenizer of sha256 "
                f"{self.index['tokenizer_sha256'][:16]}... ({self.vocab_size} pieces) but the given one "
                f"({getattr(tokenizer, 'path', None)!r}, {tokenizer.vocab_size} pieces) has sha256 {got[:16]}...; "
                f"use {str(self.path / TOKENIZER)!r} (the default) or prepare the data again with this tokenizer")

    def _check_shard(self, i: int, s: dict) -> None:
        for key, dtype, n in (("tokens", self.dtype, s["num_tokens"]),
                              ("offsets", np.dtype(np.int64), s["num_documents"] + 1)):
            f = self.path / s[key]
            shape, dt, header = _npy_shape(f, f"shard {i} ({key})")
            if shape != (n,) or dt != dtype:
                raise PreparedDataError(f"shard {i} ({key}) {str(f)!r} holds {dt} {shape}, the index says {dtype} "
                                        f"({n},): the directory is damaged; prepare it again")
            self._data_offset[(i, key)] = header
            size, want = f.stat().st_size, header + n * dtype.itemsize
            if size != want:
                raise PreparedDataError(f"shard {i} ({key}) {str(f)!r} is {'truncated' if size < want else 'too long'}"
                                        f" ({size} bytes, expected {want}); the directory is damaged: prepare it "
                                        "again")

    def verify(self, chunk_tokens: int = 1 << 24) -> None:
        """Read every shard and compare its sha256 with the index (slow: reads all tokens)."""
        for i, s in enumerate(self._shards):
            h = hashlib.sha256()
            n = s["num_tokens"]
            for a in range(0, n, chunk_tokens):
                h.update(self._read_shard(i, "tokens", a, min(n, a + chunk_tokens), self.dtype).tobytes())
            if h.hexdigest() != s["sha256"]:
                raise PreparedDataError(f"shard {i} {str(self.path / s['tokens'])!r} does not match the sha256 in the "
                                        "index: corrupted bytes; prepare the directory again")

    # ------------------------------------------------------------------ access
    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def _fd(self, i: int, key: str) -> int:
        fd = self._fds.get((i, key))
        if fd is None:
            with self._lock:
                fd = self._fds.get((i, key))
                if fd is None:
                    fd = self._fds[(i, key)] = os.open(self.path / self._shards[i][key], os.O_RDONLY)
        return fd

    def _read_shard(self, i: int, key: str, lo: int, hi: int, dtype: np.dtype) -> np.ndarray:
        """Elements [lo, hi) of shard ``i``'s ``key`` ("tokens" | "offsets") array."""
        out = np.empty(hi - lo, dtype)
        return _pread(self._fd(i, key), out, self._data_offset[(i, key)] + lo * dtype.itemsize,
                      f"shard {i} ({key}) {str(self.path / self._shards[i][key])!r}")

    def shard_tokens(self, i: int) -> np.ndarray:
        """Shard ``i``'s tokens as a read-only memory map (for inspection; training reads rows with pread)."""
        return np.load(self.path / self._shards[i]["tokens"], mmap_mode="r")

    def read(self, start: int, stop: int) -> np.ndarray:
        """int32 tokens ``[start, stop)`` of the whole stream (crossing shard boundaries)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        i = int(np.searchsorted(self.shard_token_starts, start, side="right")) - 1
        parts = []
        pos = start
        while pos < stop:
            base, end = int(self.shard_token_starts[i]), int(self.shard_token_starts[i + 1])
            b = min(stop, end)
            parts.append(self._read_shard(i, "tokens", pos - base, b - base, self.dtype))
            pos = b
            i += 1
        if len(parts) == 1:
            return parts[0].astype(np.int32)
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    def document_bounds(self, d: int) -> tuple[int, int]:
        """Global token range [start, stop) of document ``d``."""
        if not 0 <= d < self.num_documents:
            raise IndexError(f"document {d} outside [0, {self.num_documents})")
        i = int(np.searchsorted(self.shard_doc_starts, d, side="right")) - 1
        k = d - int(self.shard_doc_starts[i])
        a, b = self._read_shard(i, "offsets", k, k + 2, np.dtype(np.int64))
        base = int(self.shard_token_starts[i])
        return base + int(a), base + int(b)

    def document(self, d: int) -> np.ndarray:
        """int32 tokens of document ``d`` (EOS included)."""
        return self.read(*self.document_bounds(d))

    def document_lengths(self, doc_start: int = 0, doc_stop: int | None = None, chunk: int = 1 << 20):
        """Yields int64 arrays of the lengths of documents ``[doc_start, doc_stop)``, in order, at
        most ``chunk`` at a time (a pass over the offsets that never holds more)."""
        doc_stop = self.num_documents if doc_stop is None else doc_stop
        for i in range(self.num_shards):
            lo, hi = int(self.shard_doc_starts[i]), int(self.shard_doc_starts[i + 1])
            a, b = max(lo, doc_start), min(hi, doc_stop)
            for c in range(a, b, chunk):
                e = min(b, c + chunk)
                yield np.diff(self._read_shard(i, "offsets", c - lo, e - lo + 1, np.dtype(np.int64)))

    def close(self) -> None:
        """Close the open shard files (they reopen on the next read)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, half-built object
            pass

    def fingerprint(self) -> str:
        """Short sha256 of the index's shard hashes (identifies the data in iterator states)."""
        h = hashlib.sha256(self.index["tokenizer_sha256"].encode())
        for s in self._shards:
            h.update(f"{s['sha256']}:{s['num_tokens']}:{s['num_documents']};".encode())
        return h.hexdigest()[:16]

    def __getstate__(self):  # picklable for grain worker processes: files are reopened lazily
        d = dict(self.__dict__)
        d["_fds"], d["_lock"] = {}, None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"PreparedTokens({str(self.path)!r}, {self.num_tokens} tokens, {self.num_documents} documents, "
                f"{self.num_shards} shards, {self.dtype.name})")
