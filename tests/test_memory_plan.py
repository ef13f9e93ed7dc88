"""memory_plan's terms follow what the TPU compiler allocates for Mistral 7B. The plan against the compiled bytes
(within 15% for generate, LoRA and full fine-tuning on v5e-8 and v5p-8 at 32 layers) is checked by commands
(docs/benchmarks.md), not in CI, where the compiles take minutes:
  python -m infer.plan --preset mistral-7b-v0.1 --topology v5e:2x4 --job lora \
      --config configs/mistral-7b-lora-v5e-8.yaml --compile --json
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 0.15
# (job, rows, tokens per row, grad_accum): one row per chip, as the shipped v5e-8 configs run.
JOBS = (("generate", 32, 1024, 1), ("lora", 16, 1024, 2), ("full", 8, 1024, 1))


def test_plan_follows_remat_attention_and_accumulation():
    """What the compiler showed, in the plan: the dense path's float32 scores grow as T^2 (2 GiB a 4096-token
    row of Mistral 7B), splash keeps none, remat dots saves more than remat full, and full fine-tuning with
    grad_accum holds a second float32 gradient."""
    from mistral_jax import memory_plan
    from mistral_jax.config import Numerics, get_preset

    c, mesh = get_preset("mistral-7b-v0.1"), {"fsdp": 8}

    def plan(seq=4096, accum=1, mode="lora", **kw):
        return memory_plan.training(c, mesh, mode, 8, seq, numerics=Numerics(dtype="bfloat16", **kw), grad_accum=accum)

    def row(p, name):
        return next(r.bytes for r in p.rows if r.what.startswith(name))

    dense = row(plan(remat="full"), "layer backward")
    assert dense >= 32 * 4096 * 4096 * 3  # the scores of 32 heads
    assert row(plan(remat="full", attention_impl="splash"), "layer backward") < dense / 4
    assert row(plan(seq=2048, remat="full"), "layer backward") < dense / 3
    assert row(plan(remat="dots"), "saved") > 5 * row(plan(remat="full"), "saved")
    accum = plan(mode="full", accum=2, remat="full")
    assert accum.bytes_of("optimizer") == 4 * plan(mode="full", remat="full").bytes_of("weights")
