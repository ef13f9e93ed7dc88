"""Evaluates a checkpoint with EleutherAI's lm-evaluation-harness (pip install 'mistral-jax[eval]').

  python -m infer.eval --checkpoint DIR [--tokenizer PATH] [--dtype float32|bfloat16|float16] [--adapter DIR]
                       [--mesh SPEC] --tasks hellaswag,arc_easy [lm_eval's own flags: --num_fewshot 5
                       --limit 100 --batch_size 8 --include_path MY_TASKS --output_path OUT --log_samples ...]

Registers our model with lm_eval as "mistral_jax" (mistral_jax/lm_eval_model.py) and runs lm_eval's own
command line (`lm-eval run`) on it: every flag after ours is lm_eval's, local task YAMLs come in with
`--include_path`, extra model arguments with `--model_args key=value` (max_length, max_gen_toks, seed, ...).
The same model from Python: lm_eval.simple_evaluate(model=MistralJaxLM(DIR), tasks=[...]).
Errors in our flags or the checkpoint: one line `error: ...`, exit 2.
"""

from __future__ import annotations

import json
import os
import sys

from mistral_jax import checkpoint, launch
from mistral_jax.config import DTYPES

DEFAULT_BATCH_SIZE = 8  # lm_eval's default of 1 would leave our batched programs one row wide


def parse_args(argv=None):
    p = launch.ArgumentParser(
        prog="python -m infer.eval",
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        epilog="Every other flag goes to lm_eval: see `lm-eval run --help`.",
    )
    p.add_argument("--checkpoint", required=True, help="our checkpoint, or a transformers / Mistral directory")
    p.add_argument("--tokenizer", help="sentencepiece model (default: tokenizer.model in the checkpoint)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory, folded into the weights")
    launch.add_args(p)
    return p.parse_known_args(argv)


def lm_eval_argv(args, rest: list[str]) -> list[str]:
    """lm_eval's command line for our model: `run --model mistral_jax --model_args {...}` then `rest`."""
    for flag in ("--model", "-M"):
        if flag in rest or any(a.startswith(flag + "=") for a in rest):
            raise launch.UserError(f"{flag} is set by infer.eval (mistral_jax); pass model arguments with --model_args")
    if rest and rest[0] in ("run", "ls", "validate"):
        raise launch.UserError(f"infer.eval always runs `lm-eval run`; drop {rest[0]!r}")
    model_args = {"checkpoint": args.checkpoint, "dtype": args.dtype}
    for key in ("tokenizer", "adapter", "mesh"):
        if getattr(args, key, None):
            model_args[key] = getattr(args, key)
    argv = ["lm-eval", "run", "--model", "mistral_jax", "--model_args", json.dumps(model_args)]
    if not any(a in ("--batch_size", "-b") or a.startswith("--batch_size=") for a in rest):
        argv += ["--batch_size", str(DEFAULT_BATCH_SIZE)]
    return argv + rest


def main(argv=None) -> int:
    launch.default_platforms()
    args, rest = parse_args(argv)
    lm_argv = lm_eval_argv(args, rest)
    try:
        import lm_eval.__main__ as lm_eval_main
    except ImportError:
        raise launch.UserError("lm_eval is not installed: pip install 'mistral-jax[eval]' (or lm-eval)") from None
    with launch.user_errors(files=True):
        for name in ("checkpoint", "adapter"):
            path = getattr(args, name)
            if path and not os.path.isdir(path):
                raise launch.UserError(f"--{name} {path}: not a directory")
        config = checkpoint.load_config(args.checkpoint)
        if args.adapter:
            checkpoint.load_adapter(args.adapter, config)  # its errors now, before lm_eval starts
    launch.start(args, args.checkpoint)  # joins the other hosts; checks the mesh against the devices
    import mistral_jax.lm_eval_model  # noqa: F401  (registers "mistral_jax" with lm_eval)

    sys.argv = lm_argv
    lm_eval_main.cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(launch.run_tool(main))
