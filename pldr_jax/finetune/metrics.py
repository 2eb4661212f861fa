"""Validation metrics of the fine-tuning tasks (host numpy; no third-party metric package).

classification: accuracy and macro-F1 (mean over the classes present in gold or predictions);
multi-label: micro-F1 at logit 0 and exact-match accuracy; regression: MSE; token classification:
entity-level precision / recall / F1 over BIO spans (an entity counts when type, start and end all
match, as seqeval's default); QA: SQuAD exact match and token F1 (lower-cased, punctuation and
articles dropped), best of the gold answers.
"""

from __future__ import annotations

import collections
import re
import string

import numpy as np

__all__ = ["classification", "multi_label", "regression", "bio_entities", "entity_prf", "squad_em_f1"]


def classification(pred: np.ndarray, gold: np.ndarray) -> dict:
    pred, gold = np.asarray(pred), np.asarray(gold)
    f1s = []
    for c in np.union1d(pred, gold):
        tp = np.sum((pred == c) & (gold == c))
        fp, fn = np.sum((pred == c) & (gold != c)), np.sum((pred != c) & (gold == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(pred == gold)), "macro_f1": float(np.mean(f1s))}


def multi_label(logits: np.ndarray, gold: np.ndarray) -> dict:
    pred, gold = np.asarray(logits) > 0, np.asarray(gold) > 0.5
    tp, fp, fn = np.sum(pred & gold), np.sum(pred & ~gold), np.sum(~pred & gold)
    return {"micro_f1": float(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)),
            "exact_match": float(np.mean(np.all(pred == gold, axis=1)))}


def regression(pred: np.ndarray, gold: np.ndarray) -> dict:
    return {"mse": float(np.mean((np.asarray(pred).reshape(-1) - np.asarray(gold).reshape(-1)) ** 2))}


def bio_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO tag sequence; an I- after O or another type opens an entity."""
    out, cur = set(), None
    for i, t in enumerate(list(tags) + ["O"]):
        if t.startswith("B-") or t == "O" or (t.startswith("I-") and (cur is None or cur[0] != t[2:])):
            if cur is not None:
                out.add((cur[0], cur[1], i - 1))
                cur = None
            if t.startswith(("B-", "I-")):
                cur = (t[2:], i)
    return out


def entity_prf(pred_seqs: list[list[str]], gold_seqs: list[list[str]]) -> dict:
    tp = n_pred = n_gold = 0
    for p, g in zip(pred_seqs, gold_seqs):
        ep, eg = bio_entities(p), bio_entities(g)
        tp, n_pred, n_gold = tp + len(ep & eg), n_pred + len(ep), n_gold + len(eg)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0}


def _norm(s: str) -> list[str]:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", s).split()


def squad_em_f1(preds: list[str], golds: list[list[str]]) -> dict:
    em = f1 = 0.0
    for p, gs in zip(preds, golds):
        pt = _norm(p)
        em += max(float(pt == _norm(g)) for g in gs)
        best = 0.0
        for g in gs:
            gt = _norm(g)
            common = sum((collections.Counter(pt) & collections.Counter(gt)).values())
            if common:
                pr, rc = common / len(pt), common / len(gt)
                best = max(best, 2 * pr * rc / (pr + rc))
            elif not pt and not gt:
                best = 1.0
        f1 += best
    n = max(len(preds), 1)
    return {"exact_match": em / n, "f1": f1 / n}
