"""Per-device memory before compiling: params, optimizer state, KV cache, and an activation estimate.

Everything is computed from the config and the mesh sizes alone, with the same specs sharding.py gives the
real arrays, so `python -m infer.plan` can plan an 8-chip TPU job on a laptop. Params, optimizer state and
the KV cache are exact (they are what the code allocates); activations are an estimate and only warn.

Training assumptions (docs/scaling.md states them next to the table):
  full  float32 master params + float32 gradients + AdamW mu and nu in float32: 16 bytes per param (14 with
        OptimizerConfig.mu_dtype bfloat16), plus a float32 gradient accumulator when grad_accum > 1, and a
        compute-dtype copy of the params.
  lora  frozen base params in the run dtype; the adapters (lora.LoraConfig on every target: wq, wk, wv,
        wo, w1, w2, w3) in float32 with their gradients and AdamW state: 16 bytes per adapter param.

The activation terms follow what the TPU compiler allocates for these programs at 32 layers (within 15% of
its bytes on v5e-8, v5p-8 and v6e-8: `python bench/tpu_table.py`, docs/benchmarks.md): two layers' weights
gathered over fsdp (one computing, the next arriving) and the gathered output head; what the layer scan saves
for the backward (per Numerics.remat: each layer's input, every matmul output, or everything); one layer
recomputed at a time, its float32 attention scores [heads, T, S] included where the dense path runs
(attention.blockwise_attention at T <= block + window; S is the key span of a query block beyond that; splash
and cuDNN keep no scores); the logits in float32 and in the compute dtype, and their gradient. Generation holds
one more KV cache (the layer scan writes a new one), two layers' gathered weights and the gathered output head.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from . import kv_cache, sharding
from . import lora as lora_lib
from . import params as params_lib
from .config import MistralConfig, Numerics
from .topology import CHIPS

GiB = 2**30

# Memory a program may hold per device: a GPU's HBM; a TPU device's HBM less what its compiler keeps.
DEVICES: dict[str, int] = {
    "h100": 80 * GiB,
    "h200": 141 * 10**9,
    "a100": 80 * GiB,
    **{name: chip.usable_bytes for name, chip in CHIPS.items()},
}

# Row kinds; every kind but "activations" is exact and counts towards the refusal.
KINDS = ("weights", "optimizer", "cache", "activations")


class MemoryPlanError(RuntimeError):
    """The job cannot fit: the message gives the plan and the device memory."""


@dataclasses.dataclass(frozen=True)
class Row:
    what: str
    bytes: int  # per device
    how: str  # how it was counted
    kind: str  # one of KINDS


@dataclasses.dataclass
class Plan:
    title: str
    mesh: dict[str, int]
    rows: list[Row]
    notes: list[str]

    def bytes_of(self, kind: str) -> int:
        return sum(r.bytes for r in self.rows if r.kind == kind)

    @property
    def exact_bytes(self) -> int:
        return sum(r.bytes for r in self.rows if r.kind != "activations")

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)


def _itemsize(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


def _sharded_bytes(shape, names, itemsize, mesh, rules) -> int:
    return math.prod(sharding.shard_shape(shape, sharding.spec_for(names, rules), mesh)) * itemsize


def param_bytes(config: MistralConfig, mesh, itemsize: int, rules) -> int:
    """Per-device bytes of the param tree stored with `itemsize` bytes per element."""
    axes = jax.tree.leaves(params_lib.param_logical_axes(config), is_leaf=sharding._is_names)
    shapes = jax.tree.leaves(params_lib.param_shapes(config))
    return sum(_sharded_bytes(s.shape, names, itemsize, mesh, rules) for names, s in zip(axes, shapes))


def lora_bytes(config: MistralConfig, mesh, rank: int, rules) -> tuple[int, int]:
    """(per-device bytes, total params) of float32 LoRA adapters of `rank` on every target, laid out by their
    logical axes (lora.lora_logical_axes)."""
    spec = lora_lib.LoraConfig(rank=rank)
    axes = jax.tree.leaves(lora_lib.lora_logical_axes(config, spec), is_leaf=sharding._is_names)
    shapes = jax.tree.leaves(lora_lib.lora_shapes(config, spec))
    per_device = sum(_sharded_bytes(s.shape, names, 4, mesh, rules) for names, s in zip(axes, shapes))
    return per_device, sum(math.prod(s.shape) for s in shapes)


def cache_bytes(config: MistralConfig, mesh, batch: int, slots: int, itemsize: int, rules) -> int:
    c = config
    kv = (c.n_layers, batch, c.n_kv_heads, slots, c.head_dim)  # the order of CACHE_AXES
    return 2 * _sharded_bytes(kv, sharding.CACHE_AXES["k"], itemsize, mesh, rules) + _sharded_bytes(
        (batch, slots), sharding.CACHE_AXES["pos"], 4, mesh, rules
    )


def _split(n: int, ways: int) -> int:
    return -(-n // ways)


def layer_bytes(config: MistralConfig, mesh, itemsize: int, rules) -> int:
    """One layer's weights as a device holds them while computing it: gathered over fsdp, still split over
    tensor."""
    gathered = {**sharding.mesh_sizes(mesh), "fsdp": 1}
    axes = jax.tree.leaves(params_lib.param_logical_axes(config)["layers"], is_leaf=sharding._is_names)
    shapes = jax.tree.leaves(params_lib.param_shapes(config)["layers"])
    total = sum(_sharded_bytes(s.shape, names, itemsize, gathered, rules) for names, s in zip(axes, shapes))
    return total // config.n_layers


# Bytes per score element a layer's backward holds: f32 scores, probabilities in the compute dtype (TPU compiler).
SCORE_BYTES = 3


def inference(
    config: MistralConfig,
    mesh: Mapping[str, int] | jax.sharding.Mesh,
    dtype: str,
    batch: int,
    total_len: int,
    kind: str = "generate",
) -> Plan:
    """Plan for `infer.generate` (KV cache for `batch` rows of up to `total_len` tokens, prompt and
    completion; one batch's cache at a time) or `infer.score` (no cache; logits of `batch` rows of `total_len` tokens).
    `batch` is rounded up to the data-parallel size as the tools do."""
    sizes = sharding.mesh_sizes(mesh)
    rules, notes = sharding.rules_for(config, sizes)
    batch = sharding.round_batch(batch, sizes)
    size = _itemsize(dtype)
    rows = [
        Row("params", param_bytes(config, sizes, size, rules), f"{config.num_params / 1e9:.2f}B x {dtype}", "weights")
    ]
    gathered = Row(
        "gathered layers (est.)",
        2 * layer_bytes(config, sizes, size, rules),
        "two layers at a time, whole over fsdp",
        "activations",
    )
    if kind == "generate":
        slots = kv_cache.num_slots(config, total_len)
        cache = cache_bytes(config, sizes, batch, slots, size, rules)
        rows.append(Row("KV cache", cache, f"batch {batch} x {slots} slots x {dtype}", "cache"))
        head = _split(config.vocab_size, sizes["tensor"]) * config.dim * size
        rows += [
            Row("KV cache update (est.)", cache, "the layer scan writes a new cache", "activations"),
            gathered,
            Row("gathered output (est.)", head, "vocab x dim, whole over fsdp", "activations"),
        ]
    else:
        # token_logprobs holds the [B, T, V] float32 logits and one temporary of their size (logsumexp).
        b = _split(batch, sharding.data_parallel_size(sizes))
        rows += [
            Row(
                "logits (est.)",
                2 * b * total_len * _split(config.vocab_size, sizes["tensor"]) * 4,
                f"2 x f32 [{b}, {total_len}, vocab/tensor] per device",
                "activations",
            ),
            gathered,
        ]
    return Plan(f"{kind}, {dtype}, batch {batch} x {total_len} tokens", sizes, rows, notes)


def training(
    config: MistralConfig,
    mesh: Mapping[str, int] | jax.sharding.Mesh,
    mode: str,
    batch: int,
    seq_len: int,
    base_dtype: str = "bfloat16",
    compute_dtype: str = "bfloat16",
    lora_rank: int = 16,
    *,
    numerics: Numerics | None = None,
    grad_accum: int = 1,
    mu_dtype: str | None = None,
) -> Plan:
    """Plan for full fine-tuning (`mode='full'`) or LoRA (`mode='lora'`) with `batch` rows per microbatch
    (batch_size / grad_accum), see the module docstring. `numerics` gives the remat policy and the attention
    kernel (default: remat full, the XLA path, in `compute_dtype`); `mu_dtype` AdamW's first moment's
    (OptimizerConfig.mu_dtype, default float32)."""
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    numerics = numerics or Numerics(dtype=compute_dtype, remat="full")
    sizes = sharding.mesh_sizes(mesh)
    rules, notes = sharding.rules_for(config, sizes)
    batch = sharding.round_batch(batch, sizes)
    n = f"{config.num_params / 1e9:.2f}B"
    cb = _itemsize(compute_dtype)
    mu = "bf16" if mu_dtype == "bfloat16" else "f32"
    mu_size = _itemsize(mu_dtype or "float32")
    if mode == "full":
        p32 = param_bytes(config, sizes, 4, rules)
        rows = [
            Row("params (f32 master)", p32, f"{n} x 4 B", "weights"),
            Row("gradients (f32)", p32, "laid out as the params", "optimizer"),
            Row(f"AdamW mu ({mu}) + nu (f32)", p32 + p32 * mu_size // 4, "laid out as the params", "optimizer"),
        ]
        if grad_accum > 1:
            rows.append(Row("gradient accumulator (f32)", p32, f"grad_accum {grad_accum}", "optimizer"))
        if cb != 4:  # the f32 master cast once to the compute dtype
            rows.append(
                Row(
                    f"params in {compute_dtype} (est.)",
                    param_bytes(config, sizes, cb, rules),
                    "the cast the layers read",
                    "activations",
                )
            )
    else:
        a, n_adapter = lora_bytes(config, sizes, lora_rank, rules)
        rows = [
            Row(
                f"params (frozen, {base_dtype})",
                param_bytes(config, sizes, _itemsize(base_dtype), rules),
                f"{n} x {_itemsize(base_dtype)} B",
                "weights",
            ),
            Row("LoRA adapters (f32)", a, f"rank {lora_rank}, {n_adapter / 1e6:.1f}M params", "weights"),
            Row("adapter gradients (f32)", a * (2 if grad_accum > 1 else 1), "", "optimizer"),
            Row(f"AdamW mu ({mu}) + nu (f32)", a + a * mu_size // 4, "adapters only", "optimizer"),
        ]
    rows += activation_rows(config, sizes, rules, batch, seq_len, numerics, cb)
    return Plan(f"{mode} fine-tuning, batch {batch} x {seq_len} tokens", sizes, rows, notes)


def activation_rows(
    config: MistralConfig, sizes: dict, rules, batch: int, seq_len: int, numerics: Numerics, cb: int
) -> list[Row]:
    """The estimated rows of a train step's activations per device (module docstring)."""
    c, t = config, sizes["tensor"]
    b = _split(batch, sharding.data_parallel_size(sizes))
    tokens = b * seq_len
    heads, kv = _split(c.n_heads, t), c.n_kv_heads if c.n_kv_heads % t else c.n_kv_heads // t
    # A layer's matmul outputs per token: q, k, v, the attention output, w1 and w3, w2.
    dots = (heads + 2 * kv) * c.head_dim + 2 * c.dim + 2 * _split(c.hidden_dim, t)
    keys = 0  # key span of a query's scores on the XLA path; splash and cuDNN keep none
    if numerics.attention_impl == "xla":
        w, block = c.sliding_window, numerics.attention_block
        keys = seq_len if w is None or seq_len <= block + w else (-(-(w - 1) // block) + 1) * block
    scores = b * heads * seq_len * keys * SCORE_BYTES
    # One layer recomputed: its matmul outputs, the MLP's activation, the scores.
    layer = tokens * (dots + _split(c.hidden_dim, t)) * cb + scores
    saved = {"full": tokens * c.dim * cb, "dots": tokens * dots * cb, "none": layer}[numerics.remat]
    remat = {"full": "each layer's input", "dots": "each layer's matmul outputs", "none": "every activation"}
    head = _split(c.vocab_size, t) * c.dim * cb
    return [
        Row(
            "gathered layers (est.)",
            2 * layer_bytes(c, sizes, cb, rules) + head,
            "two layers and the output head, whole over fsdp",
            "activations",
        ),
        Row(
            "saved for backward (est.)",
            c.n_layers * saved,
            f"remat {numerics.remat}: {remat[numerics.remat]}, {tokens} tokens",
            "activations",
        ),
        Row(
            "layer backward (est.)",
            layer,
            f"scores f32 [{b} x {heads}, {seq_len}, {keys}]" if keys else "no scores kept",
            "activations",
        ),
        Row(
            "logits (est.)",
            tokens * _split(c.vocab_size, t) * (4 + 2 * cb),
            f"[{tokens}, vocab] in f32, in the compute dtype and its gradient",
            "activations",
        ),
    ]


def device_memory(devices=None) -> int | None:
    """Bytes JAX may still allocate on a device (the smallest over the local devices), or None where the
    backend does not say (CPU)."""
    free = []
    for d in devices if devices is not None else jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free) if free else None


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def verdict(plan: Plan, memory: int) -> str:
    if plan.total_bytes <= memory:
        return "fits"
    if plan.exact_bytes > memory:
        return "does not fit"
    return "fits without activations; tight"


def format_plan(plan: Plan, memory: int | None = None, memory_name: str = "") -> str:
    lines = [
        f"memory plan per device: mesh {sharding.describe(plan.mesh)} "
        f"({math.prod(plan.mesh.values())} devices), {plan.title}"
    ]
    for r in plan.rows:
        lines.append(f"  {r.what:28s}{_gib(r.bytes):>12s}   {r.how}")
    lines.append(f"  {'total':28s}{_gib(plan.total_bytes):>12s}")
    if memory is None:
        lines.append("  device memory: not reported by this backend (CPU), not checked")
    else:
        name = f"device memory{f' ({memory_name})' if memory_name else ''}"
        lines.append(f"  {name:28s}{_gib(memory):>12s}   {verdict(plan, memory)}")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def check(plan: Plan, memory: int | None) -> None:
    """MemoryPlanError when the exact part (params, optimizer state, KV cache) exceeds `memory`."""
    if memory is not None and plan.exact_bytes > memory:
        raise MemoryPlanError(
            f"{plan.title} needs {_gib(plan.exact_bytes)} per device for params, optimizer state and KV cache "
            f"on mesh {sharding.describe(plan.mesh)}, but a device has {_gib(memory)} free: use more devices "
            "(fsdp or tensor), a smaller batch, or bfloat16\n" + format_plan(plan, memory)
        )


def report(plan: Plan, print_fn=print, devices=None) -> None:
    """Prints the plan against the memory JAX reports for the local devices; MemoryPlanError when the exact
    part cannot fit, a warning when the activation estimate tips it over."""
    memory = device_memory(devices)
    check(plan, memory)
    print_fn(format_plan(plan, memory))
    if memory is not None and plan.total_bytes > memory:
        print_fn("warning: with the activation estimate the job may not fit; lower the batch size if it fails")
