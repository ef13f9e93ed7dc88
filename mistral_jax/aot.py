"""Ahead-of-time compiles for TPU topologies, on a machine without a TPU.

With libtpu installed (the `tpu-aot` extra), `jax.experimental.topologies` describes a TPU slice's devices;
a mesh of those devices and abstract inputs (ShapeDtypeStructs with shardings) let XLA's TPU compiler compile
the exact programs the tools run and report each device's memory and its own time estimate
(`compile_job(config, "v5e:2x4", "fsdp=8", Job("generate", 32), numerics)`; infer.plan --compile prints it).
Abstract weights come from params.param_shapes laid out by ModelMesh's shardings; nothing is allocated.
The compiler's `optimal_seconds` counts a loop's body once (the layer scan, the decode loop), or is negative
when it does not know: a model to compare programs and meshes with, not a measurement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import train_step as ts
from .aot_programs import Job, Program, generate_programs, planned, score_programs, train_programs
from .config import MistralConfig, Numerics
from .lora import LoraConfig
from .topology import Chip, GiB, chip_of, model_mesh

# ---- the report ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    job: str
    topology: str
    mesh: str
    devices: int
    hbm_bytes: int
    planned_bytes: int
    programs: list[Program]
    notes: list[str]
    chip: Chip
    floor_seconds: float | None = None  # generate: a decode step's HBM floor (weights + KV cache read once)
    planned_rows: dict[str, int] = dataclasses.field(default_factory=dict)  # the plan's bytes by row

    def roofline_seconds(self, p: Program) -> float | None:
        """max(FLOPs / peak, bytes accessed / HBM bandwidth) of a program: the estimate to compare meshes with
        where the compiler gives none (for a loop, of one pass of its body)."""
        if p.flops is None or p.bytes_accessed is None:
            return None
        return max(p.flops / self.chip.bf16_flops, p.bytes_accessed / self.chip.hbm_bandwidth)

    @property
    def compiled_bytes(self) -> int:
        """The largest program's peak: the job's programs run one after another."""
        return max(p.compiled_bytes for p in self.programs)

    @property
    def fits(self) -> bool:
        """Every program compiled within the HBM the compiler lets it use (Chip.usable_bytes)."""
        return self.compiled_bytes <= self.chip.usable_bytes and not any(p.error for p in self.programs)

    @property
    def compile_seconds(self) -> float:
        return round(sum(p.compile_seconds for p in self.programs), 2)

    def as_dict(self) -> dict[str, Any]:
        plan_vs = self.planned_bytes / self.compiled_bytes - 1 if self.compiled_bytes else None
        return {
            "job": self.job,
            "topology": self.topology,
            "mesh": self.mesh,
            "devices": self.devices,
            "fits": self.fits,
            "planned_bytes": self.planned_bytes,
            "compiled_bytes": self.compiled_bytes,
            "hbm_bytes": self.hbm_bytes,
            "usable_bytes": self.chip.usable_bytes,
            "headroom_bytes": self.chip.usable_bytes - self.compiled_bytes,
            "plan_error": None if plan_vs is None else round(plan_vs, 3),
            "planned_rows": self.planned_rows,
            "floor_seconds": self.floor_seconds,
            "compile_seconds": self.compile_seconds,
            "optimal_seconds": {p.name: p.optimal_seconds for p in self.programs},
            "roofline_seconds": {p.name: self.roofline_seconds(p) for p in self.programs},
            "programs": [p.as_dict() for p in self.programs],
            "notes": self.notes,
        }

    def format(self) -> str:
        g = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
        lines = [f"{self.job} on {self.topology} ({self.devices} devices), mesh {self.mesh}, per device:"]
        for p in self.programs:
            r = self.roofline_seconds(p)
            est = ("-" if p.optimal_seconds is None else f"{p.optimal_seconds * 1e3:.2f} ms") + (
                "" if r is None else f", roofline {r * 1e3:.2f} ms"
            )
            lines.append(
                f"  {p.name:44s} {g(p.compiled_bytes):>11s} (args {g(p.argument_bytes)}, temp "
                f"{g(p.temp_bytes)})  compile {p.compile_seconds:.1f} s  estimate {est}"
            )
            if p.error:
                lines.append(f"    refused: {p.error}")
        lines += [
            f"  planned {g(self.planned_bytes)}, compiled {g(self.compiled_bytes)}, HBM {g(self.hbm_bytes)} "
            f"({g(self.chip.usable_bytes)} usable): {'fits' if self.fits else 'does NOT fit'}"
        ]
        if self.floor_seconds is not None:
            lines.append(f"  decode step HBM floor (weights + KV cache read once): {self.floor_seconds * 1e3:.2f} ms")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def compile_job(
    config: MistralConfig,
    topology: str,
    mesh: str | None,
    job: Job,
    numerics: Numerics,
    opt_cfg: ts.OptimizerConfig | None = None,
    lora_spec: LoraConfig | None = None,
) -> Report:
    """Compiles the job's programs for `topology` on `mesh` and reports them against the plan and the HBM."""
    chip = chip_of(topology)
    mm = model_mesh(config, topology, mesh)
    if job.kind == "generate":
        progs = generate_programs(mm, numerics, job)
    elif job.kind == "score":
        progs = score_programs(mm, numerics, job)
    else:
        progs = train_programs(mm, numerics, job, opt_cfg, lora_spec)
    from .sharding import describe

    notes = list(mm.notes) + [
        "optimal_seconds: the compiler's estimate where it gives one; roofline_seconds: "
        "from its FLOPs and bytes accessed; a loop's body (the layer scan, the decode "
        "loop) counts once in both"
    ]
    plan = planned(mm, numerics, job, opt_cfg.mu_dtype if opt_cfg is not None else None)
    floor = None
    if job.kind == "generate":
        floor = (plan.bytes_of("weights") + plan.bytes_of("cache")) / chip.hbm_bandwidth
    rows = {r.what: r.bytes for r in plan.rows}
    size, hbm = mm.size, chip.hbm_bytes
    return Report(job.kind, topology, describe(mm.mesh), size, hbm, plan.total_bytes, progs, notes, chip, floor, rows)
