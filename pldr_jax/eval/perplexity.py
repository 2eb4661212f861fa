"""Token-level perplexity of a model on documents (token ids, texts, a text/JSONL file or any
iterable dataset).

Each document is scored separately, as lm-evaluation-harness's ``loglikelihood_rolling`` does:
the token stream is ``[prefix_id] + doc`` (prefix EOS: the paper packs documents with an EOS after
each and no BOS), every document token is predicted exactly once, in windows of at most
``max_seq_len`` input tokens.  With ``stride = window`` (default) the windows are disjoint except
the last, which is shifted back to a full window of context (lm-eval's rule); a smaller stride
gives every later window ``window - stride`` tokens of overlapping context (the sliding-window
evaluation of HF's perplexity guide).

``perplexity = exp(sum of NLL / number of predicted tokens)``; with texts also bits per byte
(``sum NLL / ln 2 / UTF-8 bytes``).  Scoring modes ("full", "cached", "causal") are those of
``pldr_jax.eval.multiple_choice`` -- note that in the default "full" mode PLDR's metric tensor A
sees the whole window, later tokens included (the reference's training-loss semantics).
Windows are batched with fixed, bucketed shapes (jitted, few compilations).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..config import PLDRConfig
from .multiple_choice import EOS_ID, _Unit, _units_for, make_encoder, score_units
from .jsonl import iter_jsonl

__all__ = ["rolling_windows", "doc_loglikelihoods", "PerplexityResult", "perplexity_of_tokens", "perplexity_of_texts",
           "read_documents", "perplexity_of_file", "perplexity_of_dataset"]


def rolling_windows(n_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows over the stream ``S = [prefix] + doc`` (len n_tokens + 1) predicting ``S[1:]``.

    Returns (start, end, n_score): input ``S[start:end]``, targets ``S[start+1:end+1]``, of which
    the last ``n_score`` are scored.  Every target is scored exactly once.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    stride = window if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    out, scored = [], 0
    while scored < n_tokens:
        n_new = min(window if scored == 0 else stride, n_tokens - scored)
        end = scored + n_new
        out.append((max(0, end - window), end, n_new))
        scored = end
    return out


def doc_loglikelihoods(cfg: PLDRConfig, params, docs: Sequence[Sequence[int]], *, mode: str = "full", g_lm=None,
                       batch_size: int = 8, window: int | None = None, stride: int | None = None,
                       prefix_id: int = EOS_ID, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log p over every token of each document, and the number of tokens (float64, int64).
    progress: see `pldr_jax.eval.multiple_choice.score_units`."""
    W = cfg.max_seq_len if window is None else int(window)
    if W > cfg.max_seq_len:
        raise ValueError(f"window {W} exceeds max_seq_len={cfg.max_seq_len}")
    units: list[_Unit] = []
    for i, doc in enumerate(docs):
        doc = [int(t) for t in doc]
        if any(t <= 0 or t >= cfg.vocab_size for t in doc):
            raise ValueError(f"document {i}: ids must be in [1, vocab_size={cfg.vocab_size}) (0 is padding)")
        S = [int(prefix_id)] + doc
        for start, end, n in rolling_windows(len(doc), W, stride):
            units += _units_for(i, S[start:end], S[start + 1:end + 1], n, mode)
    sums, counts, _ = score_units(cfg, params, units, len(docs), mode=mode, g_lm=g_lm, batch_size=batch_size,
                                  progress=progress)
    return sums, counts


@dataclasses.dataclass
class PerplexityResult:
    """perplexity = exp(nll / tokens); nll: total negative log-likelihood (nats); tokens: predicted
    tokens; documents; per_doc_nll, per_doc_tokens; bytes and bits_per_byte when texts were given."""
    perplexity: float
    nll: float
    tokens: int
    documents: int
    per_doc_nll: np.ndarray
    per_doc_tokens: np.ndarray
    bytes: int | None = None
    bits_per_byte: float | None = None

    def summary(self) -> dict:
        d = {"perplexity": self.perplexity, "nll_per_token": self.nll / max(self.tokens, 1),
             "tokens": self.tokens, "documents": self.documents}
        if self.bits_per_byte is not None:
            d.update(bytes=self.bytes, bits_per_byte=self.bits_per_byte)
        return d


def perplexity_of_tokens(cfg: PLDRConfig, params, docs: Iterable[Sequence[int]], *, n_bytes: int | None = None,
               **kw) -> PerplexityResult:
    """Perplexity over token-id documents (see ``doc_loglikelihoods`` for the keyword arguments)."""
    docs = [list(d) for d in docs]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError("no non-empty documents to score")
    sums, counts = doc_loglikelihoods(cfg, params, docs, **kw)
    nll, n = float(-sums.sum()), int(counts.sum())
    res = PerplexityResult(perplexity=math.exp(nll / n), nll=nll, tokens=n, documents=len(docs),
                           per_doc_nll=-sums, per_doc_tokens=counts)
    if n_bytes:
        res.bytes = int(n_bytes)
        res.bits_per_byte = nll / math.log(2) / n_bytes
    return res


def perplexity_of_texts(cfg: PLDRConfig, params, texts: Iterable[str], tokenizer, *, add_eos: bool = False,
                        **kw) -> PerplexityResult:
    """Perplexity of text documents.  add_eos: append EOS to each document (as in pretraining, so
    the end of a document is predicted too); off by default, as lm-evaluation-harness's rolling
    log-likelihood (so bits per byte equal the harness's)."""
    encode = make_encoder(tokenizer)
    texts = [t for t in texts if t]
    docs = [encode(t) + ([EOS_ID] if add_eos else []) for t in texts]
    return perplexity_of_tokens(cfg, params, docs, n_bytes=sum(len(t.encode("utf-8")) for t in texts), **kw)


def read_documents(path: str | os.PathLike, split: str = "blank", text_field: str = "text") -> list:
    """Documents of a file: ``.jsonl`` (one object per line with ``text_field`` (str) or
    ``input_ids`` (id list)), else text split by ``split``: "blank" (paragraphs separated by blank
    lines), "line" (one document per line) or "file" (the whole file)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix == ".jsonl":
        docs = []
        for ln, d in iter_jsonl(p):
            if isinstance(d, dict) and "input_ids" in d:
                docs.append([int(t) for t in d["input_ids"]])
            elif isinstance(d, dict) and isinstance(d.get(text_field), str):
                docs.append(d[text_field])
            elif isinstance(d, str):
                docs.append(d)
            else:
                raise ValueError(f"{p}:{ln}: expected an object with {text_field!r} (str) or 'input_ids'")
        return docs
    text = p.read_text(encoding="utf-8")
    if split == "file":
        return [text]
    if split == "line":
        return [ln for ln in text.splitlines() if ln.strip()]
    if split == "blank":
        import re
        return [d.strip("\n") for d in re.split(r"\n\s*\n", text) if d.strip()]
    raise ValueError(f"split must be 'blank', 'line' or 'file', got {split!r}")


def perplexity_of_dataset(cfg: PLDRConfig, params, docs: Iterable, tokenizer=None, *, add_eos: bool = False,
                          max_docs: int | None = None, text_field: str = "text", **kw) -> PerplexityResult:
    """Perplexity over any iterable of documents: strings, id lists, or dicts with ``text_field`` or
    ``input_ids`` (e.g. rows of a grain / Hugging Face dataset).  Text needs a tokenizer."""
    texts, ids = [], []
    for i, d in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            break
        if isinstance(d, dict):
            d = d["input_ids"] if "input_ids" in d else d.get(text_field)
        if isinstance(d, str):
            texts.append(d)
        elif d is not None:
            ids.append([int(t) for t in np.asarray(d).reshape(-1)])
        else:
            raise ValueError(f"document {i}: no {text_field!r} or 'input_ids'")
    if texts and ids:
        raise ValueError("documents mix text and token ids; give one kind")
    if texts:
        if tokenizer is None:
            raise ValueError("text documents need a tokenizer")
        return perplexity_of_texts(cfg, params, texts, tokenizer, add_eos=add_eos, **kw)
    return perplexity_of_tokens(cfg, params, ids, **kw)


def perplexity_of_file(cfg: PLDRConfig, params, path: str | os.PathLike, tokenizer=None, *, split: str = "blank",
                       max_docs: int | None = None, **kw) -> PerplexityResult:
    """Perplexity of a text or JSONL file (see ``read_documents``)."""
    return perplexity_of_dataset(cfg, params, read_documents(path, split), tokenizer, max_docs=max_docs, **kw)
