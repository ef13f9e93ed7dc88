"""Per-device memory plan of a job on a named accelerator, without the accelerator.

  python -m infer.plan --preset mistral-7b-v0.1 --mesh fsdp=8 --dtype bfloat16 --device h100
      [--job generate score lora full] [--batch 32 --len 4096] [--train-batch 8 --seq-len 4096]
      [--lora-rank 16] [--memory-gib G] [--markdown]

Params, optimizer state and KV cache are exact for our layout (mistral_jax/memory_plan.py); activations
are an estimate. The tools print the same plan at start-up against the memory JAX reports.
"""

from __future__ import annotations

import argparse
import math
import sys

from mistral_jax import checkpoint, memory_plan, sharding
from mistral_jax.config import PRESETS, get_preset

JOBS = ("generate", "score", "lora", "full")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m infer.plan", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=list(PRESETS))
    src.add_argument("--checkpoint", help="read the config of a checkpoint directory instead of a preset")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=8 or data=2,fsdp=2,tensor=2 (default: all on fsdp)")
    p.add_argument("--devices", type=int, help="device count (needed when --mesh has -1 or is omitted)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="params and KV cache for inference; frozen base params for LoRA")
    p.add_argument("--device", choices=list(memory_plan.DEVICES), help="accelerator whose memory to check")
    p.add_argument("--memory-gib", type=float, help="memory per device in GiB (instead of --device)")
    p.add_argument("--job", nargs="+", default=["generate", "lora", "full"], choices=JOBS)
    p.add_argument("--batch", type=int, default=32, help="inference rows per batch")
    p.add_argument("--len", type=int, default=4096, help="inference tokens per row (prompt + completion)")
    p.add_argument("--train-batch", type=int, default=8, help="training sequences per step")
    p.add_argument("--seq-len", type=int, default=4096, help="training tokens per sequence")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--markdown", action="store_true", help="one table row per job (docs/scaling.md)")
    return p.parse_args(argv)


def mesh_sizes(spec: str | None, devices: int | None) -> dict[str, int]:
    if devices is None:
        if not spec or "-1" in spec:
            raise SystemExit("error: --devices is needed when --mesh is omitted or has -1")
        devices = math.prod(sharding.parse_mesh(spec, 1 << 30).values())
    sizes = sharding.parse_mesh(spec, devices)
    if math.prod(sizes.values()) != devices:
        raise SystemExit(f"error: --mesh {spec} uses {math.prod(sizes.values())} devices, --devices is {devices}")
    return sizes


def plans(config, sizes, args) -> list[memory_plan.Plan]:
    out = []
    for job in args.job:
        if job in ("generate", "score"):
            out.append(memory_plan.inference(config, sizes, args.dtype, args.batch, args.len, kind=job))
        else:
            out.append(memory_plan.training(config, sizes, job, args.train_batch, args.seq_len,
                                            base_dtype=args.dtype, lora_rank=args.lora_rank))
    return out


def markdown_row(name: str, plan: memory_plan.Plan, memory: int | None) -> str:
    g = lambda n: f"{n / memory_plan.GiB:.1f}"  # noqa: E731
    fits = memory_plan.verdict(plan, memory) if memory is not None else "-"
    return (f"| {name} | {sharding.describe(plan.mesh)} | {plan.title} | {g(plan.bytes_of('weights'))} | "
            f"{g(plan.bytes_of('optimizer'))} | {g(plan.bytes_of('cache'))} | {g(plan.bytes_of('activations'))} | "
            f"{g(plan.total_bytes)} | {fits} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    config = get_preset(args.preset) if args.preset else checkpoint.load_config(args.checkpoint)
    try:
        sizes = mesh_sizes(args.mesh, args.devices)
        sharding.check_divisible(config, sizes)
    except sharding.ShardingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    memory = int(args.memory_gib * memory_plan.GiB) if args.memory_gib else \
        memory_plan.DEVICES.get(args.device) if args.device else None
    name = f"{math.prod(sizes.values())} x {args.device or 'device'}"
    for plan in plans(config, sizes, args):
        if args.markdown:
            print(markdown_row(name, plan, memory))
            for note in plan.notes:
                print(f"note: {note}", file=sys.stderr)
        else:
            print(memory_plan.format_plan(plan, memory, args.device or ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
