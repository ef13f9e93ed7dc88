"""The resumable JSONL generation job behind `infer.generate`.

Input rows: {"id", "prompt": str} (BOS added), {"id", "messages": [...]} (the tokenizer's chat format) or
{"id", "prompt_ids": [int]} (as given); a row may also carry its own "seed" (default: derived from the job's
seed and the id). Output rows, in input order:
{"id", "completion", "completion_ids", "finish_reason", "prompt_tokens", "completion_tokens"}; a bad row
becomes {"id", "error"} naming the file, the line and the problem, and the job goes on.

Rows are batched by prompt length within windows of WINDOW_BATCHES batches (less padding); each finished row
is appended and flushed as soon as the rows before it are written, so re-running the same job skips the ids
already written and regenerates the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import distributed, jsonl
from .generator import SamplingParams

if TYPE_CHECKING:
    from .api import Mistral

WINDOW_BATCHES = 8  # batches read ahead and sorted by prompt length


@dataclasses.dataclass
class JobStats:
    rows: int = 0      # rows generated
    errors: int = 0    # error rows written
    tokens: int = 0    # completion tokens generated
    skipped: int = 0   # ids already in the output (resumed)
    todo: int = 0      # rows of the input left to write


def done_ids(path: str) -> set:
    """Ids already in the output file (a torn last line from a crash is ignored and rewritten)."""
    ids = set()
    if not os.path.exists(path):
        return ids
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    good = []
    for line in lines:
        try:
            ids.add(json.dumps(json.loads(line)["id"]))
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if len(good) != len([x for x in lines if x.strip()]):  # drop the torn tail so appends stay valid JSONL
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(x + "\n" for x in good))
    return ids


def row_seed(row: jsonl.Row, seed: int) -> int:
    """The row's own "seed", else one derived from `seed` and the row id: reproducible whatever the batch
    size or the resume point, and different rows draw different samples."""
    if isinstance(row.data.get("seed"), int):
        return row.data["seed"] % 2**32
    return zlib.crc32(f"{seed}:{json.dumps(row.id)}".encode())


def prompt_of(row: jsonl.Row, model: Mistral, path: str):
    """(ids, None) or (None, error) for one input row."""
    where = f"{path}:{row.line}"
    if row.error:
        return None, row.error
    d = row.data
    try:
        if "prompt_ids" in d:
            ids = d["prompt_ids"]
        elif "prompt" in d:
            if not isinstance(d["prompt"], str):
                return None, f"{where}: 'prompt' must be a string"
            ids = model.encode_prompt(d["prompt"])
        elif "messages" in d:
            if not isinstance(d["messages"], list) or not d["messages"]:
                return None, f"{where}: 'messages' must be a non-empty list"
            ids = model.encode_prompt(d["messages"])
        else:
            return None, f"{where}: row has none of 'prompt', 'messages', 'prompt_ids'"
    except ValueError as e:
        return None, f"{where}: {e}"
    err = jsonl.check_ids(ids, model.config.vocab_size, model.config.max_seq_len, where)
    return (None, err) if err else (list(ids), None)


def resume_point(output: str) -> set:
    """done_ids of `output`, the same on every process: process 0 repairs a torn tail first."""
    skip = done_ids(output) if distributed.is_main() else set()
    distributed.barrier("batch_job.resume")
    return skip if distributed.is_main() else done_ids(output)


def run(model: Mistral, input_path: str, output_path: str, sampling: SamplingParams, seed: int = 0,
        progress: Callable[[int, JobStats], None] | None = None) -> JobStats:
    """Generates a completion for every row of `input_path` whose id `output_path` does not hold yet, appending
    the rows to it in input order. `progress(rows_written, stats)` after each write. Errors go to stderr too."""
    stats = JobStats()
    skip = resume_point(output_path)
    rows = [r for r in jsonl.read_jsonl(input_path) if json.dumps(r.id) not in skip]
    stats.skipped, stats.todo = len(skip), len(rows)
    if skip:
        print(f"resuming: {len(skip)} ids already in {output_path}, {len(rows)} rows to go", file=sys.stderr)
    window = model.generator.batch_size * WINDOW_BATCHES
    with open(distributed.output_path(output_path), "a", encoding="utf-8") as out:
        for start in range(0, len(rows), window):
            _window(model, rows[start:start + window], input_path, out, sampling, seed, stats, progress)
    return stats


def _window(model, block, input_path, out, base: SamplingParams, seed, stats: JobStats, progress) -> None:
    """One window of rows, batched by prompt length, each written as soon as the rows before it are."""
    parsed = [prompt_of(r, model, input_path) for r in block]
    results: dict[int, dict] = {}
    written = 0  # rows of the block already in the output

    def record(i, result):
        results[i] = result
        if "error" in result:
            print(f"error: {result['error']}", file=sys.stderr)
            stats.errors += 1
        else:
            stats.rows += 1
            stats.tokens += result["completion_tokens"]

    def flush_ready():
        nonlocal written
        before = written
        while written in results:
            jsonl.write_row(out, results.pop(written))
            written += 1
        out.flush()
        if distributed.is_main():  # the others write to os.devnull, which fsync refuses
            os.fsync(out.fileno())
        if progress is not None:
            progress(written - before, stats)

    for i, (row, (_, err)) in enumerate(zip(block, parsed)):
        if err:
            record(i, {"id": row.id, "error": err})
    good = [i for i, (ids, _) in enumerate(parsed) if ids is not None]

    def on_batch(idx, comps):
        for k, c in zip(idx, comps):
            i = good[k]
            record(i, {"id": block[i].id, "completion": c.text, "completion_ids": c.ids,
                       "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                       "completion_tokens": c.completion_tokens})
        flush_ready()

    flush_ready()  # error rows before the first good one
    if good:
        sampling = [dataclasses.replace(base, seed=row_seed(block[i], seed)) for i in good]
        model.generator.generate([parsed[i][0] for i in good], sampling, on_batch=on_batch)
