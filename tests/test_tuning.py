"""tuning.py: the platform-tuned params compute what the plain stacked params compute."""

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import model, params, sharding, tuning
from mistral_jax.config import get_preset
from mistral_jax.kv_cache import KVCache


def test_per_layer_params_equal_the_scanned_layers_with_and_without_a_cache():
    c = get_preset("tiny", vocab_size=256, n_layers=3)
    plain = params.init_params(c, jax.random.key(0))
    mm = sharding.ModelMesh.build(c)
    tuned = tuning.for_inference(jax.tree.map(jnp.copy, plain), mm)
    assert tuning.on_one_cpu_device(mm) and isinstance(tuned["layers"], tuple) and len(tuned["layers"]) == 3
    for i, layer in enumerate(tuned["layers"]):
        for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(plain["layers"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)))
    np.testing.assert_allclose(
        model.logits(tuned, tokens, config=c), model.logits(plain, tokens, config=c), rtol=1e-6, atol=1e-6
    )

    def run(p):  # a prefill of 24 tokens into an 8-slot rolling cache, then 16 decode steps
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

    (a, ca), (b, cb) = run(tuned), run(plain)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ca.k, cb.k, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ca.pos, cb.pos)
