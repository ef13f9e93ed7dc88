"""The output file of a resumable batch job (infer.generate, infer.score): nothing written is ever lost, and
nothing is run twice.

* One output row per non-blank input line, in input order; a re-run of the same job skips the rows already
  written (the first N, their ids checked against the input) and appends the rest.
* The output is only ever appended to (flushed and fsynced after each write) or replaced atomically (a temp
  file beside it, fsync, rename): a crash at any moment, during a repair included, leaves every row that
  was complete.
* Resume reads the output as bytes, streaming: a torn last line (a crash mid-write, cut at any byte) is
  dropped and redone; a last row that lost only its newline is kept and the newline appended.
* OUTPUT.manifest.json records the input (path, size, sha256, rows) and the job's settings: an existing
  output of another input or other settings, or without a manifest, is refused before anything is written.
* OUTPUT.lock, held with flock while the job runs, refuses a second job on the same output (the kernel
  drops it when a process dies, so a crash leaves no stale lock).

  out = JobOutput(output, input, {"job": "generate", ...})
  out.check()                     # user errors (JobError) before the model loads; writes nothing
  done = out.begin()              # writes the manifest, repairs a torn tail; done.ids: the rows to skip
  out.write([row, ...]); out.close()
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator

from . import distributed
from .jsonl import Row, encode_row, is_blank

MANIFEST = ".manifest.json"
LOCK = ".lock"
FORMAT = 1  # the manifest's own version


class JobError(Exception):
    """A user error about the job's files (the tools print `error: ...` and exit 2)."""


def fingerprint(path: str) -> dict:
    """{"path", "size", "sha256", "rows"} of an input file, read once as bytes."""
    h, size, rows = hashlib.sha256(), 0, 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            size += len(line)
            rows += not is_blank(line)
    return {"path": os.path.abspath(path), "size": size, "sha256": h.hexdigest(), "rows": rows}


def check_paths(input_path: str, output_path: str) -> None:
    """JobError unless the input is a readable file and the output a file path apart from it."""
    if not os.path.exists(input_path):
        raise JobError(f"input file not found: {input_path}")
    if not os.path.isfile(input_path):
        raise JobError(f"--input {input_path} is not a regular file")
    if not os.access(input_path, os.R_OK):
        raise JobError(f"--input {input_path} is not readable")
    if os.path.isdir(output_path):
        raise JobError(f"--output {output_path} is a directory")
    parent = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(parent):
        raise JobError(f"--output {output_path}: directory {parent} does not exist")
    same = os.path.realpath(input_path) == os.path.realpath(output_path)
    if not same and os.path.exists(output_path):
        same = os.path.samefile(input_path, output_path)
    if same:
        raise JobError(f"--output {output_path} is the input file; choose another --output")


# ---- crash-safe writes ------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str, write: Callable) -> None:
    """Makes `path` the file that `write(binary_file)` writes: a temp file beside it, fsync, rename. A crash
    at any point leaves the old file whole (and at worst a stray .tmp file)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path)


def _keep_prefix(path: str, length: int) -> None:
    """Replaces `path` atomically by its first `length` bytes."""

    def copy(dst):
        with open(path, "rb") as src:
            left = length
            while left:
                block = src.read(min(left, 1 << 20))
                if not block:
                    break
                dst.write(block)
                left -= len(block)

    replace_atomically(path, copy)


# ---- resume ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Resume:
    ids: list  # ids of the complete rows, in order (the first len(ids) input rows are done)
    keep: int  # bytes of the output that hold them
    size: int  # bytes in the output file
    newline_missing: bool  # the last row is complete but lost its final newline

    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def torn(self) -> bool:
        return self.keep < self.size and not self.newline_missing


def _row(line: bytes) -> dict | None:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) and "id" in obj else None


def scan(path: str, on_row: Callable[[dict], None] | None = None) -> Resume:
    """The rows already in `path`, read as bytes line by line; writes nothing. The last line may be torn
    (it is left out of `keep`); a damaged line before it is a JobError. `on_row(row)` for each row."""
    ids, keep, offset, newline_missing, bad = [], 0, 0, False, None
    if not os.path.exists(path):
        return Resume([], 0, 0, False)
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if bad is not None:
                raise JobError(
                    f"{path}:{bad}: not a row of this job's output, and rows follow it: the output is "
                    f"damaged; remove {path} and {path}{MANIFEST} to start over, or choose another "
                    f"--output"
                )
            offset += len(line)
            if is_blank(line) and line.endswith(b"\n"):
                continue
            row = _row(line)
            if row is None:
                bad = n
                continue
            ids.append(row["id"])
            keep, newline_missing = offset, not line.endswith(b"\n")
            if on_row is not None:
                on_row(row)
    return Resume(ids, keep, offset, newline_missing)


def skip_done(rows: Iterator[Row], done: Resume, output: str) -> Iterator[Row]:
    """`rows` past the first done.rows, each checked to carry the id the output holds for it."""
    for k, want in enumerate(done.ids, 1):
        row = next(rows, None)
        if row is None or json.dumps(row.id) != json.dumps(want):
            got = "no more input rows" if row is None else f"input line {row.line} gives id {json.dumps(row.id)}"
            raise JobError(
                f"{output}: row {k} has id {json.dumps(want)[:80]} but {got[:120]}: it is not this job's "
                f"output; remove {output} and {output}{MANIFEST} to start over, or choose another "
                f"--output"
            )
    return rows


# ---- the job's output -----------------------------------------------------------------------------------


class JobOutput:
    """The output file of one job; see the module docstring. Only process 0 locks and writes; every process
    learns the same resume point."""

    def __init__(self, path: str, input_path: str, settings: dict):
        self.path, self.input_path = os.fspath(path), os.fspath(input_path)
        self.settings = json.loads(json.dumps(settings))  # as a manifest reads back (tuples become lists)
        self.manifest_path = self.path + MANIFEST
        self.lock_path = self.path + LOCK
        self.input: dict | None = None
        self.done: Resume | None = None
        self._lock: int | None = None
        self._file = None

    def manifest(self) -> dict:
        return {"format": FORMAT, "input": self.input, "settings": self.settings}

    def check(self) -> None:
        """Refuses (JobError) a bad input or output path, an output another job holds, or an existing output
        that is not this job's. Writes nothing but the lock file."""
        check_paths(self.input_path, self.path)
        self.input = fingerprint(self.input_path)
        if distributed.is_main():
            self._acquire()
            try:
                self._check_existing()
            except BaseException:
                self.close()
                raise

    def _acquire(self) -> None:
        while self._lock is None:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise JobError(f"cannot create {self.lock_path} beside --output: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise JobError(
                    f"another job is writing {self.path} (it holds {self.lock_path}); wait for it to "
                    f"finish, or choose another --output"
                ) from None
            try:  # the file may have been unlinked by a job finishing between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock = fd
            else:
                os.close(fd)

    def _check_existing(self) -> None:
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return  # nothing to lose: the manifest is (re)written by begin
        start_over = f"remove {self.path} and {self.manifest_path} to start over, or choose another --output"
        try:
            with open(self.manifest_path, "rb") as f:
                old = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise JobError(
                f"{self.path} exists and has no {self.manifest_path}, so it is not known to be this "
                f"job's output; remove {self.path} to start over, or choose another --output"
            ) from None
        except (ValueError, RecursionError):
            raise JobError(f"{self.manifest_path} is unreadable; {start_over}") from None
        if not isinstance(old, dict):
            raise JobError(f"{self.manifest_path} is unreadable; {start_over}")
        diffs = _differences(old, self.manifest())
        if diffs:
            raise JobError(
                f"{self.path} is the output of another job ({'; '.join(diffs)}): to continue it, run "
                f"with the input and settings in {self.manifest_path}; to start over, {start_over}"
            )

    def begin(self, on_row: Callable[[dict], None] | None = None) -> Resume:
        """Writes the manifest, drops a torn last line (atomically), opens the output for appending; returns
        the rows already done (the same on every process). `on_row(row)` for each of them."""
        if self.input is None:
            self.check()
        if distributed.is_main():
            data = (json.dumps(self.manifest(), indent=1) + "\n").encode("ascii")  # paths may not be UTF-8
            if _read(self.manifest_path) != data:
                replace_atomically(self.manifest_path, lambda f: f.write(data))
            done = scan(self.path, on_row)
            if done.torn:
                _keep_prefix(self.path, done.keep)
            self._file = open(self.path, "ab")
            if done.newline_missing:  # appended before any row, so none is glued to it
                self._write(b"\n")
        distributed.barrier("job_output.begin")
        self.done = done if distributed.is_main() else scan(self.path, on_row)
        distributed.barrier("job_output.scanned")  # no row is appended before every process has read the output
        return self.done

    def write(self, rows: list[dict]) -> None:
        """Appends `rows`, then flushes and fsyncs (process 0; the others write nothing)."""
        if self._file is not None and rows:
            self._write(b"".join(encode_row(r) for r in rows))

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> JobOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two manifests, in words (the input by content, not by path)."""
    out = []
    oi, ni = old.get("input") or {}, new["input"]
    if not isinstance(oi, dict) or (oi.get("sha256"), oi.get("size")) != (ni["sha256"], ni["size"]):
        was = oi.get("path") if isinstance(oi, dict) else None
        out.append(f"its input was {was!r} of other contents" if was else "its input had other contents")
    os_, ns = old.get("settings") or {}, new["settings"]
    if not isinstance(os_, dict):
        return out + ["unreadable settings"]
    for key in sorted(set(os_) | set(ns)):
        if os_.get(key) != ns.get(key):
            out.append(f"{key} was {json.dumps(os_.get(key))[:60]}, now {json.dumps(ns.get(key))[:60]}")
    return out
