"""Ahead-of-time TPU compiles (mistral_jax/aot.py) on this CPU-only machine: the decode step, a splash prefill
and a LoRA train step with splash, for a v5e-8 slice with fsdp=8 and with tensor=8, at 2 layers and small
widths. They run in ONE subprocess (this file run as a script), which loads libtpu apart from the CPU tests.
libtpu comes with the tpu-aot extra, which .[test] includes."""

import json
import os
import subprocess
import sys

import pytest

from mistral_jax.config import MistralConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("fsdp=8", "tensor=8")
# Mistral's head size and GQA ratio at small width: 8 KV heads split over tensor=8.
CONFIG = MistralConfig(
    vocab_size=1024,
    dim=512,
    n_layers=2,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    hidden_dim=1024,
    sliding_window=256,
    max_seq_len=1024,
)
ESTIMATE_CONFIG = CONFIG.replace(n_layers=16)  # the estimate compiles 1 and 2 layers whatever the count
TOPOLOGIES = ("v4:2x2x1", "v5e:2x4", "v5p:2x2x1", "v6e:2x4")
CHIPS = [t.split(":")[0] for t in TOPOLOGIES]


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tpu_programs_compile_for_v5e_8(results):
    for mesh in MESHES:
        r = results[mesh]
        # The Mosaic kernel (not the fallback) under shard_map, forward and backward.
        assert r["prefill"]["kernels"] > 0 and r["train"]["kernels"] > 0, r
        for name in ("decode", "prefill", "train"):
            assert 0 < r[name]["compiled_bytes"] < r["hbm_bytes"], (mesh, name, r[name])
    # Tensor parallelism keeps the weights still at decode: far less memory traffic than fsdp's gathers.
    assert results["tensor=8"]["decode"]["temp_bytes"] < results["fsdp=8"]["decode"]["temp_bytes"]
    # The CLI: one JSON object with the figures.
    cli = results["cli"]
    assert cli["fits"] is True and cli["topology"] == "v5e:2x4" and cli["mesh"] == "data=1,fsdp=8,tensor=1"
    assert 0 < cli["planned_bytes"] and 0 < cli["compiled_bytes"] <= cli["hbm_bytes"] == 16 * 2**30
    assert cli["compile_seconds"] > 0 and len(cli["optimal_seconds"]) == len(cli["programs"]) == 1
    # What the compiler lets a program hold on a device, as its refusal says, is topology.CHIPS' usable_bytes.
    from mistral_jax import topology

    assert cli["usable_bytes"] == topology.CHIPS["v5e"].usable_bytes and sorted(results["usable"]) == sorted(CHIPS)
    for chip, usable in results["usable"].items():
        assert abs(usable - topology.CHIPS[chip].usable_bytes) < 0.01 * 2**30, (chip, usable / 2**30)


def test_decode_step_estimate_is_near_the_hbm_floor(results):
    """The decode step's bytes accessed (all layers from 1 and 2) against the bytes a step must read: every weight
    and the whole KV cache once, per device of tensor=8 (all of them split 8 ways; the norm scales replicated)."""
    c, b, slots = ESTIMATE_CONFIG, 8, 512
    n, k, h, d, f = c.n_heads, c.n_kv_heads, c.head_dim, c.dim, c.hidden_dim
    layer = (2 * d * n * h + 2 * d * k * h + 3 * d * f) * 2 / 8 + 2 * d * 2
    weights = c.n_layers * layer + 2 * c.vocab_size * d * 2 / 8 + d * 2
    cache = 2 * c.n_layers * b * k * slots * h * 2 / 8
    ratio = results["tensor=8"]["estimate"]["bytes_accessed"] / (weights + cache)
    assert 0.9 < ratio < 2, ratio


def test_plan_refuses_compile_without_topology(capsys):
    from infer import plan

    assert plan.main(["--preset", "tiny", "--devices", "1", "--job", "generate", "--compile"]) == 2
    assert capsys.readouterr().err.startswith("error: --compile needs --topology")
    assert plan.main(["--preset", "tiny", "--topology", "v9z:2x4", "--job", "generate"]) == 2


def _usable_bytes(devices) -> int:
    """The HBM the compiler allows one device, from its refusal of a program that holds 149 GiB."""
    import re

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from mistral_jax.aot_programs import _UNITS

    def grow(a):
        c = jnp.broadcast_to(a[:, :1], (200_000, 200_000)) * 1.0
        return jax.lax.fori_loop(0, 4, lambda i, c: jnp.roll(c, 1, 0) * 1.1 + a[i, 0], c)[::1000, ::1000]

    x = jax.ShapeDtypeStruct((200_000, 8), jnp.float32, sharding=NamedSharding(Mesh(devices[:1], ("x",)), P()))
    try:
        jax.jit(grow).lower(x).compile()
    except jax.errors.JaxRuntimeError as e:
        found = re.search(r"available HBM \(([\d.]+)([KMGT]?)\)", str(e))
        assert found, str(e)[:500]
        return int(float(found.group(1)) * _UNITS[found.group(2)])
    raise AssertionError("a 149 GiB program compiled")


def _worker() -> dict:
    import contextlib
    import io

    import jax

    from infer import plan
    from mistral_jax import aot_programs, kv_cache, programs, topology
    from mistral_jax.config import Numerics
    from mistral_jax.lora import LoraConfig

    config = CONFIG
    b, t, slots = 8, 512, 512
    splash = Numerics.of("bfloat16").replace(attention_impl="splash")
    out = {}
    for spec in MESHES:
        mm = topology.model_mesh(config, "v5e:2x4", spec)
        params = aot_programs.abstract_params(mm, "bfloat16")
        cache = aot_programs._abstract(kv_cache.KVCache.shapes(config, b, slots, "bfloat16"), mm.cache_shardings())
        r = {"hbm_bytes": topology.CHIPS["v5e"].hbm_bytes}
        with mm.activate():
            step = aot_programs._decode_step(config, splash, mm)
            r["decode"] = aot_programs.compile_program(
                "decode", step, params, aot_programs._rows(mm, (b, 1)), aot_programs._rows(mm, (b, 1)), cache
            ).as_dict()
            prefill = programs.prefill_program(config, splash, t, mm)
            r["prefill"] = aot_programs.compile_program(
                "prefill", prefill, params, aot_programs._rows(mm, (b, t)), aot_programs._rows(mm, (b,)), cache
            ).as_dict()
        # A smaller step (256 tokens, adapters on q and v, no remat) keeps the compile short; the kernels, forward
        # and backward, are the same.
        job = aot_programs.Job("lora", batch_size=b, seq_len=256)
        numerics = splash.replace(param_dtype="float32")
        lora = LoraConfig(rank=8, targets=("q", "v"))
        r["train"] = aot_programs.train_programs(mm, numerics, job, lora_spec=lora)[0].as_dict()
        if spec == "tensor=8":
            em = topology.model_mesh(ESTIMATE_CONFIG, "v5e:2x4", spec)
            r["estimate"] = aot_programs.decode_step_estimate(em, Numerics.of("bfloat16"), b, slots)[0].as_dict()
        out[spec] = r
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert (
            plan.main(
                [
                    "--preset",
                    "tiny",
                    "--topology",
                    "v5e:2x4",
                    "--mesh",
                    "fsdp=8",
                    "--job",
                    "score",
                    "--batch-size",
                    "8",
                    "--seq-len",
                    "64",
                    "--compile",
                    "--json",
                ]
            )
            == 0
        )
    out["cli"] = json.loads(buf.getvalue())
    out["usable"] = {t.split(":")[0]: _usable_bytes(topology.topology_devices(t)) for t in TOPOLOGIES}
    assert jax.default_backend() == "cpu"
    return out


if __name__ == "__main__":
    print(json.dumps(_worker()))
