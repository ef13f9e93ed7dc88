"""Resumable batch generation over a JSONL file.

  python -m infer.generate --checkpoint DIR --input F.jsonl --output F.jsonl [--tokenizer PATH] [--adapter DIR]
      [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR ...]
      [--batch-size B] [--dtype float32|bfloat16|float16] [--no-check] [--mesh SPEC]
      [--coordinator HOST:PORT --num-processes N --process-id I]   (docs/scaling.md)

Input rows: {"id", "prompt": str} (BOS added), {"id", "messages": [...]} (the tokenizer's chat format) or
{"id", "prompt_ids": [int]} (as given); a row may also carry its own "seed" (default: derived from --seed
and the id). Output rows, in input order:
{"id", "completion", "completion_ids", "finish_reason", "prompt_tokens", "completion_tokens"}. Rows are
batched by prompt length within windows of 8 batches (less padding); output is appended and fsynced after
every batch, each row as soon as the rows before it are written: re-running the same command skips the rows
already written and generates the rest. A bad row becomes {"id", "error"} and the job goes on.
--output gets a manifest (OUTPUT.manifest.json: the input's hash and the settings) and a lock while the job
runs; an existing output of another input or other settings is refused. --adapter folds a PEFT LoRA adapter
into the weights; --no-check loads weights that hold NaN/inf instead of refusing them. Errors in the command
line or its files: one line `error: ...`, exit 2. The job itself is mistral_jax/batch_job.py, its output
job_output.py.
"""

from __future__ import annotations

import time


def parse_args(argv=None):
    from mistral_jax import launch

    p = launch.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0])
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
    """The exit code: 0, or 1 when every row was an error. A user error raises launch.UserError (a SystemExit
    saying `error: ...`), which the process entry point prints as one line, exit 2."""
    from mistral_jax import launch

    launch.default_platforms()
    args = parse_args(argv)
    with launch.user_errors():
        return _main(args)


def _main(args) -> int:
    from tqdm import tqdm

    from mistral_jax import api, batch_job, launch, memory_plan
    from mistral_jax.generator import SamplingParams
    from mistral_jax.job_output import JobOutput

    # Every flag and input is checked before anything is written.
    launch.check_batch_size(args.batch_size)
    try:
        base = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_strings=tuple(args.stop),
            stop_token_ids=() if args.ignore_eos else None,
        )
    except ValueError as e:
        raise launch.UserError(str(e)) from None
    # Mesh, model-divides check and memory plan (KV cache for prompt + completion up to max_seq_len), before
    # the weights are loaded.
    with launch.user_errors(files=True):
        mm = launch.start(
            args,
            args.checkpoint,
            lambda c, mesh: memory_plan.inference(c, mesh, args.dtype, args.batch_size, c.max_seq_len, kind="generate"),
        )
    out = JobOutput(args.output, args.input, batch_job.settings(base, args.seed, **launch.model_settings(args)))
    out.check()
    with out:
        batch_size = launch.batch_size(args.batch_size, mm)
        api.enable_compilation_cache()
        timer = api.CompileTimer()
        t_start = time.perf_counter()
        with launch.user_errors(files=True):
            model = api.Mistral(
                api.load_model(args.checkpoint, args.dtype, args.tokenizer, mesh=mm, **launch.load_model_kwargs(args)),
                batch_size=batch_size,
            )
        if args.stop and model.tokenizer is None:
            raise launch.UserError("--stop needs a tokenizer")
        load_s = time.perf_counter() - t_start

        with tqdm(desc="generate", unit="row") as bar:

            def progress(n, stats):
                bar.total = stats.todo
                bar.update(n)
                bar.set_postfix(tok_s=rate(stats.tokens, model.generator.busy_seconds()))

            stats = batch_job.run(model, args.input, args.output, base, args.seed, progress, output=out)
    total = time.perf_counter() - t_start
    print(
        f"rows: {stats.rows} generated, {stats.errors} errors; tokens: {stats.tokens}; "
        f"{rate(stats.tokens, model.generator.busy_seconds())} tokens/s excluding compilation; "
        f"compile {timer.seconds:.1f}s; load {load_s:.1f}s; total {total:.1f}s"
    )
    return 0 if stats.rows or not stats.errors else 1


def rate(tokens: int, seconds: float) -> str:
    """tokens/s as text; "n/a" when compilation took (nearly) all the time and the rest is too short to time."""
    return f"{tokens / seconds:.1f}" if seconds > 0.01 else "n/a"


if __name__ == "__main__":
    from mistral_jax import launch

    launch.exit_process(launch.run_tool(main))
