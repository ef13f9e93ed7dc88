"""The mesh a job gets without --mesh: the one function that decides, and the alternatives infer.plan compares.

Inference keeps the weights still: heads, the MLP and the vocabulary on `tensor`, the batch on `data`, so a
decode step reads its weight shards where they lie. On fsdp, XLA gathers every layer's weights at every
step, so each device pulls (n-1)/n of the model over the chip links per token. Training puts every device on
fsdp (weights and optimizer state sharded, the batch split). A model that does not fit in memory replicated
over `data` gets its weights split over fsdp as well.

  mm = mesh_choice.default_mesh(config, "generate", plan)   # plan(config, sizes) -> memory_plan.Plan
  sizes, why = mesh_choice.default_mesh_spec(config, "generate", 8)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from . import memory_plan
from .config import MistralConfig
from .sharding import ModelMesh, describe, make_mesh

INFERENCE_JOBS = ("generate", "score", "eval")


def tensor_size(config: MistralConfig, n: int) -> int:
    """The largest tensor size that divides n_heads, hidden_dim, vocab_size and the device count (KV heads
    that do not divide are replicated over tensor, see sharding.rules_for)."""
    c = config
    return max(
        d for d in range(1, n + 1) if not n % d and not c.n_heads % d and not c.hidden_dim % d and not c.vocab_size % d
    )


def default_mesh_spec(
    config: MistralConfig,
    job: str,
    devices: int | Sequence | None = None,
    fits: Callable[[dict[str, int]], bool] | None = None,
) -> tuple[dict[str, int], str]:
    """({axis: size}, why) of the mesh `job` gets without --mesh, on `devices` (a count or a list; default
    every device). Inference (generate, score, eval): data x tensor, tensor as large as tensor_size allows;
    when `fits(sizes)` is False there, fsdp x tensor, then every device on fsdp. Training: every device on
    fsdp."""
    n = len(jax.devices()) if devices is None else devices if isinstance(devices, int) else len(devices)
    every_fsdp = {"data": 1, "fsdp": n, "tensor": 1}
    if job not in INFERENCE_JOBS:
        return every_fsdp, f"default for {job}: every device on fsdp (weights and optimizer state sharded)"
    c, t = config, tensor_size(config, n)
    candidates = [
        (
            {"data": n // t, "fsdp": 1, "tensor": t},
            f"default for {job}: heads, MLP and vocab on tensor={t} (the largest size dividing n_heads="
            f"{c.n_heads}, hidden_dim={c.hidden_dim}, vocab_size={c.vocab_size} and {n} devices), the batch "
            f"on data={n // t}: a decode step moves no weight between devices",
        )
    ]
    if t < n:
        candidates += [
            (
                {"data": 1, "fsdp": n // t, "tensor": t},
                f"default for {job}: data={n // t},tensor={t} does not fit in memory (weights replicated "
                f"over data); weights also split over fsdp={n // t}, which gathers them at every step",
            ),
            (
                every_fsdp,
                f"default for {job}: no data x tensor mesh fits in memory; every device on "
                "fsdp, which gathers each layer's weights at every step",
            ),
        ]
    for sizes, why in candidates:
        if fits is None or fits(sizes):
            return sizes, why
    return every_fsdp, f"default for {job}: nothing fits in memory; every device on fsdp (the least per device)"


def fits_memory(
    config: MistralConfig, plan: Callable[[MistralConfig, dict], memory_plan.Plan] | None, devices=None
) -> Callable[[dict[str, int]], bool] | None:
    """default_mesh_spec's `fits`: the plan's per-device bytes (activation estimate included) within the memory
    JAX reports for a device; None (anything fits) where the backend reports none (CPU) or without a plan."""
    memory = memory_plan.device_memory(devices)
    if memory is None or plan is None:
        return None
    return lambda sizes: plan(config, sizes).total_bytes <= memory


def default_mesh(
    config: MistralConfig,
    job: str,
    plan: Callable[[MistralConfig, dict], memory_plan.Plan] | None = None,
    devices: Sequence | None = None,
) -> ModelMesh:
    """The ModelMesh of default_mesh_spec, checked against `plan` where JAX reports device memory; its first
    note says which mesh and why."""
    devices = list(jax.devices() if devices is None else devices)
    sizes, why = default_mesh_spec(config, job, devices, fits_memory(config, plan, devices))
    mm = ModelMesh(make_mesh(sizes, devices), config)
    mm.notes = [f"mesh {describe(sizes)}: {why}"] + mm.notes
    return mm


def alternatives(config: MistralConfig, n: int) -> list[dict[str, int]]:
    """The meshes infer.plan compares a decode step on: every data x tensor split the model divides over
    (data=n, ..., tensor=n) and every device on fsdp."""
    out = [
        {"data": n // t, "fsdp": 1, "tensor": t} for t in range(1, n + 1) if not n % t and tensor_size(config, t) == t
    ]
    return out + [{"data": 1, "fsdp": n, "tensor": 1}]
