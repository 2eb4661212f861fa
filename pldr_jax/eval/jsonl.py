"""Reading JSON-lines files with errors that name the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


def iter_jsonl(path: str | os.PathLike, what: str = "data file") -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line of `path`.

    FileNotFoundError names `what` and the path; ValueError names ``path:line`` of invalid JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield ln, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{ln}: not valid JSON ({e})") from None
