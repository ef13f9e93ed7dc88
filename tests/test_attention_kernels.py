"""The Pallas splash path, run interpreted on the CPU (attention.SPLASH_INTERPRET), against the blockwise XLA
path: forward and gradients in float32 with the window, GQA, packed segments and padding; the fallback for
shapes the kernel cannot take; and the shard_map wrapper on a simulated 8-device mesh, in ONE subprocess (this
file run as a script, XLA_FLAGS set before JAX starts), as tests/test_sharding.py does."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _inputs(b=2, t=256, n=4, kh=2, h=16, seed=0):
    """q, k, v and rows mixing the cases: row 0 packs two segments and ends in padding, row 1 is one segment
    then padding, further rows are whole. Positions restart at 0 in every segment."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k = rng.standard_normal((b, t, kh, h)).astype(np.float32)
    v = rng.standard_normal((b, t, kh, h)).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    a, e = t * 3 // 8, t * 7 // 8  # segment 2 of row 0 spans [a, e)
    seg[0, a:e], pos[0, a:e] = 2, np.arange(e - a)
    seg[0, e:], pos[0, e:] = 0, np.arange(t - e) + e - a
    seg[1, t * 3 // 4 :] = 0
    return q, k, v, pos, seg


def _both(q, k, v, pos, seg, window, block=64):
    """(splash, blockwise) outputs and the gradients of a loss over the real tokens, wrt q, k, v."""
    import jax
    import jax.numpy as jnp

    from mistral_jax import attention

    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))
    valid = jnp.asarray(seg != 0)[:, :, None, None]

    def run(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(jnp.where(valid, out * w, 0.0)), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return np.asarray(jnp.where(valid, out, 0.0)), [np.asarray(g) for g in grads]

    def splash(q, k, v):
        plan = attention.splash_plan(q.shape, k.shape)
        assert plan is not None
        return attention.splash_self_attention(q, k, v, jnp.asarray(seg), window, plan)

    def xla(q, k, v):
        return attention.blockwise_attention(q, k, v, jnp.asarray(pos), jnp.asarray(seg), window, block)

    return run(splash), run(xla)


def _max_diff(a, b):
    (oa, ga), (ob, gb) = a, b
    return max([float(np.max(np.abs(oa - ob)))] + [float(np.max(np.abs(x - y))) for x, y in zip(ga, gb)])


def test_splash_equals_xla_path(monkeypatch):
    from mistral_jax import attention

    monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)
    q, k, v, pos, seg = _inputs()
    for window in (64, None):  # 64 < T: the windowed blockwise path; None: plain causal
        s, x = _both(q, k, v, pos, seg, window)
        assert _max_diff(s, x) < TOL, window


def test_splash_falls_back_for_shapes_it_cannot_take(monkeypatch):
    import jax
    import jax.numpy as jnp

    from mistral_jax import attention
    from mistral_jax.config import Numerics

    monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)
    # No tile divides 96 (a prompt bucket) or 1 (init's [1, 1] batch): the blockwise path, same numbers.
    assert attention.splash_plan((2, 96, 4, 16), (2, 96, 2, 16)) is None
    assert attention.splash_plan((1, 1, 4, 16), (1, 1, 2, 16)) is None
    assert attention.splash_plan((2, 384, 4, 16), (2, 384, 2, 16)).block == 128
    q, k, v, pos, seg = (jnp.asarray(x[:, :96]) for x in _inputs())
    splash = attention.self_attention(q, k, v, pos, seg, 16, Numerics(attention_impl="splash", attention_block=32))
    xla = attention.self_attention(q, k, v, pos, seg, 16, Numerics(attention_block=32))
    np.testing.assert_array_equal(np.asarray(splash), np.asarray(xla))
    jax.eval_shape(
        lambda: attention.self_attention(
            q[:1, :1], k[:1, :1], v[:1, :1], pos[:1, :1], seg[:1, :1], 16, Numerics(attention_impl="splash")
        )
    )


def test_model_with_splash_equals_xla(monkeypatch):
    """The whole model, loss and gradients, splash against the default kernel (tiny preset, window 16)."""
    import jax
    import jax.numpy as jnp

    from mistral_jax import attention, model, params
    from mistral_jax.config import Numerics, get_preset

    monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)
    config = get_preset("tiny")
    p = jax.jit(lambda r: params.init_params(config, r))(jax.random.key(0))
    _, _, _, pos, seg = _inputs(t=128)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, seg.shape), jnp.int32)

    def loss(p, numerics):
        logits = model.forward(p, tokens, jnp.asarray(pos), jnp.asarray(seg), config=config, numerics=numerics)
        return jnp.sum(jnp.where(jnp.asarray(seg != 0)[..., None], jax.nn.log_softmax(logits), 0.0)) / 1e4

    grads = {
        impl: jax.jit(jax.value_and_grad(loss), static_argnums=1)(p, Numerics(attention_impl=impl))
        for impl in ("splash", "xla")
    }
    (ls, gs), (lx, gx) = grads["splash"], grads["xla"]
    assert abs(float(ls) - float(lx)) < TOL
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gx)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=1e-4)


def test_splash_under_shard_map_on_8_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for mesh, r in results.items():
        assert r["sharded"], mesh
        assert r["diff"] < TOL, (mesh, r)
    assert results["fsdp=2,tensor=4"]["head_axis"] == "tensor"  # KV heads replicated over tensor


def _mesh_worker() -> dict:
    """In the 8-device subprocess: splash under each mesh (inside its rules, as the model runs it) against the
    blockwise path; N=8 query heads over 2 KV heads, so tensor=2 splits the KV heads and tensor=4 cannot."""
    import jax

    from mistral_jax import attention
    from mistral_jax.config import MistralConfig
    from mistral_jax.sharding import ModelMesh

    attention.SPLASH_INTERPRET = True
    config = MistralConfig(
        vocab_size=256,
        dim=64,
        n_layers=1,
        n_heads=8,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=128,
        sliding_window=64,
        max_seq_len=512,
    )
    q, k, v, pos, seg = _inputs(b=8, t=256, n=8, kh=2)
    out = {}
    reference = None
    for spec in ("data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4", "fsdp=8"):
        mm = ModelMesh.build(config, spec)
        with mm.activate():
            plan = attention.splash_plan(q.shape, k.shape)
            s, x = _both(q, k, v, pos, seg, config.sliding_window)
        reference = reference or x
        out[spec] = {
            "sharded": plan.mesh is not None,
            "head_axis": plan.head_axis,
            "diff": max(_max_diff(s, x), _max_diff(s, reference)),
        }
    assert len(jax.devices()) == 8
    return out


if __name__ == "__main__":
    print(json.dumps(_mesh_worker()))
