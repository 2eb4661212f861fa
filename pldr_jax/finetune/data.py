"""Fine-tuning data: records from JSONL / Parquet / a saved Hugging Face dataset -> tokenised arrays.

Each task reads named fields (the `Fields` of the command line):

  seq-cls    text, label (a name, an id, a list of names = multi-label, or a float = regression)
  token-cls  tokens (list of words), tags (list of BIO tag names, one per word)
  qa         question, context, answers (SQuAD: {"text": [..], "answer_start": [..]}) or
             answer + answer_start
  sft        prompt, response

Every sequence gets EOS appended and is right-padded with id 0 to `max_len` (the authors' recipe);
longer ones are truncated (for QA only the context's tail, and an answer cut off is an error).
Problems are reported before any training as one ValueError naming the file, the record and the
field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..heads import IGNORE_INDEX

TASKS = ("seq-cls", "token-cls", "qa", "sft")

__all__ = ["TASKS", "Fields", "Encoded", "read_records", "label_space", "encode", "split_valid"]


@dataclasses.dataclass(frozen=True)
class Fields:
    text: str = "text"
    label: str = "label"
    tokens: str = "tokens"
    tags: str = "tags"
    question: str = "question"
    context: str = "context"
    answers: str = "answers"
    prompt: str = "prompt"
    response: str = "response"


@dataclasses.dataclass
class Encoded:
    """Arrays of one split.  tokens [N, L] int32 (0 = pad); labels: [N] int / [N, n] float / [N, L]
    int (-100 ignored) / (start [N], end [N]) for QA / response mask [N, L] bool for SFT; meta: what
    the metrics need per record (word starts, answer texts, ...)."""
    tokens: np.ndarray
    labels: Any
    meta: list

    def __len__(self):
        return int(self.tokens.shape[0])


# --------------------------------------------------------------------------- reading
def read_records(source: str | Path | Sequence[dict], where: str | None = None) -> list[dict]:
    """A list of dict records from a .jsonl/.json file, a .parquet file, a folder written by
    `datasets.Dataset.save_to_disk`, or a list already in memory."""
    if not isinstance(source, (str, Path)):
        return [dict(r) for r in source]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{path} is a folder: reading a saved Hugging Face dataset needs the `datasets` "
                             f"package (pip install datasets), or pass a .jsonl / .parquet file") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path} holds several splits {sorted(ds)}; pass the folder of one split")
        return [dict(r) for r in ds]
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if suffix in (".jsonl", ".json"):
        text = path.read_text()
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON object: {e}") from None
        return out
    raise ValueError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .parquet or a saved "
                     f"Hugging Face dataset folder")


def _field(rec: dict, name: str, where: str, i: int):
    if not isinstance(rec, dict) or name not in rec:
        keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise ValueError(f"{where}: record {i} has no field {name!r} (fields: {keys}); name it with the "
                         f"matching --*-field option")
    return rec[name]


# --------------------------------------------------------------------------- labels
def label_space(task: str, records: list[dict], fields: Fields, where: str) -> tuple[tuple[str, ...], str | None]:
    """(label names in id order, problem_type) found in training records: seq-cls names sorted
    (ints keep their values: names "0".."n-1"), multi-label from lists, regression from floats;
    token-cls: the sorted tag names with "O" first."""
    if task == "seq-cls":
        vals = [_field(r, fields.label, where, i) for i, r in enumerate(records)]
        if all(isinstance(v, list) for v in vals):
            names = sorted({str(x) for v in vals for x in v})
            return tuple(names), "multi_label_classification"
        if all(isinstance(v, float) for v in vals):
            return ("LABEL_0",), "regression"
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
            n = max(vals) + 1
            return tuple(str(i) for i in range(n)), "single_label_classification"
        if all(isinstance(v, str) for v in vals):
            return tuple(sorted(set(vals))), "single_label_classification"
        raise ValueError(f"{where}: field {fields.label!r} mixes kinds of labels (names, ids, lists, floats)")
    if task == "token-cls":
        tags = {str(t) for i, r in enumerate(records) for t in _field(r, fields.tags, where, i)}
        return tuple(["O"] * ("O" in tags) + sorted(tags - {"O"})), None
    return (), None


# --------------------------------------------------------------------------- encoding
def _pad(rows: list[list[int]], max_len: int) -> np.ndarray:
    out = np.zeros((len(rows), max_len), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def encode(task: str, records: list[dict], tok, max_len: int, fields: Fields, labels: tuple[str, ...] = (),
           problem_type: str | None = None, where: str = "data", drop_long: bool = False) -> Encoded:
    """Check and tokenise records for `task` (see the module docstring).  drop_long: QA records
    whose answer lies past `max_len` are left out instead of raising (the embedded task set)."""
    if not records:
        raise ValueError(f"{where}: no records (empty data)")
    eos = tok.eos_id
    enc = lambda s: tok.encode(s) if s else []
    if task == "seq-cls":
        ids = {n: i for i, n in enumerate(labels)}
        rows, ys = [], []
        for i, r in enumerate(records):
            text, y = _field(r, fields.text, where, i), _field(r, fields.label, where, i)
            rows.append((enc(str(text))[:max_len - 1]) + [eos])
            if problem_type == "regression":
                ys.append([float(y)])
            elif problem_type == "multi_label_classification":
                bad = [str(x) for x in y if str(x) not in ids] if isinstance(y, list) else [y]
                if bad:
                    raise ValueError(f"{where}: record {i}: label {bad[0]!r} is not in id2label {list(labels)}")
                ys.append([1.0 if n in {str(x) for x in y} else 0.0 for n in labels])
            else:
                if str(y) not in ids:
                    raise ValueError(f"{where}: record {i}: label {y!r} is not in id2label {list(labels)}")
                ys.append(ids[str(y)])
        y_arr = np.asarray(ys, np.float32 if problem_type != "single_label_classification" else np.int32)
        if problem_type == "regression":
            y_arr = y_arr[:, 0]
        return Encoded(_pad(rows, max_len), y_arr, [None] * len(rows))
    if task == "token-cls":
        ids = {n: i for i, n in enumerate(labels)}
        rows, ys, meta = [], [], []
        for i, r in enumerate(records):
            words, tags = _field(r, fields.tokens, where, i), _field(r, fields.tags, where, i)
            if len(words) != len(tags):
                raise ValueError(f"{where}: record {i}: {len(words)} words but {len(tags)} tags")
            row, lab, starts = [], [], []
            for w, t in zip(words, tags):
                if str(t) not in ids:
                    raise ValueError(f"{where}: record {i}: tag {t!r} is not in id2label {list(labels)}")
                p = tok.encode(str(w)) or [tok.unk_id]
                if len(row) + len(p) > max_len - 1:
                    break
                starts.append(len(row))
                row += p
                lab += [ids[str(t)]] + [IGNORE_INDEX] * (len(p) - 1)   # the first piece carries the tag
            rows.append(row + [eos])
            ys.append(lab + [IGNORE_INDEX])
            meta.append({"tags": [str(t) for t in tags[:len(starts)]], "starts": starts})
        y = np.full((len(rows), max_len), IGNORE_INDEX, np.int32)
        for i, lab in enumerate(ys):
            y[i, :len(lab)] = lab
        return Encoded(_pad(rows, max_len), y, meta)
    if task == "qa":
        rows, starts, ends, meta = [], [], [], []
        for i, r in enumerate(records):
            q, ctx = str(_field(r, fields.question, where, i)), str(_field(r, fields.context, where, i))
            ans = _field(r, fields.answers, where, i)
            if isinstance(ans, dict):
                texts, a_starts = list(ans.get("text", [])), list(ans.get("answer_start", []))
            else:
                texts, a_starts = [str(ans)], [_field(r, "answer_start", where, i)]
            if not texts or len(texts) != len(a_starts):
                raise ValueError(f"{where}: record {i}: answers need matching 'text' and 'answer_start' lists")
            a, s = str(texts[0]), int(a_starts[0])
            if s < 0 or s + len(a) > len(ctx) or ctx[s:s + len(a)] != a:
                raise ValueError(f"{where}: record {i}: the answer span [{s}, {s + len(a)}) {a!r} is outside the "
                                 f"context or does not match its text there")
            q_ids = enc(q) + [eos]
            pre, mid, post = enc(ctx[:s]), enc(a), enc(ctx[s + len(a):])
            st = len(q_ids) + len(pre)
            en = st + len(mid) - 1
            row = (q_ids + pre + mid + post)[:max_len - 1] + [eos]
            if en >= max_len - 1:
                if drop_long:
                    continue
                raise ValueError(f"{where}: record {i}: the answer lies past --max-length {max_len} tokens")
            rows.append(row)
            starts.append(st)
            ends.append(en)
            meta.append({"answers": [str(t) for t in texts], "context_start": len(q_ids)})
        if not rows:
            raise ValueError(f"{where}: no record's answer fits in --max-length {max_len} tokens")
        return Encoded(_pad(rows, max_len), (np.asarray(starts, np.int32), np.asarray(ends, np.int32)), meta)
    if task == "sft":
        rows, masks = [], []
        for i, r in enumerate(records):
            p, a = enc(str(_field(r, fields.prompt, where, i))), enc(str(_field(r, fields.response, where, i)))
            row = (p + a)[:max_len - 1] + [eos]
            if len(p) >= max_len - 1:
                raise ValueError(f"{where}: record {i}: the prompt alone fills --max-length {max_len} tokens")
            rows.append(row)
            masks.append([False] * len(p) + [True] * (len(row) - len(p)))
        m = np.zeros((len(rows), max_len), bool)
        for i, mk in enumerate(masks):
            m[i, :len(mk)] = mk
        return Encoded(_pad(rows, max_len), m, [None] * len(rows))
    raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")


def split_valid(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random split: (train, valid) with ceil(fraction * N) records held out (>= 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--valid-fraction must be in (0, 1), got {fraction}")
    if len(records) < 2:
        raise ValueError("at least 2 records are needed to hold out a validation split (or pass --valid FILE)")
    perm = np.random.default_rng(seed).permutation(len(records))
    n = max(1, math.ceil(fraction * len(records)))
    return [records[i] for i in perm[n:]], [records[i] for i in perm[:n]]
