"""The resumable JSONL generation job behind `infer.generate`.

Input rows: {"id", "prompt": str} (BOS added), {"id", "messages": [{"role", "content"}, ...]} (the tokenizer's
chat format) or {"id", "prompt_ids": [int]} (as given); a row may also carry its own integer "seed" (default:
derived from the job's seed and the id). Output rows, one per non-blank input line, in input order:
{"id", "completion", "completion_ids", "finish_reason", "prompt_tokens", "completion_tokens"}.

Every row is isolated: a bad row, or any exception while encoding or generating it, becomes {"id", "error"}
naming the file, the line, the field and the problem, and the job goes on. Rows are batched by prompt length
within windows of WINDOW_BATCHES batches (less padding); each finished row is appended (job_output.py) as
soon as the rows before it are written, so re-running the same job skips the rows already written and
generates the rest.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import jsonl
from .generator import SamplingParams
from .job_output import JobOutput, skip_done

if TYPE_CHECKING:
    from .api import Mistral

WINDOW_BATCHES = 8  # batches read ahead and sorted by prompt length
MESSAGES = 'must be a non-empty list of {"role": str, "content": str} objects'


@dataclasses.dataclass
class JobStats:
    rows: int = 0  # rows generated
    errors: int = 0  # error rows written
    tokens: int = 0  # completion tokens generated
    skipped: int = 0  # rows already in the output (resumed)
    todo: int = 0  # rows of the input left to write


def settings(sampling: SamplingParams, seed: int, **more) -> dict:
    """What makes two runs the same job (the output manifest's settings): the sampling and seed, and `more`
    (the tools add the checkpoint, tokenizer and dtype). The batch size is not one: it never changes a row."""
    return {"job": "generate", **dataclasses.asdict(dataclasses.replace(sampling, seed=0)), "seed": seed, **more}


def row_seed(row: jsonl.Row, seed: int) -> int:
    """The row's own "seed", else one derived from `seed` and the row id: reproducible whatever the batch
    size or the resume point, and different rows draw different samples."""
    if row.data is not None and "seed" in row.data:
        return row.data["seed"] % 2**32
    return zlib.crc32(f"{seed}:{json.dumps(row.id)}".encode())


def _messages_problem(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return MESSAGES
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f'message {k} must be a {{"role": str, "content": str}} object'
        problem = jsonl.text_problem(m["role"]) or jsonl.text_problem(m["content"])
        if problem:
            return f"message {k}: {problem}"
    return None


def prompt_of(row: jsonl.Row, model: Mistral, path: str):
    """(ids, None) or (None, error) for one input row; never raises."""
    if row.error:
        return None, row.error
    d = row.data
    if "seed" in d and (not isinstance(d["seed"], int) or isinstance(d["seed"], bool)):
        return None, f"{row.where(path, 'seed')}: must be an integer, got {type(d['seed']).__name__}"
    field = next((f for f in ("prompt_ids", "prompt", "messages") if f in d), None)
    if field is None:
        return None, f"{row.where(path)}: row has none of 'prompt', 'messages', 'prompt_ids'"
    where, value = row.where(path, field), d[field]
    if field == "prompt":
        problem = "must be a string" if not isinstance(value, str) else jsonl.text_problem(value)
    elif field == "messages":
        problem = _messages_problem(value)
    else:
        problem = None  # check_ids below
    if problem:
        return None, f"{where}: {problem}"
    try:
        ids = value if field == "prompt_ids" else model.encode_prompt(value)
    except Exception as e:  # whatever the tokenizer raises stays this row's problem
        return None, f"{where}: {e if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'}"
    err = jsonl.check_ids(ids, model.config.vocab_size, model.config.max_seq_len, where)
    return (None, err) if err else ([int(i) for i in ids], None)


def run(
    model: Mistral,
    input_path: str,
    output_path: str,
    sampling: SamplingParams,
    seed: int = 0,
    progress: Callable[[int, JobStats], None] | None = None,
    output: JobOutput | None = None,
) -> JobStats:
    """Generates a completion for every row of `input_path` that `output_path` does not hold yet, appending
    the rows to it in input order. `output`: the job's JobOutput, already check()ed (the tools do so before
    loading the model); default: one made here with settings(sampling, seed). `progress(rows_written, stats)`
    after each write. Errors go to stderr too."""
    out = output if output is not None else JobOutput(output_path, input_path, settings(sampling, seed))
    try:
        done = out.begin()
        stats = JobStats(skipped=done.rows, todo=out.input["rows"] - done.rows)
        if done.rows:
            print(f"resuming: {done.rows} rows already in {output_path}, {stats.todo} to go", file=sys.stderr)
        rows = skip_done(jsonl.read_jsonl(input_path, job_ids=True), done, output_path)
        window = model.generator.batch_size * WINDOW_BATCHES
        while block := list(itertools.islice(rows, window)):
            _window(model, block, input_path, out, sampling, seed, stats, progress)
    finally:
        if output is None:
            out.close()
    return stats


def _window(model, block, input_path, out: JobOutput, base: SamplingParams, seed, stats: JobStats, progress) -> None:
    """One window of rows, batched by prompt length, each written as soon as the rows before it are."""
    parsed = [prompt_of(r, model, input_path) for r in block]
    results: dict[int, dict] = {}
    written = 0  # rows of the block already in the output

    def record(i, result):
        results[i] = result
        if "error" in result:
            print(f"error: {jsonl.safe_text(result['error'])}", file=sys.stderr)
            stats.errors += 1
        else:
            stats.rows += 1
            stats.tokens += result["completion_tokens"]

    def flush_ready():
        nonlocal written
        ready = []
        while written in results:
            ready.append(results.pop(written))
            written += 1
        out.write(ready)
        if progress is not None:
            progress(len(ready), stats)

    for i, (row, (_, err)) in enumerate(zip(block, parsed)):
        if err:
            record(i, {"id": row.id, "error": err})
    flush_ready()  # error rows before the first good one
    todo = [i for i, (ids, _) in enumerate(parsed) if ids is not None]
    try:
        _generate(model, block, parsed, todo, base, seed, record, flush_ready)
    except Exception as e:  # one batch failed: the rows it held, and those after it, one at a time
        print(
            f"note: a batch failed ({type(e).__name__}: {jsonl.safe_text(str(e))[:200]}); generating its "
            f"rows one at a time",
            file=sys.stderr,
        )
        for i in [i for i in todo if i not in results and i >= written]:
            try:
                _generate(model, block, parsed, [i], base, seed, record, flush_ready)
            except Exception as e:
                record(
                    i,
                    {
                        "id": block[i].id,
                        "error": f"{block[i].where(input_path)}: generation failed ({type(e).__name__}: {e})",
                    },
                )
                flush_ready()


def _generate(model, block, parsed, idx, base, seed, record, flush_ready) -> None:
    """Generates rows `idx` of the block, recording each batch as it finishes."""

    def on_batch(batch, comps):
        for k, c in zip(batch, comps):
            i = idx[k]
            record(
                i,
                {
                    "id": block[i].id,
                    "completion": c.text,
                    "completion_ids": c.ids,
                    "finish_reason": c.finish_reason,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                },
            )
        flush_ready()

    if idx:
        sampling = [dataclasses.replace(base, seed=row_seed(block[i], seed)) for i in idx]
        model.generator.generate([parsed[i][0] for i in idx], sampling, on_batch=on_batch)
