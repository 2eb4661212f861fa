"""Document sources: iterables of ``str`` documents from files, JSONL, Parquet, HF datasets or the
embedded corpus.

Every source is re-iterable (each ``iter()`` starts over) and keeps a :class:`SourceStats` of the last
complete pass in ``source.stats``. Common behaviour:

* missing paths raise ``FileNotFoundError`` naming the path; a pass that yields no document raises
  ``ValueError`` ("... yielded no documents");
* empty / whitespace-only documents are skipped and counted (``stats.empty``);
* non-UTF-8 bytes follow ``errors``: ``"replace"`` (default; bad bytes become U+FFFD, the document is
  kept and counted in ``stats.replaced``), ``"skip"`` (the document is dropped, ``stats.skipped``) or
  ``"strict"`` (``ValueError`` naming the file).

Use :func:`make_source` for string specs: ``"builtin"``, a path (file or directory; ``.jsonl`` and
``.parquet`` are recognised by suffix), ``"jsonl:PATH[:FIELD]"``, ``"parquet:PATH[:COLUMN]"``,
``"text:PATH"``, ``"paragraphs:PATH"``, ``"hf:PATH[:FIELD[:SPLIT]]"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import default_corpus_documents

__all__ = ["SourceStats", "DocumentSource", "ListSource", "BuiltinSource", "TextFileSource", "JsonlSource",
           "ParquetSource", "HFDatasetSource", "make_source", "iter_documents"]

_ERRORS = ("replace", "skip", "strict")


@dataclass
class SourceStats:
    """Counts of one pass over a source."""
    documents: int = 0  # documents yielded
    characters: int = 0  # total characters yielded
    replaced: int = 0  # documents kept with invalid UTF-8 replaced by U+FFFD
    skipped: int = 0  # documents dropped because of invalid UTF-8 (errors="skip")
    empty: int = 0  # empty / whitespace-only documents dropped
    files: int = 0  # files read


class DocumentSource:
    """Base class: iterate to get ``str`` documents. Subclasses implement ``_generate(stats)``."""

    name = "source"

    def __init__(self, errors: str = "replace"):
        if errors not in _ERRORS:
            raise ValueError(f"errors must be one of {_ERRORS}, got {errors!r}")
        self.errors = errors
        self.stats = SourceStats()

    def _generate(self, stats: SourceStats) -> Iterator[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        stats = SourceStats()
        for doc in self._generate(stats):
            if not doc.strip():
                stats.empty += 1
                continue
            stats.documents += 1
            stats.characters += len(doc)
            yield doc
        self.stats = stats
        if stats.documents == 0:
            raise ValueError(f"{self!r} yielded no documents (empty={stats.empty}, skipped={stats.skipped}, "
                             f"files={stats.files})")

    def documents(self) -> list[str]:
        """All documents as a list (one full pass; updates ``stats``)."""
        return list(self)

    def _decode(self, data: bytes, stats: SourceStats, where: str) -> str | None:
        """UTF-8 decode following ``self.errors``; None means skip the document."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.errors == "strict":
                raise ValueError(f"invalid UTF-8 in {where}: {e} (use errors='replace' or 'skip')") from None
            if self.errors == "skip":
                stats.skipped += 1
                return None
            stats.replaced += 1
            return data.decode("utf-8", errors="replace")


class ListSource(DocumentSource):
    """In-memory documents (``list[str]``)."""

    name = "list"

    def __init__(self, documents: Sequence[str]):
        super().__init__()
        docs = list(documents)
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise TypeError(f"documents[{i}] must be str, got {type(d).__name__}")
        self._docs = docs

    def _generate(self, stats):
        yield from self._docs

    def __repr__(self):
        return f"ListSource({len(self._docs)} documents)"


class BuiltinSource(DocumentSource):
    """The embedded corpus (:func:`pldr_jax.data.corpus.default_corpus_documents`)."""

    name = "builtin"

    def __init__(self):
        super().__init__()

    def _generate(self, stats):
        yield from default_corpus_documents()

    def __repr__(self):
        return "BuiltinSource()"


def _check_exists(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: path={str(path)!r}")
    return path


def _expand(paths, patterns: Sequence[str], what: str) -> list[Path]:
    """Files named by ``paths`` (files, or directories searched recursively with ``patterns``), sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        _check_exists(p, what)
        if p.is_dir():
            found = sorted({f for pat in patterns for f in p.rglob(pat) if f.is_file()})
            if not found:
                raise ValueError(f"{what}: directory {str(p)!r} has no files matching {list(patterns)}")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise ValueError(f"{what}: no paths given")
    return out


class TextFileSource(DocumentSource):
    """Plain-text files. ``paths``: file(s) and/or directories (recursive ``glob`` patterns).

    split="file": one document per file; "paragraph": one per blank-line-separated paragraph.
    """

    name = "text"

    def __init__(self, paths, *, glob: Sequence[str] | str = ("*.txt", "*.md"), split: str = "file",
                 errors: str = "replace"):
        super().__init__(errors)
        if split not in ("file", "paragraph"):
            raise ValueError(f"split must be 'file' or 'paragraph', got {split!r}")
        self.patterns = (glob,) if isinstance(glob, str) else tuple(glob)
        self.split = split
        self.files = _expand(paths, self.patterns, "text source")

    def _generate(self, stats):
        for f in self.files:
            stats.files += 1
            text = self._decode(f.read_bytes(), stats, str(f))
            if text is None:
                continue
            if self.split == "file":
                yield text
            else:
                yield from _paragraphs(text)

    def __repr__(self):
        return f"TextFileSource({len(self.files)} files, split={self.split!r})"


def _paragraphs(text: str) -> Iterator[str]:
    """Blank-line-separated paragraphs of ``text`` (stripped)."""
    para: list[str] = []
    for line in text.splitlines():
        if line.strip():
            para.append(line)
        elif para:
            yield "\n".join(para).strip()
            para = []
    if para:
        yield "\n".join(para).strip()


class JsonlSource(DocumentSource):
    """JSON-lines file(s) (or directories of ``*.jsonl``); each line an object with a ``field`` string."""

    name = "jsonl"

    def __init__(self, paths, field: str = "text", *, glob: Sequence[str] | str = ("*.jsonl",),
                 errors: str = "replace"):
        super().__init__(errors)
        self.field = field
        self.files = _expand(paths, (glob,) if isinstance(glob, str) else tuple(glob), "jsonl source")

    def _generate(self, stats):
        for f in self.files:
            stats.files += 1
            with open(f, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if not raw.strip():
                        continue
                    where = f"{f}:{lineno}"
                    line = self._decode(raw, stats, where)
                    if line is None:
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"invalid JSON at {where}: {e}") from None
                    if not isinstance(obj, dict) or self.field not in obj:
                        keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                        raise KeyError(f"field={self.field!r} missing at {where} (found {keys})")
                    value = obj[self.field]
                    if value is None:
                        stats.empty += 1
                        continue
                    if not isinstance(value, str):
                        raise TypeError(f"field={self.field!r} at {where} is {type(value).__name__}, not str")
                    yield value

    def __repr__(self):
        return f"JsonlSource({len(self.files)} files, field={self.field!r})"


class ParquetSource(DocumentSource):
    """Parquet file(s) (or directories of ``*.parquet``); one document per row of string ``column``.

    Binary columns are decoded as UTF-8 following ``errors``. Needs ``pyarrow``.
    """

    name = "parquet"

    def __init__(self, paths, column: str = "text", *, glob: Sequence[str] | str = ("*.parquet",),
                 errors: str = "replace", batch_size: int = 1024):
        super().__init__(errors)
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as e:  # pragma: no cover - pyarrow is installed in the test env
            raise ImportError("ParquetSource needs pyarrow: pip install pyarrow") from e
        self.column = column
        self.batch_size = batch_size
        self.files = _expand(paths, (glob,) if isinstance(glob, str) else tuple(glob), "parquet source")

    def _generate(self, stats):
        import pyarrow.parquet as pq
        for f in self.files:
            stats.files += 1
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid etc.
                raise ValueError(f"cannot read parquet file {str(f)!r}: {e}") from None
            names = pf.schema_arrow.names
            if self.column not in names:
                raise KeyError(f"column={self.column!r} not in parquet file {str(f)!r} (columns: {names})")
            for batch in pf.iter_batches(batch_size=self.batch_size, columns=[self.column]):
                for i, value in enumerate(batch.column(0).to_pylist()):
                    if value is None:
                        stats.empty += 1
                        continue
                    if isinstance(value, (bytes, bytearray)):
                        value = self._decode(bytes(value), stats, f"{f} row {i}")
                        if value is None:
                            continue
                    elif not isinstance(value, str):
                        raise TypeError(f"column={self.column!r} in {str(f)!r} holds {type(value).__name__}, "
                                        "not str")
                    yield value

    def __repr__(self):
        return f"ParquetSource({len(self.files)} files, column={self.column!r})"


class HFDatasetSource(DocumentSource):
    """A Hugging Face ``datasets.Dataset`` (or a ``load_from_disk`` directory); documents = ``field``.

    A ``DatasetDict`` needs ``split``. Requires the optional ``datasets`` package only for a path.
    """

    name = "hf"

    def __init__(self, dataset_or_path, field: str = "text", *, split: str | None = None):
        super().__init__()
        self.field = field
        ds = dataset_or_path
        if isinstance(ds, (str, os.PathLike)):
            _check_exists(Path(ds), "Hugging Face dataset directory")
            try:
                import datasets
            except ImportError as e:
                raise ImportError("loading a Hugging Face dataset directory needs the optional 'datasets' "
                                  "package: pip install datasets") from e
            ds = datasets.load_from_disk(os.fspath(ds))
        if isinstance(ds, dict) or isinstance(getattr(ds, "column_names", None), dict):  # a DatasetDict
            splits = list(ds.keys())
            if split is None:
                if len(splits) != 1:
                    raise ValueError(f"dataset has splits {splits}; pass split=...")
                split = splits[0]
            if split not in splits:
                raise KeyError(f"split={split!r} not in dataset splits {splits}")
            ds = ds[split]
        cols = getattr(ds, "column_names", None)
        if cols is not None and field not in cols:
            raise KeyError(f"field={field!r} not in dataset columns {cols}")
        self.dataset = ds

    def _generate(self, stats):
        ds = self.dataset
        if hasattr(ds, "iter"):  # datasets.Dataset: fast batched column access
            rows = (v for b in ds.iter(batch_size=1000) for v in b[self.field])
        else:
            rows = (r[self.field] for r in ds)
        for v in rows:
            if v is None:
                stats.empty += 1
                continue
            if not isinstance(v, str):
                raise TypeError(f"field={self.field!r} holds {type(v).__name__}, not str")
            yield v

    def __repr__(self):
        return f"HFDatasetSource({type(self.dataset).__name__}, field={self.field!r})"


def make_source(spec, **kwargs) -> DocumentSource:
    """A :class:`DocumentSource` from a spec.

    spec: a ``DocumentSource`` (returned as is); a list of ``str`` documents; ``"builtin"``; a path
    (``*.jsonl`` → JSONL field "text", ``*.parquet`` → column "text", other files / directories → text
    files); or ``"KIND:PATH[:NAME[:SPLIT]]"`` with KIND in text, paragraphs, jsonl, parquet, hf
    (NAME = field/column, default "text"). A ``datasets.Dataset`` object is wrapped too.
    kwargs go to the source class (e.g. ``errors="skip"``).
    """
    if isinstance(spec, DocumentSource):
        return spec
    if isinstance(spec, (list, tuple)):
        return ListSource(spec)
    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "column_names"):
            return HFDatasetSource(spec, **kwargs)
        raise TypeError(f"spec must be a str/path, list of str, DocumentSource or datasets.Dataset, "
                        f"got {type(spec).__name__}")
    s = os.fspath(spec)
    if s == "builtin":
        return BuiltinSource()
    kind, rest = None, s
    head, sep, tail = s.partition(":")
    if sep and head in ("text", "paragraphs", "jsonl", "parquet", "hf"):
        kind, rest = head, tail
    if kind is None:
        p = Path(s)
        if p.suffix == ".jsonl":
            return JsonlSource(p, **kwargs)
        if p.suffix == ".parquet":
            return ParquetSource(p, **kwargs)
        if not p.exists():
            raise FileNotFoundError(f"source spec {s!r}: no such file or directory, and not one of "
                                    "'builtin', 'text:', 'paragraphs:', 'jsonl:', 'parquet:', 'hf:'")
        return TextFileSource(p, **kwargs)
    # Path may itself contain ':'; field/column and split are the trailing parts when the path exists.
    path, name, split = _split_spec(rest)
    if kind == "text":
        return TextFileSource(path, **kwargs)
    if kind == "paragraphs":
        return TextFileSource(path, split="paragraph", **kwargs)
    if kind == "jsonl":
        return JsonlSource(path, field=name or "text", **kwargs)
    if kind == "parquet":
        return ParquetSource(path, column=name or "text", **kwargs)
    return HFDatasetSource(path, field=name or "text", split=split, **kwargs)


def _split_spec(rest: str) -> tuple[str, str | None, str | None]:
    """``PATH[:NAME[:SPLIT]]`` → (path, name, split), preferring the longest existing path."""
    parts = rest.split(":")
    for n_path in range(len(parts), 0, -1):
        path = ":".join(parts[:n_path])
        if Path(path).exists() or n_path == 1:
            extra = parts[n_path:]
            if len(extra) > 2:
                raise ValueError(f"source spec: too many ':' fields after path in {rest!r}")
            return path, (extra[0] or None) if extra else None, (extra[1] or None) if len(extra) > 1 else None
    raise AssertionError("unreachable")


def iter_documents(sources: Iterable) -> Iterator[str]:
    """Chain several sources/specs (each via :func:`make_source`)."""
    for s in sources:
        yield from make_source(s)
