"""Small task sets made from the embedded corpus (`pldr_jax.data.corpus`), so fine-tuning runs offline.

  seq-cls    "which module does this docstring passage come from": passages of ~`words` words from
             the `classes` longest standard-library module docstrings, labelled with the module.
  token-cls  tag identifiers: the words of corpus sentences, "B-ID" for a Python identifier with an
             underscore, a dot or call parentheses (``sys.path``, ``__init__``, ``open()``), else "O".
  qa         "what does X return?": corpus sentences (5-25 words) with the word "return(s)", X the first identifier
             before it (else the first word), the answer the words after it to the sentence's end
             (SQuAD records).
  sft        prompt "Describe the Python module NAME." -> response: the first sentence of its docstring.

Deterministic for one Python installation (the corpus is).  `embedded_records(task)` -> records
with the default field names (`data.Fields()`).
"""

from __future__ import annotations

import re

from ..data.corpus import STDLIB_MODULES, default_corpus_documents

__all__ = ["EMBEDDED_TASKS", "embedded_records"]

EMBEDDED_TASKS = ("seq-cls", "token-cls", "qa", "sft")
_IDENT = re.compile(r"^[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*(?:\(\))?$")


def _module_docs() -> list[tuple[str, str]]:
    """(module, docstring) of the corpus's module docstrings (the documents after the pydoc topics)."""
    from ..data import corpus
    out = []
    for name in STDLIB_MODULES:
        doc = corpus._module_docstring(name)
        if doc:
            out.append((name, doc))
    return out


def _is_identifier(w: str) -> bool:
    w = w.strip(",;:")
    return bool(_IDENT.match(w)) and ("_" in w or "." in w.rstrip(".") or w.endswith("()"))


def embedded_records(task: str, *, classes: int = 4, words: int = 24, limit: int | None = None) -> list[dict]:
    if task not in EMBEDDED_TASKS:
        raise ValueError(f"unknown embedded task {task!r}; choose from {list(EMBEDDED_TASKS)}")
    out: list[dict] = []
    if task == "seq-cls":
        mods = sorted(_module_docs(), key=lambda m: -len(m[1]))[:classes]
        for name, doc in mods:
            ws = doc.split()
            for i in range(0, len(ws) - words // 2, words):
                out.append({"text": " ".join(ws[i:i + words]), "label": name})
    elif task == "token-cls":
        for doc in default_corpus_documents():
            for sent in re.split(r"(?<=[.!?])\s+", doc):
                ws = sent.split()
                if 4 <= len(ws) <= 40:
                    tags = ["B-ID" if _is_identifier(w) else "O" for w in ws]
                    if "B-ID" in tags:
                        out.append({"tokens": ws, "tags": tags})
    elif task == "qa":
        for doc in default_corpus_documents():
            for sent in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                ws = sent.split()
                if not 5 <= len(ws) <= 25:
                    continue
                at = next((i for i, w in enumerate(ws) if w in ("return", "returns")), None)
                if at is None or at == 0 or at > len(ws) - 2:
                    continue
                subject = next((w.strip(",;:") for w in ws[:at] if _is_identifier(w)), ws[0].strip(",;:"))
                answer = " ".join(ws[at + 1:]).rstrip(".!?")
                ctx = " ".join(ws)
                start = len(" ".join(ws[:at + 1])) + 1
                if answer and ctx[start:start + len(answer)] == answer:
                    out.append({"question": f"What does {subject} return?", "context": ctx,
                                "answers": {"text": [answer], "answer_start": [start]}})
    else:
        for name, doc in _module_docs():
            first = re.split(r"(?<=[.!?])\s+", " ".join(doc.split()))[0]
            out.append({"prompt": f"Describe the Python module {name}.\n", "response": first})
    return out[:limit] if limit else out
