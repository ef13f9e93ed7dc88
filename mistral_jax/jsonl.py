"""JSONL input for the batch tools: rows are read one by one, and a bad row becomes an error the tool
reports and writes out, never an exception that loses the rest of the job."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import numpy as np


@dataclasses.dataclass
class Row:
    line: int                       # 1-based line number in the input file
    id: Any                         # the row's "id" (the line number when the row has none)
    data: dict | None               # the parsed object, None when the line is not a JSON object
    error: str | None = None        # what is wrong with the row, naming the file and line


def read_jsonl(path: str) -> Iterator[Row]:
    """Yields a Row per non-blank line of `path`; malformed lines come back with `error` set."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"input file not found: {path}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(n, n, None, f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield Row(n, n, None, f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield Row(n, obj.get("id", n), obj)


def check_ids(ids: Any, vocab_size: int, max_len: int, where: str, min_len: int = 1) -> str | None:
    """Returns an error message for a bad token-id list, or None when it is usable."""
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                                     for i in ids):
        return f"{where}: token ids must be a list of integers"
    if len(ids) < min_len:
        return f"{where}: needs at least {min_len} tokens, got {len(ids)}"
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        return f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
    if len(ids) > max_len:
        return f"{where}: {len(ids)} tokens exceed the model's context of {max_len}"
    return None


def write_row(f, obj: dict) -> None:
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
