"""tuning.py: the platform-tuned params compute what the plain stacked params compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax import model, params, sharding, tuning
from mistral_jax.config import get_preset
from mistral_jax.kv_cache import KVCache


def _run(p, c, tokens):
    """A prefill of 24 tokens into an 8-slot rolling cache, then 16 decode steps: logits and the cache."""
    step = jax.jit(
        lambda p, t, pos, cache, empty: model.forward(p, t, pos, None, cache, config=c, cache_empty=empty),
        static_argnums=4,
    )
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    out, cache = step(p, tokens[:, :24], pos, KVCache.init(c, 2, 8), True)
    outs = [out[:, -1]]
    for t in range(24, 40):
        out, cache = step(p, tokens[:, t : t + 1], jnp.full((2, 1), t), cache, False)
        outs.append(out[:, 0])
    return np.stack(outs), cache


def _assert_same_outputs(tuned, plain, c, seed: int):
    """The logits of 40 random tokens, and of a cached prefill + decode run with its cache, agree."""
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (2, 40)))
    np.testing.assert_allclose(
        model.logits(tuned, tokens, config=c), model.logits(plain, tokens, config=c), rtol=1e-5, atol=1e-5
    )
    (a, ca), (b, cb) = _run(tuned, c, tokens), _run(plain, c, tokens)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ca.k, cb.k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ca.v, cb.v, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ca.pos, cb.pos)


@pytest.mark.parametrize("tunings", [("per_layer",), ("out_major",), tuning.TUNINGS])
def test_tuned_params_equal_the_plain_stacked_params_with_and_without_a_cache(tunings):
    c = get_preset("tiny", vocab_size=256, n_layers=3)
    plain = params.init_params(c, jax.random.key(0))
    mm = sharding.ModelMesh.build(c)
    tuned = tuning.for_inference(jax.tree.map(jnp.copy, plain), mm, tunings)
    assert tuning.on_one_cpu_device(mm)
    if "per_layer" in tunings:
        assert isinstance(tuned["layers"], tuning.PerLayer) and len(tuned["layers"].layers) == 3
    if "out_major" in tunings:  # each projection held [out..., in...]: the transpose of the plain weight
        layer = tuned["layers"].layer(1) if "per_layer" in tunings else jax.tree.map(lambda w: w[1], tuned["layers"])
        wo = layer["attention"]["wo"]
        assert isinstance(wo, tuning.OutMajorWeight) and wo.shape == plain["layers"]["attention"]["wo"].shape[1:]
        np.testing.assert_array_equal(
            np.asarray(wo.w), np.moveaxis(np.asarray(plain["layers"]["attention"]["wo"][1]), (0, 1), (1, 2))
        )
        head = tuned["output"]["kernel"]
        np.testing.assert_array_equal(np.asarray(head.w), np.asarray(plain["output"]["kernel"]).T)

    # Many positions per row: the plain product form; the decode steps of the cache run take the W x^T form.
    _assert_same_outputs(tuned, plain, c, seed=0)


def test_per_layer_params_sliced_on_the_devices_equal_the_plain_params():
    # The path GPUs take (default_tunings): each leaf's layers sliced by a compiled program, not on the host.
    c = get_preset("tiny", vocab_size=256, n_layers=3)
    plain = params.init_params(c, jax.random.key(2))
    mm = sharding.ModelMesh.build(c)
    assert tuning.default_tunings(mm) == tuning.TUNINGS
    stacked = jax.device_put(jax.tree.map(jnp.copy, plain["layers"]), mm.param_shardings["layers"])
    tuned = {**plain, "layers": tuning.per_layer(stacked, on_host=False)}
    wq = tuned["layers"].layer(2)["attention"]["wq"]
    spec = mm.param_shardings["layers"]["attention"]["wq"].spec
    assert wq.sharding == jax.sharding.NamedSharding(mm.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    _assert_same_outputs(tuned, plain, c, seed=1)


def test_out_major_weight_reshapes_and_projects_as_the_array_it_stands_for():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 5)).astype(np.float32)  # [in (N, H), out D], as wo
    held = tuning.OutMajorWeight(jnp.asarray(np.moveaxis(w, (0, 1), (1, 2))), 2)
    assert held.shape == w.shape
    x = rng.standard_normal((2, 1, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(held.project("BTNH,NHD->BTD", x), np.einsum("btnh,nhd->btd", x, w), rtol=1e-5, atol=1e-5)
    merged = held.reshape(-1, w.shape[-1])
    assert merged.shape == (12, 5) and merged.n_in == 1
    np.testing.assert_allclose(
        merged.project("BTE,ED->BTD", x.reshape(2, 1, 12)), x.reshape(2, 1, 12) @ w.reshape(12, 5), rtol=1e-5
    )
    # An equation outside the standard form still computes its einsum.
    np.testing.assert_allclose(held.project("BTNH,NHD->DBT", x), np.einsum("btnh,nhd->dbt", x, w), rtol=1e-5)
    with pytest.raises(ValueError, match="mixes input and output"):
        held.reshape(4, 15)
    with pytest.raises(ValueError, match="unknown tunings"):
        tuning.for_inference({"layers": {}}, sharding.ModelMesh.build(get_preset("tiny")), ("fast",))


@pytest.mark.parametrize("fmt,dtype", [("hf", "float32"), ("native", "float32"), ("hf", "bfloat16")])
def test_load_for_inference_equals_tuning_the_loaded_plain_params(tmp_path, fmt, dtype):
    from mistral_jax import checkpoint

    c = get_preset("tiny", vocab_size=256, n_layers=3)
    plain = params.init_params(c, jax.random.key(1))
    (checkpoint.export_hf if fmt == "hf" else checkpoint.export_native)(str(tmp_path), plain, c, "float32")
    mm = sharding.ModelMesh.build(c)
    direct = tuning.load_for_inference(str(tmp_path), c, dtype, mm)
    two_steps = tuning.for_inference(checkpoint.load_params(str(tmp_path), c, dtype, mm.param_shardings), mm)
    assert jax.tree.structure(direct) == jax.tree.structure(two_steps)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(two_steps)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    with pytest.raises(checkpoint.CheckpointError, match="shape"):
        tuning.load_for_inference(str(tmp_path), get_preset("tiny", vocab_size=256, n_layers=3, dim=32), dtype, mm)
