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
The job itself is mistral_jax/batch_job.py.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None):
    from mistral_jax import launch

    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0])
    launch.add_model_args(p, batch_size=8)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0, help="default seed of rows that carry none")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (benchmarks)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from mistral_jax import api, batch_job, launch, memory_plan
    from mistral_jax.generator import SamplingParams

    try:
        base = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop),
                              stop_token_ids=() if args.ignore_eos else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Mesh, model-divides check and memory plan (KV cache for prompt + completion up to max_seq_len), before
    # the weights are loaded.
    mm = launch.start(args, args.checkpoint, lambda c, mesh: memory_plan.inference(
        c, mesh, args.dtype, args.batch_size, c.max_seq_len, kind="generate"))
    batch_size = launch.batch_size(args.batch_size, mm)
    api.enable_compilation_cache()
    timer = api.CompileTimer()
    t_start = time.perf_counter()
    model = api.Mistral(api.load_model(args.checkpoint, args.dtype, args.tokenizer, mesh=mm), batch_size=batch_size)
    if args.stop and model.tokenizer is None:
        print("error: --stop needs a tokenizer", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t_start

    with tqdm(desc="generate", unit="row") as bar:
        def progress(n, stats):
            bar.total = stats.todo
            bar.update(n)
            bar.set_postfix(tok_s=rate(stats.tokens, model.generator.busy_seconds()))

        stats = batch_job.run(model, args.input, args.output, base, args.seed, progress)
    total = time.perf_counter() - t_start
    print(f"rows: {stats.rows} generated, {stats.errors} errors; tokens: {stats.tokens}; "
          f"{rate(stats.tokens, model.generator.busy_seconds())} tokens/s excluding compilation; "
          f"compile {timer.seconds:.1f}s; load {load_s:.1f}s; total {total:.1f}s")
    return 0 if stats.rows or not stats.errors else 1


def rate(tokens: int, seconds: float) -> str:
    """tokens/s as text; "n/a" when compilation took (nearly) all the time and the rest is too short to time."""
    return f"{tokens / seconds:.1f}" if seconds > 0.01 else "n/a"


if __name__ == "__main__":
    code = main()
    from mistral_jax import launch
    launch.exit_process(code)
