"""memory_plan's terms follow what the TPU compiler allocates for Mistral 7B. The plan against the compiled bytes
(within 15% for generate, LoRA and full fine-tuning on v5e-8, v5p-8 and v6e-8 at 32 layers) is checked by one
command, `python bench/tpu_table.py` (docs/benchmarks.md), and for the shipped TPU configs at reduced size by
tests/test_shipped_configs.py.
"""


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
    # A bfloat16 first moment takes a quarter off the float32 gradients + mu + nu.
    p32 = plan(mode="full", remat="full").bytes_of("weights")
    bf16_mu = memory_plan.training(c, mesh, "full", 8, 4096, numerics=Numerics(dtype="bfloat16"), mu_dtype="bfloat16")
    assert bf16_mu.bytes_of("optimizer") == 3 * p32 - p32 // 2
