"""The inference tools' default mesh (mistral_jax/mesh_choice.py) keeps the weights still at decode, and the
attention that training uses by default stays linear in memory (attention.causal_blockwise_attention,
attention.resolve_impl).

The compiled-HLO check needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts,
so it runs in ONE subprocess (this file run as a script)."""

import json
import os
import re
import subprocess
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax import attention, mesh_choice
from mistral_jax.config import MistralConfig, Numerics, get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Widths no activation of a decode step shares (batch 8, 64 slots): an all-gather whose result has a weight's
# element count is that weight (or a layer of it) being gathered. GQA with 4 KV heads on tensor=8: replicated.
CONFIG = MistralConfig(
    vocab_size=520,
    dim=72,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    head_dim=12,
    hidden_dim=200,
    sliding_window=32,
    max_seq_len=128,
)


# ---- the choice -----------------------------------------------------------------------------------------------


def test_inference_default_is_data_x_tensor_and_training_is_fsdp():
    seven_b = get_preset("mistral-7b-v0.1")
    assert mesh_choice.default_mesh_spec(seven_b, "generate", 8)[0] == {"data": 1, "fsdp": 1, "tensor": 8}
    assert mesh_choice.default_mesh_spec(seven_b, "score", 16)[0] == {"data": 1, "fsdp": 1, "tensor": 16}
    # tiny: 4 heads, so tensor=4 and the batch over the other 2.
    sizes, why = mesh_choice.default_mesh_spec(get_preset("tiny"), "generate", 8)
    assert sizes == {"data": 2, "fsdp": 1, "tensor": 4} and "tensor=4" in why and "no weight" in why
    assert mesh_choice.default_mesh_spec(seven_b, "generate", 1)[0] == {"data": 1, "fsdp": 1, "tensor": 1}
    for job in ("lora", "full"):
        sizes, why = mesh_choice.default_mesh_spec(seven_b, job, 8)
        assert sizes == {"data": 1, "fsdp": 8, "tensor": 1} and "fsdp" in why


def test_a_model_that_does_not_fit_replicated_falls_back_to_fsdp():
    tiny = get_preset("tiny")
    sizes, why = mesh_choice.default_mesh_spec(tiny, "generate", 8, fits=lambda s: s["data"] == 1)
    assert sizes == {"data": 1, "fsdp": 2, "tensor": 4} and "does not fit" in why
    sizes, why = mesh_choice.default_mesh_spec(tiny, "generate", 8, fits=lambda s: s["tensor"] == 1)
    assert sizes == {"data": 1, "fsdp": 8, "tensor": 1} and "fsdp" in why
    assert mesh_choice.default_mesh_spec(tiny, "generate", 8, fits=lambda s: False)[0]["fsdp"] == 8


def test_the_plan_says_which_mesh_and_why(capsys):
    from infer import plan

    assert (
        plan.main(
            ["--preset", "mistral-7b-v0.1", "--devices", "8", "--device", "v5e", "--job", "generate", "lora", "--json"]
        )
        == 0
    )
    gen, lora = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert gen["mesh"] == "data=1,fsdp=1,tensor=8" and "default for generate" in gen["notes"][0]
    assert lora["mesh"] == "data=1,fsdp=8,tensor=1" and "default for lora" in lora["notes"][0]
    assert mesh_choice.alternatives(get_preset("mistral-7b-v0.1"), 8) == [
        {"data": 8, "fsdp": 1, "tensor": 1},
        {"data": 4, "fsdp": 1, "tensor": 2},
        {"data": 2, "fsdp": 1, "tensor": 4},
        {"data": 1, "fsdp": 1, "tensor": 8},
        {"data": 1, "fsdp": 8, "tensor": 1},
    ]


# ---- the compiled decode step on 8 devices ---------------------------------------------------------------------


def test_default_mesh_decode_gathers_no_weight_and_fsdp_does():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["default"]["mesh"] == "data=1,fsdp=1,tensor=8", r
    assert "n_kv_heads=4 does not divide over tensor=8" in r["default"]["notes"]
    assert r["default"]["weight_gathers"] == [], r["default"]
    assert r["default"]["gathers"] > 0  # the logits and rows are gathered; the check sees all-gathers at all
    assert len(r["fsdp=8"]["weight_gathers"]) >= 4, r["fsdp=8"]  # wq, wk, wv, wo, w1, w2, w3 of a layer
    # launch.start without --mesh (the tools' start-up) and api.load_model's default are the same mesh.
    assert r["launch"] == r["default"]["mesh"] and "default for generate" in r["launch_log"]
    assert r["train"] == "data=1,fsdp=8,tensor=1"


def _weight_counts(config) -> set[int]:
    """Element counts of each weight matrix, whole and one layer of a stacked one (norm scales left out: a
    [D] vector has the size of a row's hidden state)."""
    from mistral_jax import params

    out = set()
    for path, shape in params.leaf_shapes(config).items():
        if "norm" in path:
            continue
        out.add(int(np.prod(shape)))
        if path.startswith("layers/"):
            out.add(int(np.prod(shape[1:])))
    return out


def _gathers(hlo: str) -> list[tuple[str, int]]:
    """(result shape, element count) of every all-gather in compiled HLO text."""
    out = []
    for m in re.finditer(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", hlo):
        dims = [int(d) for d in m.group(1).split(",") if d]
        out.append((m.group(1), int(np.prod(dims)) if dims else 1))
    return out


def _worker() -> dict:
    import contextlib
    import io

    from mistral_jax import aot_programs, launch, programs, sharding, train_config

    assert jax.device_count() == 8
    weights = _weight_counts(CONFIG)
    b, slots, new = 8, 64, 4
    numerics = Numerics.of("float32")
    out = {}
    for name, mm in (
        ("default", mesh_choice.default_mesh(CONFIG, "generate")),
        ("fsdp=8", sharding.ModelMesh.build(CONFIG, "fsdp=8")),
    ):
        params = aot_programs.abstract_params(mm, "float32")
        state = jax.eval_shape(lambda: aot_programs._empty_state(CONFIG, b, slots, new, "float32"))
        state = aot_programs._abstract(state, programs.state_shardings(mm.mesh, mm.rules))
        with mm.activate():
            hlo = (
                programs.decode_program(CONFIG, numerics, mm)
                .lower(params, state, jax.ShapeDtypeStruct((), jnp.int32), sampled=True, final=False)
                .compile()
                .as_text()
            )
        gathers = _gathers(hlo)
        out[name] = {
            "mesh": sharding.describe(mm.mesh),
            "notes": " ".join(mm.notes),
            "gathers": len(gathers),
            "weight_gathers": [s for s, n in gathers if n in weights],
        }
    # The tools' start-up without --mesh.
    args = types.SimpleNamespace(mesh=None, coordinator=None, num_processes=None, process_id=None, multi_host=False)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as ckpt:  # start reads the config only
        open(os.path.join(ckpt, "config.json"), "w").write(json.dumps(CONFIG.to_hf()))
        open(os.path.join(ckpt, "model.safetensors"), "wb").close()
        with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
            mm = launch.start(args, ckpt)
    out["launch"], out["launch_log"] = sharding.describe(mm.mesh), log.getvalue()
    cfg = train_config.TrainConfig()
    out["train"] = sharding.describe(sharding.ModelMesh.build(CONFIG, cfg.mesh).mesh)
    return out


# ---- attention: linear memory without a window, and the training default --------------------------------------


def _qkv(b, t, n, kh, h, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, n, h), (b, t, kh, h), (b, t, kh, h)))
    # Packed rows (positions restart at each segment) and a padding tail, as data.pack makes them.
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    seg[0, t // 3 :] = 2
    pos[0, t // 3 :] = np.arange(t - t // 3)
    seg[1, t - 7 :] = 0
    pos[1, t - 7 :] = 0
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("window", [None, 100, 37])
@pytest.mark.parametrize("t", [96, 130])
def test_blockwise_without_a_window_equals_dense(window, t):
    q, k, v, pos, seg = _qkv(2, t, 4, 2, 8)
    real = np.asarray(seg) != 0  # padding queries see no key: their (unused) outputs differ by path
    dense = attention.dot_attention(q, k, v, attention.make_mask(pos, pos, seg, seg, window))
    got = attention.blockwise_attention(q, k, v, pos, seg, window, block=8)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(dense)[real], atol=1e-5, rtol=1e-5)
    direct = attention.causal_blockwise_attention(q, k, v, pos, seg, window, block=16)
    np.testing.assert_allclose(np.asarray(direct)[real], np.asarray(dense)[real], atol=1e-5, rtol=1e-5)


def test_blockwise_gradients_equal_dense():
    q, k, v, pos, seg = _qkv(2, 100, 4, 2, 8, seed=1)
    real = (seg != 0)[:, :, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

    dense = jax.grad(
        lambda *a: loss(
            lambda q, k, v: attention.dot_attention(q, k, v, attention.make_mask(pos, pos, seg, seg, None)), *a
        ),
        argnums=(0, 1, 2),
    )(q, k, v)
    block = jax.grad(
        lambda *a: loss(lambda q, k, v: attention.blockwise_attention(q, k, v, pos, seg, None, 8), *a),
        argnums=(0, 1, 2),
    )(q, k, v)
    for a, b in zip(block, dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_long_sequences_hold_no_t_by_t_scores():
    """At T = 4096 without a window (and with one as long as the sequence), no array of the compiled
    attention, forward or backward, has T x T elements per head."""
    t, n = 4096, 2
    q = jax.ShapeDtypeStruct((1, t, n, 16), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)

    for window in (None, t):

        def loss(q, k, v, pos, seg, window=window):
            return jnp.sum(attention.blockwise_attention(q, k, v, pos, seg, window, 256))

        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q, pos, pos).compile().as_text()
        sizes = [int(np.prod([int(d) for d in m.split(",") if d])) for m in re.findall(r"f32\[([\d,]+)\]", hlo)]
        assert max(sizes) < t * t, (window, max(sizes))


def test_auto_attention_resolves_by_platform_and_is_trainings_default():
    assert attention.resolve_impl("auto", jnp.bfloat16, 128) == "xla"  # this CPU
    assert attention.resolve_impl("splash", jnp.float32, 128) == "splash"
    from mistral_jax.train_config import TrainConfig

    assert TrainConfig().numerics.attention_impl == "auto"
    assert Numerics().attention_impl == "xla"  # inference keeps the blockwise path unless told
    q, k, v, pos, seg = _qkv(2, 40, 4, 2, 8)
    auto = attention.self_attention(q, k, v, pos, seg, 16, Numerics(attention_impl="auto", attention_block=8))
    xla = attention.self_attention(q, k, v, pos, seg, 16, Numerics(attention_block=8))
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))


if __name__ == "__main__":
    print(json.dumps(_worker()))
