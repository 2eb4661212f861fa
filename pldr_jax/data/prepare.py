"""``pldr-jax data prepare``: tokenize a document source once into a prepared token directory.

:func:`prepare_tokens` reads the source lazily, sends chunks of documents (``chunk_chars``
characters each) to ``workers`` tokenizer processes (at most ``2 x workers`` chunks in flight, so
memory does not grow with the corpus), and writes the tokens, in source order, into shards of
about ``shard_tokens`` tokens (whole documents; see :mod:`pldr_jax.data.shards` for the format).

Resumable: after each shard, ``progress.json`` records the shards written and the documents they
hold.  Run the same command again after an interruption and it keeps those shards, skips that many
documents of the source (reading, not tokenizing them) and continues; the result is identical to
an uninterrupted run.  ``index.json`` is written last.  Memory: about two shards' worth of tokens
(``2 x shard_tokens x itemsize``) plus the chunks in flight.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .shards import (FORMAT, INDEX, PROGRESS, TOKENIZER, VERSION, PreparedDataError, PreparedTokens, shard_names,
                     token_dtype, tokenizer_sha256)
from .sources import DocumentSource, make_source
from .tokenizer import Tokenizer

__all__ = ["prepare_tokens", "DEFAULT_SHARD_TOKENS"]

DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB uint16 shards

_WORKER_TOK: Tokenizer | None = None


def _init_worker(proto: bytes) -> None:
    global _WORKER_TOK
    _WORKER_TOK = Tokenizer.from_bytes(proto)


def _encode(tok: Tokenizer, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n] ``dtype``, lengths int64 [len(docs)]) of ``docs``, each followed by EOS."""
    return tok.encode_flat(docs, add_eos=True, dtype=dtype)


def _encode_in_worker(docs: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_WORKER_TOK, docs, np.dtype(dtype))


def _chunks(docs: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    n = 0
    for d in docs:
        chunk.append(d)
        n += len(d)
        if n >= chunk_chars:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _differences(path: Path, header: dict) -> tuple[dict, list[str]]:
    """(the JSON record at ``path``, the keys of ``header`` whose values it does not share)."""
    rec = json.loads(path.read_text())
    return rec, [k for k in header if rec.get(k) != header[k]]


def _spec_str(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return repr(source)


def prepare_tokens(source, tokenizer, out: str | os.PathLike, *, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   workers: int = 1, chunk_chars: int = 1 << 22, dtype: str | None = None, overwrite: bool = False,
                   progress: bool = True, on_shard: Callable[[dict], Any] | None = None,
                   log: Callable[[str], Any] = print) -> PreparedTokens:
    """Tokenize ``source`` once into the prepared directory ``out`` and return it opened.

    source: a spec for :func:`~pldr_jax.data.make_source` ("jsonl:PATH:FIELD", a directory, ...) or a
        ``DocumentSource``.  tokenizer: a :class:`Tokenizer` or the path of a ``.model``.
    shard_tokens: tokens per shard (a shard ends at the first document boundary past it).
    workers: tokenizer processes (1: tokenize in this process).  dtype: None = uint16 when the
        vocabulary fits, else uint32.  overwrite: delete a previous (complete or partial) result.
    progress: a tqdm bar on stderr.  on_shard: called with each finished shard's index entry.
    An existing complete directory made from the same source and tokenizer is returned as is; an
    unfinished one is resumed (see the module docstring); anything else is refused.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if not isinstance(shard_tokens, (int, np.integer)) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    dt = token_dtype(tok.vocab_size, dtype)
    out = Path(out)
    spec = _spec_str(source)
    header = {"format": FORMAT, "version": VERSION, "dtype": dt.name, "vocab_size": tok.vocab_size,
              "eos_id": tok.eos_id, "tokenizer_sha256": tokenizer_sha256(tok), "source": spec,
              "shard_tokens": int(shard_tokens)}
    if overwrite and out.exists():
        shutil.rmtree(out)
    shards: list[dict] = []
    if (out / INDEX).is_file():
        done, diff = _differences(out / INDEX, header)
        if diff:
            raise PreparedDataError(f"{str(out)!r} already holds prepared data that differs in {diff}; pass "
                                    "overwrite=True (--overwrite) or another --out")
        log(f"{out}: already prepared ({done['num_tokens']} tokens); nothing to do")
        return PreparedTokens(out, tok)
    if (out / PROGRESS).is_file():
        prog, diff = _differences(out / PROGRESS, header)
        if diff:
            raise PreparedDataError(f"{str(out)!r} holds an unfinished preparation with other settings ({diff}); "
                                    "rerun it with the same ones, or pass overwrite=True (--overwrite)")
        shards = prog["shards"]
        for i, s in enumerate(shards):  # the shards recorded as finished must still be intact
            for key in ("tokens", "offsets"):
                if not (out / s[key]).is_file():
                    raise PreparedDataError(f"{str(out)!r}: finished shard {i} lost its file {s[key]!r}; pass "
                                            "overwrite=True (--overwrite) to start again")
    elif out.exists() and any(out.iterdir()):
        raise PreparedDataError(f"--out {str(out)!r} exists and is not a prepared token directory; choose an empty "
                                "or new directory")
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("shard-*"):  # files of a shard the interruption left unfinished
        if f.name not in {s[k] for s in shards for k in ("tokens", "offsets")}:
            f.unlink()
    own = out / TOKENIZER
    if not own.is_file() or tokenizer_sha256(Tokenizer.load(own)) != header["tokenizer_sha256"]:
        own.write_bytes(tok.model_proto)

    skip = sum(s["num_documents"] for s in shards)
    if skip:
        log(f"{out}: resuming after {len(shards)} finished shards ({skip} documents)")
    src = source if isinstance(source, DocumentSource) else make_source(source)
    docs = itertools.islice(iter(src), skip, None)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc=f"prepare {out.name}", unit="doc", initial=skip, dynamic_ncols=True, file=sys.stderr)
    buf_tokens: list[np.ndarray] = []
    buf_lengths: list[np.ndarray] = []
    n_buf = 0
    t0 = time.perf_counter()
    new_tokens = 0

    def write_shard(tokens: np.ndarray, lengths: np.ndarray) -> None:
        i = len(shards)
        tname, oname = shard_names(i)
        _save_npy(out / tname, tokens)
        _save_npy(out / oname, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        entry = {"tokens": tname, "offsets": oname, "num_tokens": int(len(tokens)),
                 "num_documents": int(len(lengths)), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
        shards.append(entry)
        _write_json(out / PROGRESS, {**header, "shards": shards})
        if on_shard is not None:
            on_shard(entry)

    def absorb(tokens: np.ndarray, lengths: np.ndarray) -> None:
        nonlocal n_buf, buf_tokens, buf_lengths, new_tokens
        buf_tokens.append(tokens)
        buf_lengths.append(lengths)
        n_buf += len(tokens)
        new_tokens += len(tokens)
        if bar is not None:
            bar.update(len(lengths))
            bar.set_postfix(tokens=f"{new_tokens:.3g}", tok_s=f"{new_tokens / (time.perf_counter() - t0):.3g}")
        while n_buf >= shard_tokens:
            toks, lens = np.concatenate(buf_tokens), np.concatenate(buf_lengths)
            ends = np.cumsum(lens)
            k = int(np.searchsorted(ends, shard_tokens, side="left")) + 1  # docs up to the one crossing the limit
            cut = int(ends[k - 1])
            write_shard(toks[:cut], lens[:k])
            buf_tokens, buf_lengths = [toks[cut:]], [lens[k:]]
            n_buf = len(toks) - cut

    try:
        if workers == 1:
            for chunk in _chunks(docs, chunk_chars):
                absorb(*_encode(tok, chunk, dt))
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX/threads
            with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.model_proto,)) as pool:
                pending: deque = deque()
                for chunk in _chunks(docs, chunk_chars):
                    pending.append(pool.apply_async(_encode_in_worker, (chunk, dt.name)))
                    if len(pending) >= 2 * workers:
                        absorb(*pending.popleft().get())
                while pending:
                    absorb(*pending.popleft().get())
        if n_buf or not shards:
            toks = np.concatenate(buf_tokens) if buf_tokens else np.zeros(0, dt)
            lens = np.concatenate(buf_lengths) if buf_lengths else np.zeros(0, np.int64)
            if len(lens):
                write_shard(toks, lens)
    finally:
        if bar is not None:
            bar.close()
    if not shards:
        raise ValueError(f"source {spec!r} yielded no documents")
    index = {**header, "num_tokens": sum(s["num_tokens"] for s in shards),
             "num_documents": sum(s["num_documents"] for s in shards), "shards": shards}
    _write_json(out / INDEX, index)
    (out / PROGRESS).unlink()
    dt_s = time.perf_counter() - t0
    log(f"{out}: {index['num_documents']} documents, {index['num_tokens']} tokens ({dt.name}) in {len(shards)} "
        f"shards; {new_tokens} tokens tokenized in {dt_s:.1f} s ({new_tokens / max(dt_s, 1e-9):,.0f} tokens/s)")
    return PreparedTokens(out, tok)
