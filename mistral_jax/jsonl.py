"""JSONL input for the batch tools: rows are read one by one, as bytes, and a bad row becomes an error the
tool reports and writes out, never an exception that loses the rest of the job.

A line is blank when it holds only ASCII whitespace; every other line is one row and gets one output row.
With job_ids (the batch tools), row ids are JSON-safe: a string of valid Unicode or an integer within
+-(2**53 - 1) (exact in every JSON reader); a row without "id" takes its line number; any other id, or an id
already taken by an earlier row, makes the row an error row.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

MAX_SAFE_INT = 2**53 - 1  # the largest integer every JSON reader (JavaScript's included) holds exactly


@dataclasses.dataclass
class Row:
    line: int  # 1-based line number in the input file
    id: Any  # the row's "id" (the line number when the row has none, or a bad one)
    data: dict | None  # the parsed object, None when the line is not a JSON object
    error: str | None = None  # what is wrong with the row, naming the file, line and field

    def where(self, path: str, field: str | None = None) -> str:
        """'path:line' or "path:line: 'field'", the start of an error message about this row."""
        return f"{path}:{self.line}" + (f": {field!r}" if field else "")


def is_blank(line: bytes) -> bool:
    return not line.strip()


def text_problem(s: str) -> str | None:
    """Why `s` cannot be encoded (a lone surrogate, which UTF-8 cannot hold), or None."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode (lone surrogate at character {e.start})"
    return None


def safe_text(s: str) -> str:
    """`s` with anything UTF-8 cannot hold written as a backslash escape: error messages quote user input."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def normalize_id(value: Any) -> tuple[Any, str | None]:
    """(the id as written to the output, None) or (None, why it is refused)."""
    if isinstance(value, str):
        problem = text_problem(value)
        return (None, problem) if problem else (value, None)
    if isinstance(value, int) and not isinstance(value, bool):
        if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return value, None
        return None, f"integer ids must be within +-{MAX_SAFE_INT}"
    return None, f"must be a string or an integer, got {type(value).__name__}"


def _parse(line: bytes, n: int, path: str, job_ids: bool) -> Row:
    """One non-blank line -> a Row (error set when it is not a JSON object, or with `job_ids` has no usable
    id)."""
    where = f"{path}:{n}"
    try:
        text = line.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        return Row(n, n, None, f"{where}: not valid UTF-8 (byte {e.start})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Row(n, n, None, f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return Row(n, n, None, f"{where}: not usable JSON (nested too deeply)")
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return Row(n, n, None, f"{where}: not usable JSON ({safe_text(str(e)).split(':')[0]})")
    if not isinstance(obj, dict):
        return Row(n, n, None, f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        return Row(n, n, obj)
    if not job_ids:
        return Row(n, obj["id"], obj)
    rid, problem = normalize_id(obj["id"])
    if problem:
        return Row(n, n, obj, f"{where}: 'id': {problem}")
    return Row(n, rid, obj)


def read_jsonl(path: str, job_ids: bool = False) -> Iterator[Row]:
    """Yields a Row per non-blank line of `path`, reading it as bytes and splitting at b"\\n" only; malformed
    lines come back with `error` set, and with `job_ids` (the batch tools) bad and duplicate ids too.
    FileNotFoundError naming the file if it is missing."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"input file not found: {path}") from None
    seen: dict[str, int] = {}  # id (as JSON) -> line of its first row
    with f:
        for n, line in enumerate(f, 1):
            if is_blank(line):
                continue
            row = _parse(line, n, path, job_ids)
            if job_ids and row.error is None:
                key = json.dumps(row.id)
                if key in seen:
                    row.error = f"{path}:{n}: 'id': duplicate of the row on line {seen[key]}"
                else:
                    seen[key] = n
            yield row


def check_ids(ids: Any, vocab_size: int, max_len: int, where: str, min_len: int = 1) -> str | None:
    """Returns an error message for a bad token-id list, or None when it is usable."""
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids
    ):
        return f"{where}: token ids must be a list of integers"
    if len(ids) < min_len:
        return f"{where}: needs at least {min_len} tokens, got {len(ids)}"
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        return f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
    if len(ids) > max_len:
        return f"{where}: {len(ids)} tokens exceed the model's context of {max_len}"
    return None


def encode_row(obj: dict) -> bytes:
    """One output line: compact-enough JSON, UTF-8, ending in a newline (errors are made safe first)."""
    if isinstance(obj.get("error"), str):
        obj = {**obj, "error": safe_text(obj["error"])}
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def write_row(f, obj: dict) -> None:
    """Appends one row to a text or binary file."""
    data = encode_row(obj)
    f.write(data if "b" in getattr(f, "mode", "b") else data.decode("utf-8"))
