"""Per-device memory plan of a job on a named accelerator, without the accelerator; with --compile, the TPU
compiler's own figures for the programs the tools would run there.

  python -m infer.plan --preset mistral-7b-v0.1 --mesh fsdp=8 --dtype bfloat16 --device h100
      [--job generate score lora full] [--batch 32 --len 4096] [--train-batch 8 --seq-len 4096]
      [--lora-rank 16] [--memory-gib G] [--markdown]
  python -m infer.plan --preset mistral-7b-v0.1 --dtype bfloat16 --topology v5e:2x4 --mesh fsdp=8
      --job generate --batch-size 32 --compile --json
  python -m infer.plan --preset mistral-7b-v0.1 --topology v5e:2x4 --job lora
      --config configs/mistral-7b-lora-v5e-8.yaml --compile

Params, optimizer state and KV cache are exact for our layout (mistral_jax/memory_plan.py); activations
are an estimate. The tools print the same plan at start-up against the memory JAX reports. --compile
(needs libtpu: the tpu-aot extra) compiles for the --topology's TPU devices from abstract weights
(mistral_jax/aot.py) and prints per device the planned and compiled bytes, the chip's HBM, whether it fits,
the compile time and the compiler's time estimate. A --config (a train.finetune run config) gives the
training job its mesh, batch, grad_accum, sequence length, LoRA rank and numerics; flags given override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from mistral_jax import checkpoint, launch, memory_plan, mesh_choice, sharding
from mistral_jax.config import ATTENTION_IMPLS, PRESETS, Numerics, get_preset
from mistral_jax.topology import CHIPS

JOBS = ("generate", "score", "lora", "full")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m infer.plan", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=list(PRESETS))
    src.add_argument("--checkpoint", help="read the config of a checkpoint directory instead of a preset")
    p.add_argument(
        "--mesh",
        default=None,
        help="e.g. fsdp=8 or data=2,fsdp=2,tensor=2 (default: the tools' own, mistral_jax/mesh_choice.py: "
        "data x tensor for generate and score, every device on fsdp for training)",
    )
    p.add_argument("--devices", type=int, help="device count (needed when --mesh has -1 or is omitted)")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16", "float16"],
        help="params and KV cache for inference; frozen base params for LoRA",
    )
    p.add_argument("--device", choices=list(memory_plan.DEVICES), help="accelerator whose memory to check")
    p.add_argument("--memory-gib", type=float, help="memory per device in GiB (instead of --device)")
    p.add_argument(
        "--topology",
        metavar="CHIP:SHAPE",
        help=f"a TPU slice, e.g. v5e:2x4 or v5p:2x2x1 (chips: {', '.join(CHIPS)}): its "
        "device count and HBM; with --compile, its compiler",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the job's programs for --topology (needs libtpu) and report their memory",
    )
    p.add_argument("--config", metavar="YAML", help="a training run config (train.finetune's) for lora / full")
    p.add_argument(
        "--job", nargs="+", default=None, choices=JOBS, help="default: generate lora full, or the --config's job"
    )
    p.add_argument("--batch", type=int, default=32, help="inference rows per batch")
    p.add_argument(
        "--len",
        type=int,
        default=None,
        help="inference tokens per row (prompt + completion); default --seq-len, else 4096",
    )
    p.add_argument("--train-batch", type=int, default=8, help="training sequences per step")
    p.add_argument(
        "--batch-size", type=int, default=None, help="rows per batch of every job (sets --batch and --train-batch)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="training tokens per sequence (default 4096)")
    p.add_argument("--grad-accum", type=int, default=None, help="training microbatches per step (default 1)")
    p.add_argument("--lora-rank", type=int, default=None, help="default 16, or the --config's")
    p.add_argument(
        "--attention",
        choices=list(ATTENTION_IMPLS),
        default=None,
        help="attention kernel (default: xla for inference, auto for training, or the --config's)",
    )
    p.add_argument("--markdown", action="store_true", help="one table row per job (docs/scaling.md)")
    p.add_argument("--json", action="store_true", help="one JSON object per job")
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


def topology_devices(topology: str) -> int:
    """'v5e:2x4' -> 8: the devices of a chip per position (topology.Chip: a v5p chip is one, a v4 chip two)."""
    chip, _, shape = topology.partition(":")
    try:
        dims = [int(d) for d in shape.split("x")]
    except ValueError:
        dims = []
    if chip not in CHIPS or not dims or min(dims) <= 0:
        raise ValueError(
            f"--topology {topology!r}: expected CHIP:SHAPE with CHIP one of "
            f"{', '.join(CHIPS)}, e.g. v5e:2x4 or v5p:2x2x1"
        )
    return math.prod(dims) * CHIPS[chip].devices_per_chip


def read_run_config(args):
    """The --config's TrainConfig, or None."""
    if not args.config:
        return None
    from mistral_jax.train_config import TrainConfig

    return TrainConfig.load(args.config)


def jobs_of(args, run) -> list[str]:
    if args.job:
        if run is not None:
            kind = "full" if run.lora is None else "lora"
            wrong = [j for j in args.job if j in ("lora", "full") and j != kind]
            if wrong:
                raise ValueError(f"--job {wrong[0]} but --config {args.config} is a {kind} run")
        return list(args.job)
    if run is not None:
        return ["full" if run.lora is None else "lora"]
    return ["generate", "lora", "full"]


def job_settings(job: str, args, run) -> dict:
    """batch_size, seq_len, grad_accum, lora_rank and Numerics of a job, from the flags over the --config."""
    train = job in ("lora", "full")
    seq = args.seq_len or (run.seq_len if run is not None and train else None) or 4096
    if train:
        batch = args.batch_size or (run.batch_size if run is not None else args.train_batch)
        accum = args.grad_accum or (run.grad_accum if run is not None else 1)
        rank = args.lora_rank or (run.lora.rank if run is not None and run.lora is not None else 16)
        numerics = (
            run.numerics
            if run is not None
            else Numerics(param_dtype="float32", dtype=args.dtype, remat="full", attention_impl="auto")
        )
    else:
        seq = args.len or seq
        batch, accum, rank = args.batch_size or args.batch, 1, args.lora_rank or 16
        numerics = Numerics.of(args.dtype)
    if args.attention:
        numerics = numerics.replace(attention_impl=args.attention)
    if batch % accum:
        raise ValueError(f"batch size {batch} is not a multiple of grad_accum {accum}")
    mu = run.optimizer.mu_dtype if run is not None and train else None
    return dict(batch_size=batch, seq_len=seq, grad_accum=accum, lora_rank=rank, numerics=numerics, mu_dtype=mu)


def plan_of(config, sizes, job: str, s: dict) -> memory_plan.Plan:
    n = s["numerics"]
    if job in ("generate", "score"):
        return memory_plan.inference(config, sizes, n.dtype, s["batch_size"], s["seq_len"], kind=job)
    lora = job == "lora"
    return memory_plan.training(
        config,
        sizes,
        job,
        s["batch_size"] // s["grad_accum"],
        s["seq_len"],
        base_dtype=n.dtype if lora else n.param_dtype,
        compute_dtype=n.dtype,
        lora_rank=s["lora_rank"],
        numerics=n,
        grad_accum=s["grad_accum"],
        mu_dtype=s["mu_dtype"],
    )


def markdown_row(name: str, plan: memory_plan.Plan, memory: int | None) -> str:
    g = lambda n: f"{n / memory_plan.GiB:.1f}"  # noqa: E731
    fits = memory_plan.verdict(plan, memory) if memory is not None else "-"
    return (
        f"| {name} | {sharding.describe(plan.mesh)} | {plan.title} | {g(plan.bytes_of('weights'))} | "
        f"{g(plan.bytes_of('optimizer'))} | {g(plan.bytes_of('cache'))} | {g(plan.bytes_of('activations'))} | "
        f"{g(plan.total_bytes)} | {fits} |"
    )


def compiled(config, args, job: str, s: dict, run, mesh_spec: str | None) -> dict:
    """aot.compile_job's report of the job, as a dict; printed unless --json."""
    from mistral_jax import aot, aot_programs

    kw = {}
    if run is not None and job in ("lora", "full"):
        kw = dict(opt_cfg=run.optimizer_config(), lora_spec=run.lora if job == "lora" else None)
        if job == "lora" and args.lora_rank:
            kw["lora_spec"] = dataclasses.replace(run.lora, rank=args.lora_rank)
    report = aot.compile_job(
        config,
        args.topology,
        mesh_spec,
        aot_programs.Job(job, s["batch_size"], s["seq_len"], s["grad_accum"], s["lora_rank"]),
        s["numerics"],
        **kw,
    )
    if not args.json:
        print(report.format())
    return report.as_dict()


def job_mesh(
    config, job: str, s: dict, spec: str | None, devices: int | None, memory: int | None
) -> tuple[dict[str, int], str | None]:
    """(mesh sizes, why) of a job: --mesh (or the --config's) as given, else the tools' default for the job
    (mesh_choice.default_mesh_spec), checked against `memory` when known."""
    if spec or devices is None:
        return mesh_sizes(spec, devices), None
    fits = None if memory is None else lambda sizes: plan_of(config, sizes, job, s).total_bytes <= memory
    return mesh_choice.default_mesh_spec(config, job, devices, fits)


def compare_meshes(config, args, s: dict, chosen: dict[str, int]) -> list[dict]:
    """The decode step (aot_programs.decode_step_estimate: all layers from 1 and 2) compiled on the chosen mesh and
    on the alternatives (mesh_choice.alternatives), with its roofline and the compiler's estimate; printed
    as a table unless --json."""
    from mistral_jax import aot_programs, kv_cache, topology

    n, c, numerics = math.prod(chosen.values()), config, s["numerics"]
    chip, rows = topology.chip_of(args.topology), []
    for sizes in [chosen] + [m for m in mesh_choice.alternatives(c, n) if m != chosen]:
        mm = topology.model_mesh(c, args.topology, sharding.describe(sizes))
        b = mm.round_batch(s["batch_size"])
        slots = kv_cache.num_slots(c, min(s["seq_len"], c.max_seq_len))
        p = aot_programs.decode_step_estimate(mm, numerics, b, slots)[0]
        roof = (
            None
            if p.flops is None or p.bytes_accessed is None
            else max(p.flops / chip.bf16_flops, p.bytes_accessed / chip.hbm_bandwidth)
        )
        rows.append(
            {
                "mesh": sharding.describe(sizes),
                "chosen": sizes == chosen,
                "batch": b,
                "roofline_seconds": roof,
                "optimal_seconds": p.optimal_seconds,
                "compiled_bytes": p.compiled_bytes,
                "fits": p.compiled_bytes <= chip.usable_bytes,
            }
        )
    if not args.json:
        ms = lambda x: "-" if x is None else f"{x * 1e3:.2f} ms"  # noqa: E731
        print(f"  decode step ({s['batch_size']} rows) by mesh, all {c.n_layers} layers estimated from 1 and 2:")
        for r in rows:
            print(
                f"    {r['mesh']:26s} roofline {ms(r['roofline_seconds']):>10s}  compiler "
                f"{ms(r['optimal_seconds']):>10s}  {r['compiled_bytes'] / memory_plan.GiB:6.2f} GiB (2 layers)"
                f"{'  <- chosen' if r['chosen'] else ''}"
            )
    return rows


def main(argv=None) -> int:
    launch.default_platforms()
    args = parse_args(argv)
    try:
        config = get_preset(args.preset) if args.preset else checkpoint.load_config(args.checkpoint)
        run = read_run_config(args)
        jobs = jobs_of(args, run)
        if args.compile and not args.topology:
            raise ValueError("--compile needs --topology, e.g. --topology v5e:2x4")
        devices = args.devices
        if args.topology:
            devices = topology_devices(args.topology)
        mesh_spec = args.mesh or (run.mesh if run is not None else None)
        settings = {job: job_settings(job, args, run) for job in jobs}
        chip = args.topology.split(":")[0] if args.topology else None
        memory = (
            int(args.memory_gib * memory_plan.GiB)
            if args.memory_gib
            else memory_plan.DEVICES.get(args.device or chip)
            if (args.device or chip)
            else None
        )
        meshes = {job: job_mesh(config, job, settings[job], mesh_spec, devices, memory) for job in jobs}
        for sizes, _ in meshes.values():
            sharding.check_divisible(config, sizes)
    except (sharding.ShardingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for job in jobs:
        s = settings[job]
        sizes, why = meshes[job]
        dev = args.device or chip
        name = f"{math.prod(sizes.values())} x {dev or 'device'}"
        plan = plan_of(config, sizes, job, s)
        if why:
            plan.notes.insert(0, f"mesh {sharding.describe(sizes)}: {why}")
        if args.compile:
            from mistral_jax import topology

            try:
                out = compiled(config, args, job, s, run, sharding.describe(sizes))
                if job == "generate":
                    out["meshes"] = compare_meshes(config, args, s, sizes)
            except topology.AotError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            if args.json:
                print(json.dumps(out))
            elif why:
                print(f"  note: mesh {sharding.describe(sizes)}: {why}")
        elif args.json:
            print(
                json.dumps(
                    {
                        "job": job,
                        "mesh": sharding.describe(sizes),
                        "devices": math.prod(sizes.values()),
                        "planned_bytes": plan.total_bytes,
                        "hbm_bytes": CHIPS[dev].hbm_bytes if dev in CHIPS and not args.memory_gib else memory,
                        "usable_bytes": memory,
                        "fits": None if memory is None else plan.total_bytes <= memory,
                        "rows": {r.what: r.bytes for r in plan.rows},
                        "notes": plan.notes,
                    }
                )
            )
        elif args.markdown:
            print(markdown_row(name, plan, memory))
            for note in plan.notes:
                print(f"note: {note}", file=sys.stderr)
        else:
            print(memory_plan.format_plan(plan, memory, f"{dev}, usable" if dev in CHIPS else dev or ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
