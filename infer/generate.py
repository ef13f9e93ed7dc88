"""Resumable batch generation over a JSONL file.

  python -m infer.generate --checkpoint DIR --input F.jsonl --output F.jsonl [--tokenizer PATH]
      [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR ...]
      [--batch-size B] [--dtype float32|bfloat16|float16] [--mesh SPEC]
      [--coordinator HOST:PORT --num-processes N --process-id I]   (docs/scaling.md)

Input rows: {"id", "prompt": str} (BOS added), {"id", "messages": [...]} (the tokenizer's chat format) or
{"id", "prompt_ids": [int]} (as given); a row may also carry its own "seed" (default: derived from --seed
and the id). Output rows, in input order:
{"id", "completion", "completion_ids", "finish_reason", "prompt_tokens", "completion_tokens"}. Rows are
batched by prompt length within windows of 8 batches (less padding); output is appended and flushed after
every batch, each row as soon as the rows before it are written: re-running the same command skips ids
already written and regenerates the rest. A bad row becomes {"id", "error"} and the job goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import zlib
import os
import sys
import time
from typing import TYPE_CHECKING

# Light imports only (no jax): main() starts reading the weights before it imports the rest.
from mistral_jax import checkpoint, jsonl

if TYPE_CHECKING:
    from mistral_jax import api


WINDOW_BATCHES = 8  # batches read ahead and sorted by prompt length


def parse_args(argv=None):
    from mistral_jax import launch

    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="our checkpoint, or a transformers / Mistral directory")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", help="sentencepiece model (default: tokenizer.model in the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0, help="default seed of rows that carry none")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (benchmarks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    launch.add_args(p)
    return p.parse_args(argv)


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
    """The row's own "seed", else one derived from --seed and the row id: reproducible whatever the batch
    size or the resume point, and different rows draw different samples."""
    if isinstance(row.data.get("seed"), int):
        return row.data["seed"] % 2**32
    return zlib.crc32(f"{seed}:{json.dumps(row.id)}".encode())


def prompt_of(row: jsonl.Row, model: api.Mistral, path: str):
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


def prefetch(argv=None) -> checkpoint.Prefetch | None:
    """Starts reading the weights of --checkpoint (checkpoint.prefetch) from the raw command line, before
    anything imports jax: the read (bound by memory copies) then runs beside the imports (bound by the
    interpreter), which took about as long each on the CPU (docs/benchmarks.md). None when there is no
    safetensors checkpoint to read; errors are left to the full parse and to the loader."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--checkpoint")
    known, _ = early.parse_known_args(argv)
    return checkpoint.prefetch(known.checkpoint) if known.checkpoint else None


def main(argv=None) -> int:
    prefetched = prefetch(argv)
    args = parse_args(argv)
    from tqdm import tqdm

    from mistral_jax import api, distributed, launch, memory_plan
    from mistral_jax.generate import SamplingParams, overlaps_prefill

    base = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop),
                          stop_token_ids=() if args.ignore_eos else None)
    # Mesh, model-divides check and memory plan (KV cache for prompt + completion up to max_seq_len), before
    # the weights are loaded (of which the prefetch holds at most its budget, 2 GiB).
    mm = launch.start(args, args.checkpoint, lambda c, mesh: memory_plan.inference(
        c, mesh, args.dtype, args.batch_size, c.max_seq_len, kind="generate",
        overlap=overlaps_prefill(mesh.devices.flat)))
    args.batch_size = launch.batch_size(args.batch_size, mm)
    api.enable_compilation_cache()
    timer = api.CompileTimer()
    t_start = time.perf_counter()
    model = api.Mistral(api.load_model(args.checkpoint, args.dtype, args.tokenizer, shardings=mm.param_shardings,
                                       prefetched=prefetched),
                        batch_size=args.batch_size, place=mm.place, fetch=mm.fetch, make_cache=mm.make_cache)
    if args.stop and model.tokenizer is None:
        print("error: --stop needs a tokenizer", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t_start
    # Every process must skip the same ids: process 0 repairs a torn tail first, the others read after it.
    skip = done_ids(args.output) if distributed.is_main() else set()
    distributed.barrier("infer.generate.resume")
    if not distributed.is_main():
        skip = done_ids(args.output)
    rows = [r for r in jsonl.read_jsonl(args.input) if json.dumps(r.id) not in skip]
    if skip:
        print(f"resuming: {len(skip)} ids already in {args.output}, {len(rows)} rows to go", file=sys.stderr)

    n_rows = n_err = n_tokens = 0
    with open(distributed.output_path(args.output), "a", encoding="utf-8") as out, \
            tqdm(total=len(rows), desc="generate", unit="row") as bar, mm.activate():
        # Rows are read a window of WINDOW_BATCHES batches at a time and batched by prompt length within it
        # (less padding); each finished row is written, in input order, as soon as the rows before it are.
        window = args.batch_size * WINDOW_BATCHES
        for start in range(0, len(rows), window):
            block = rows[start:start + window]
            parsed = [prompt_of(r, model, args.input) for r in block]
            results: dict[int, dict] = {}
            written = 0  # rows of the block already in the output

            def record(i, result):
                nonlocal n_rows, n_err, n_tokens
                results[i] = result
                if "error" in result:
                    print(f"error: {result['error']}", file=sys.stderr)
                    n_err += 1
                else:
                    n_rows += 1
                    n_tokens += result["completion_tokens"]

            def flush_ready():
                nonlocal written
                before = written
                while written in results:
                    jsonl.write_row(out, results.pop(written))
                    written += 1
                out.flush()
                if distributed.is_main():  # the others write to os.devnull, which fsync refuses
                    os.fsync(out.fileno())
                bar.update(written - before)
                bar.set_postfix(tok_s=rate(n_tokens, model.generator.busy_seconds()))

            for i, (row, (ids, err)) in enumerate(zip(block, parsed)):
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
                sampling = [dataclasses.replace(base, seed=row_seed(block[i], args.seed)) for i in good]
                model.generator.generate([parsed[i][0] for i in good], sampling, on_batch=on_batch)
    total = time.perf_counter() - t_start
    # Time in which a prefill or decode ran (generate.Generator.busy_seconds): the next batch's prefill may run
    # while the main thread compiles, so wall time minus compile time would count that prefill as free.
    gen_s = model.generator.busy_seconds()
    print(f"rows: {n_rows} generated, {n_err} errors; tokens: {n_tokens}; "
          f"{rate(n_tokens, gen_s)} tokens/s excluding compilation; compile {timer.seconds:.1f}s; "
          f"load {load_s:.1f}s; total {total:.1f}s")
    return 0 if n_rows or not n_err else 1


def rate(tokens: int, seconds: float) -> str:
    """tokens/s as text; "n/a" when compilation took (nearly) all the time and the rest is too short to time."""
    return f"{tokens / seconds:.1f}" if seconds > 0.01 else "n/a"


if __name__ == "__main__":
    code = main()
    from mistral_jax import launch
    launch.exit_process(code)
