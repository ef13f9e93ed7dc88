"""Fine-tunes a Mistral model on a JSONL conversation file (full fine-tuning or LoRA).

  python -m train.finetune [--config configs/NAME.yaml] --init DIR|PRESET --train F.jsonl --output DIR [--eval F.jsonl]
      [--tokenizer PATH] [--steps N] [--lr X] [--lora-rank R] [--batch-size N] [--seq-len N]
      [--checkpoint-every N] [--mesh SPEC] [--tensorboard]
      [--coordinator HOST:PORT --num-processes N --process-id I | --multi-host]

The YAML keys are the fields of mistral_jax.train_config.TrainConfig (optimizer, lora and numerics are
sections; v0.1's flat keys such as lr or lora_rank still read); flags override them. Without --config every
other key takes the TrainConfig default (full fine-tuning, 2048-token rows, batch 8, 1000 steps). Running the
same command again resumes from OUTPUT/checkpoints. OUTPUT/metrics.jsonl logs the losses and OUTPUT/loss.png
plots them (with matplotlib installed). The run ends with OUTPUT/final, which infer.generate, infer.score and
infer.convert read directly (and OUTPUT/final_adapter, PEFT adapters, for LoRA).

On several hosts, every host runs the same command (TPU pods, SLURM and Open MPI are detected; elsewhere pass
the three multi-host flags) with OUTPUT on a file system they share: every process reads and validates the
data file and feeds its own devices their rows of each batch; orbax writes each process's shards; process 0
writes the metrics, the logs and the adapter files.

Exit status: 0 trained; 1 too many non-finite losses; 2 a user error, told in one line `error: ...` (settings,
data, files; a resume whose batch size, seq_len or training data differ from the checkpoint's; no checkpoint
that restores); 3 stopped by SIGTERM (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import sys
import time

from mistral_jax import distributed, launch
from mistral_jax.memory_plan import MemoryPlanError
from mistral_jax.train_config import TrainConfig
from mistral_jax.trainer import NonFiniteLossError, ResumeError, Trainer

# flag -> TrainConfig key (lr and lora_rank go to optimizer.lr and lora.rank; lora_rank 0 = full fine-tuning)
FLAGS = {
    "init": str,
    "train": str,
    "eval": str,
    "tokenizer": str,
    "output": str,
    "steps": int,
    "lr": float,
    "lora_rank": int,
    "batch_size": int,
    "seq_len": int,
    "checkpoint_every": int,
    "mesh": str,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.finetune", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config",
        help="YAML file of TrainConfig keys (configs/*.yaml); default: the TrainConfig defaults, with the flags",
    )
    p.add_argument("--init", help="our checkpoint, a transformers or Mistral directory, or a preset name (random init)")
    p.add_argument("--train", help="training JSONL ({'messages'} or {'prompt', 'completion'} rows)")
    p.add_argument("--eval", help="held-out JSONL for eval loss and perplexity")
    p.add_argument(
        "--tokenizer",
        help="sentencepiece model (default: tokenizer.model in --init; "
        "mistral-common:v1 = the file mistral-common ships)",
    )
    p.add_argument("--output", help="run directory")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lora-rank", type=int, help="0 = full fine-tuning")
    p.add_argument("--batch-size", type=int, help="rows per optimizer step")
    p.add_argument("--seq-len", type=int, help="tokens per packed row")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--mesh", help="device mesh, e.g. fsdp=8 or data=2,fsdp=4 (default: every device on fsdp)")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also log to OUTPUT/tensorboard (needs tensorboardX or tensorboard)",
    )
    distributed.add_args(p)
    return p.parse_args(argv)


def fail(e: BaseException, code: int = 2) -> int:
    """A user error: one line `error: ...` (a message of several lines joined), no traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    print(f"error: {'; '.join(lines)}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    launch.default_platforms()
    args = parse_args(argv)
    overrides = {name: getattr(args, name) for name in FLAGS}
    overrides["tensorboard"] = args.tensorboard
    try:
        if args.config:
            cfg = TrainConfig.load(args.config, **overrides)
        else:
            cfg = TrainConfig.from_dict({}, "command line", **overrides)
        distributed.initialize(args)  # before any other JAX call; nothing to do for one process
        trainer = Trainer(cfg)
    # OSError: a file that cannot be read or a directory that cannot be made (missing, a directory, no access).
    except (ValueError, OSError, MemoryPlanError) as e:
        return fail(e)
    t0 = time.perf_counter()
    try:
        status = trainer.run()
    except (ResumeError, OSError) as e:  # no checkpoint restores, another batch size or data; no room, no access
        return fail(e)
    except NonFiniteLossError as e:
        return fail(e, 1)
    distributed.log(f"{status} in {time.perf_counter() - t0:.1f}s: {cfg.output}")
    return 0 if status == "done" else 3


if __name__ == "__main__":
    sys.exit(main())
