"""The programs aot.py compiles for a TPU topology, built from abstract inputs: the generation programs (and a
decode step unrolled over 1 and 2 layers for the roofline estimate), the scorer and the training step, each as
the tools jit it, plus the memory plan of the same job."""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import decode as decode_lib
from . import kv_cache, memory_plan, programs, scoring, tuning
from . import train_step as ts
from .batching import bucket_length
from .config import MistralConfig, Numerics
from .lora import LoraConfig
from .params import param_shapes
from .sharding import ModelMesh

JOBS = ("generate", "score", "lora", "full")


# ---- abstract inputs ----------------------------------------------------------------------------------------


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _rows(mm: ModelMesh, shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=mm.batch_sharding(len(shape)))


def abstract_params(mm: ModelMesh, dtype: str):
    return _abstract(param_shapes(mm.config, dtype), mm.param_shardings)


# ---- what is compiled ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """A job's shape. generate: `batch_size` rows of `seq_len` tokens in all, the prompt half of it (prefilled
    in chunks of `prefill_chunk`); score: rows of `seq_len` tokens; lora / full: one optimizer step of
    `batch_size` rows of `seq_len` tokens in `grad_accum` microbatches."""

    kind: str
    batch_size: int = 8
    seq_len: int = 4096
    grad_accum: int = 1
    lora_rank: int = 16
    prefill_chunk: int = 512

    def __post_init__(self):
        if self.kind not in JOBS:
            raise ValueError(f"job must be one of {', '.join(JOBS)}, got {self.kind!r}")


@dataclasses.dataclass
class Program:
    """One compiled program's figures, per device."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_seconds: float
    flops: float | None
    bytes_accessed: float | None
    optimal_seconds: float | None  # the compiler's estimate; None where it gives none (negative)
    kernels: int = 0  # Pallas (Mosaic) kernel calls in the program, e.g. splash attention
    error: str | None = None  # the compiler's refusal (out of HBM): bytes are then arguments + its temporaries

    @property
    def compiled_bytes(self) -> int:
        """What the program holds on a device at its peak: arguments + temporaries + outputs - aliases."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "compiled_bytes": self.compiled_bytes}


def compile_program(name: str, jitted, *args, compiler_options: dict | None = None, **kwargs) -> Program:
    """jitted.lower(*args, **kwargs).compile(compiler_options) and its memory and cost analyses. A program the
    compiler refuses for want of HBM is reported (with `error`) rather than raised: its arguments (from their
    shardings) and the temporaries the compiler's message gives."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    kernels = lowered.as_text().count("tpu_custom_call")
    try:
        compiled = lowered.compile(compiler_options)
    except jax.errors.JaxRuntimeError as e:
        found = _OOM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        arguments = sum(_device_bytes(x) for x in jax.tree.leaves((args, kwargs)))
        return Program(
            name,
            arguments,
            0,
            0,
            int(float(found.group(1)) * _UNITS[found.group(2)]),
            round(time.perf_counter() - t0, 2),
            None,
            None,
            None,
            kernels,
            str(e).strip().splitlines()[0][:300],
        )
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    optimal = cost.get("optimal_seconds")
    return Program(
        name,
        int(mem.argument_size_in_bytes),
        int(mem.output_size_in_bytes),
        int(mem.alias_size_in_bytes),
        int(mem.temp_size_in_bytes),
        round(seconds, 2),
        cost.get("flops"),
        cost.get("bytes accessed"),
        optimal if optimal is not None and optimal >= 0 else None,
        kernels,
    )


# The TPU compiler's refusal: "... HLO temporaries (20.72G) exceeds available HBM (15.75G)" (binary units).
_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _device_bytes(x) -> int:
    """Bytes of one device's shard of an abstract array (0 for anything else)."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or not hasattr(x, "shape"):
        return 0
    return math.prod(sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def generate_programs(mm: ModelMesh, numerics: Numerics, job: Job) -> list[Program]:
    """The prefill and the decode loop that Generator runs for the job, and one decode step (one token for
    every row: the per-token cost, which the loop's estimate does not give)."""
    c = mm.config
    b = mm.round_batch(job.batch_size)
    prompt = bucket_length(max(1, job.seq_len // 2), c.max_seq_len)
    chunk = min(job.prefill_chunk, prompt)
    prompt = -(-prompt // chunk) * chunk
    new = max(1, job.seq_len - prompt)
    slots = kv_cache.num_slots(c, min(1 << (prompt + new - 1).bit_length(), c.max_seq_len))
    params = abstract_params(mm, numerics.dtype)
    cache = _abstract(kv_cache.KVCache.shapes(c, b, slots, numerics.dtype), mm.cache_shardings())
    out = []
    with mm.activate():
        prefill = programs.prefill_program(c, numerics, chunk, mm)
        out.append(
            compile_program(f"prefill {b} x {prompt}", prefill, params, _rows(mm, (b, prompt)), _rows(mm, (b,)), cache)
        )
        state_sh = programs.state_shardings(mm.mesh, mm.rules)
        state = jax.eval_shape(lambda: _empty_state(c, b, slots, new, numerics.dtype))
        state = _abstract(state, state_sh)
        decode = programs.decode_program(c, numerics, mm)
        out.append(
            compile_program(
                f"decode loop {b} rows, {slots} slots",
                decode,
                params,
                state,
                jax.ShapeDtypeStruct((), jnp.int32),
                sampled=True,
                final=False,
            )
        )
    out += decode_step_estimate(mm, numerics, b, slots)
    return out


def _unrolled_params(mm: ModelMesh, dtype: str):
    """Abstract params with the layers held one tree per layer (model.run_layers then unrolls them), each
    sharded as its slice of the stacked layout."""
    params = abstract_params(mm, dtype)

    def one(x):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=NamedSharding(mm.mesh, P(*x.sharding.spec[1:])))

    layer = jax.tree.map(one, params["layers"])
    return {**params, "layers": tuning.PerLayer(tuple([layer] * mm.config.n_layers))}


# Memory-space assignment's VMEM staging copies would count as bytes accessed (see decode_step_estimate).
HBM_ONLY = {"xla_msa_enable": False}


def decode_step_estimate(mm: ModelMesh, numerics: Numerics, b: int, slots: int) -> list[Program]:
    """One decode step (a token for each of `b` rows, the body of decode's loop) compiled with 1 and 2 layers
    unrolled, its FLOPs, bytes accessed and the compiler's estimate extrapolated to all layers:
    x(L) = x(1) + (L - 1) (x(2) - x(1)). Memory figures are those of the 2-layer program.

    Compiled without memory-space assignment (HBM_ONLY), so that bytes accessed is HBM traffic: each op reads its
    operands from HBM once, the roofline's model. With it, the TPU compiler stages weights (and, in a program of
    1 or 2 layers, the whole cache) through on-chip VMEM with copies that its cost analysis counts again, at
    the HBM-to-VMEM copy and at the op that reads the copy; that is on-chip traffic, not HBM traffic."""
    steps = []
    for n in (1, 2):
        m = ModelMesh(mm.mesh, mm.config.replace(n_layers=n))
        cache = _abstract(kv_cache.KVCache.shapes(m.config, b, slots, numerics.dtype), m.cache_shardings())
        with m.activate():
            steps.append(
                compile_program(
                    f"decode step ({n} layer)",
                    _decode_step(m.config, numerics, m),
                    _unrolled_params(m, numerics.dtype),
                    _rows(m, (b, 1)),
                    _rows(m, (b, 1)),
                    cache,
                    compiler_options=HBM_ONLY,
                )
            )
    one, two = steps
    n = mm.config.n_layers
    est = lambda a, z: None if a is None or z is None else a + (n - 1) * (z - a)  # noqa: E731
    name = f"decode step {b} rows, {slots} slots (time: {n} layers from 1 and 2; memory: 2 layers)"
    return [
        dataclasses.replace(
            two,
            name=name,
            compile_seconds=round(one.compile_seconds + two.compile_seconds, 2),
            flops=est(one.flops, two.flops),
            bytes_accessed=est(one.bytes_accessed, two.bytes_accessed),
            optimal_seconds=est(one.optimal_seconds, two.optimal_seconds),
        )
    ]


def _empty_state(config, b, slots, new, dtype):
    logits = jnp.zeros((b, config.vocab_size), jnp.float32)
    return decode_lib.DecodeState.greedy(kv_cache.KVCache.init(config, b, slots, dtype), logits, 0, 0, new)


def _decode_step(config: MistralConfig, numerics: Numerics, mm: ModelMesh):
    """One token for every row through the model and the cache (the body of decode's loop), cache donated."""
    from . import model as model_lib

    def step(params, tokens, positions, cache):
        return model_lib.forward(
            params, tokens, positions, jnp.ones_like(tokens), cache, config=config, numerics=numerics
        )

    return jax.jit(step, donate_argnames=("cache",), out_shardings=(mm.batch_sharding(3), mm.cache_shardings()))


def score_programs(mm: ModelMesh, numerics: Numerics, job: Job) -> list[Program]:
    """scoring.token_logprobs as infer.score jits it, on one batch of rows of seq_len tokens."""
    b = mm.round_batch(job.batch_size)
    fn = scoring._jitted(mm.config, numerics)
    with mm.activate():
        return [
            compile_program(
                f"score {b} x {job.seq_len}",
                fn,
                abstract_params(mm, numerics.dtype),
                _rows(mm, (b, job.seq_len)),
                _rows(mm, (b,)),
            )
        ]


def train_programs(
    mm: ModelMesh,
    numerics: Numerics,
    job: Job,
    opt_cfg: ts.OptimizerConfig | None = None,
    lora_spec: LoraConfig | None = None,
) -> list[Program]:
    """train_step.jit_train_step as the trainer jits it: one optimizer step of the job's batch."""
    c = mm.config
    opt_cfg = opt_cfg or ts.OptimizerConfig(total_steps=1000)
    if opt_cfg.total_steps is None:
        opt_cfg = opt_cfg.replace(total_steps=1000)
    if job.kind == "lora" and lora_spec is None:
        lora_spec = LoraConfig(rank=job.lora_rank)
    if job.kind == "full":
        lora_spec = None
    abstract, shardings = ts.layout(mm, c, numerics, opt_cfg, lora_spec)
    state = _abstract(abstract, shardings)
    # LoRA's frozen base is kept in the compute dtype (trainer.py).
    frozen = None if lora_spec is None else abstract_params(mm, numerics.dtype)
    b = mm.round_batch(job.batch_size)
    batch = {k: _rows(mm, (b, job.seq_len), jnp.float32 if k == "loss_mask" else jnp.int32) for k in ts.BATCH_KEYS}
    with mm.activate():
        step = ts.jit_train_step(c, opt_cfg, numerics=numerics, lora_spec=lora_spec, grad_accum=job.grad_accum, mm=mm)
        return [
            compile_program(
                f"{job.kind} train step {b} x {job.seq_len}, grad_accum {job.grad_accum}", step, state, frozen, batch
            )
        ]


def planned(mm: ModelMesh, numerics: Numerics, job: Job, mu_dtype: str | None = None) -> memory_plan.Plan:
    """memory_plan's plan of the job (what the tools check before compiling); `mu_dtype`: AdamW's first moment."""
    if job.kind in ("generate", "score"):
        return memory_plan.inference(mm.config, mm.mesh, numerics.dtype, job.batch_size, job.seq_len, kind=job.kind)
    micro = job.batch_size // job.grad_accum
    lora = job.kind == "lora"
    return memory_plan.training(
        mm.config,
        mm.mesh,
        job.kind,
        micro,
        job.seq_len,
        base_dtype=numerics.dtype if lora else numerics.param_dtype,
        compute_dtype=numerics.dtype,
        lora_rank=job.lora_rank,
        numerics=numerics,
        grad_accum=job.grad_accum,
        mu_dtype=mu_dtype,
    )
