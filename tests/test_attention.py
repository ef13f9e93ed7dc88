"""attention.py: the window rule, the blockwise path against the dense one, and linear memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.attention import blockwise_attention as self_attention
from mistral_jax.attention import dot_attention, make_mask


def brute_mask(q_pos, k_pos, q_seg, k_seg, w):
    b, t = q_pos.shape
    s = k_pos.shape[1]
    m = np.zeros((b, t, s), bool)
    for bi in range(b):
        for i in range(t):
            for j in range(s):
                qi, kj = q_pos[bi, i], k_pos[bi, j]
                ok = kj <= qi and k_seg[bi, j] != 0 and q_seg[bi, i] == k_seg[bi, j]
                if w is not None:
                    ok = ok and qi - kj < w  # W keys, the query's own included
                m[bi, i, j] = ok
    return m


@pytest.mark.parametrize("w", [None, 1, 3, 8])
def test_mask_rule(w):
    rng = np.random.default_rng(0)
    q_pos = rng.integers(0, 20, (2, 7))
    k_pos = rng.integers(-1, 20, (2, 11))
    q_seg = rng.integers(0, 3, (2, 7))
    k_seg = rng.integers(0, 3, (2, 11))
    got = np.asarray(make_mask(q_pos, k_pos, q_seg, k_seg, w))
    np.testing.assert_array_equal(got, brute_mask(q_pos, k_pos, q_seg, k_seg, w))


def test_window_counts_own_key():
    # Query at position 10 with W=4 sees exactly positions 7, 8, 9, 10.
    pos = np.arange(12)[None]
    seg = np.ones((1, 12), int)
    m = np.asarray(make_mask(pos, pos, seg, seg, 4))
    assert np.flatnonzero(m[0, 10]).tolist() == [7, 8, 9, 10]


def _rand_qkv(rng, b, t, n, k, h):
    return (
        jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32),
        jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32),
        jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32),
    )


@pytest.mark.parametrize("t,w,block", [(100, 8, 8), (100, 8, 5), (77, 13, 16), (90, 1, 4), (130, 30, 7)])
def test_blockwise_equals_dense(t, w, block):
    rng = np.random.default_rng(t + w)
    q, k, v = _rand_qkv(rng, 2, t, 4, 2, 8)
    # Row 0: left padding of 9 (positions start after it); row 1: three packed segments.
    pos = np.stack(
        [np.clip(np.arange(t) - 9, 0, None), np.concatenate([np.arange(30), np.arange(40), np.arange(t - 70)])]
    )
    seg = np.stack([(np.arange(t) >= 9).astype(int), np.repeat([1, 2, 3], [30, 40, t - 70])])
    pos, seg = jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)
    assert t > block + w  # the blockwise path is taken
    got = self_attention(q, k, v, pos, seg, w, block)
    want = dot_attention(q, k, v, make_mask(pos, pos, seg, seg, w))
    valid = np.asarray(seg)[:, :, None, None] != 0
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-6)


def _temp_bytes(t, w, block=256, dense=False):
    q = jax.ShapeDtypeStruct((1, t, 8, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
    if dense:
        fn = jax.jit(lambda q, k, v, p, s: dot_attention(q, k, v, make_mask(p, p, s, s, w)))
    else:
        fn = jax.jit(lambda q, k, v, p, s: self_attention(q, k, v, p, s, w, block))
    return fn.lower(q, k, k, pos, pos).compile().memory_analysis().temp_size_in_bytes


def test_windowed_memory_is_linear():
    # A T x T score tensor would quadruple when T doubles; the blockwise path must stay near 2x.
    t4, t8 = _temp_bytes(4096, 256), _temp_bytes(8192, 256)
    assert t8 < 2.5 * t4, (t4, t8)
    # And it is far below what a dense T x T attention needs at T=8192 (sanity check of the measure).
    assert t8 < _temp_bytes(8192, None, dense=True) / 10


@pytest.mark.parametrize("w", [None, 1, 6])
def test_fused_path_arguments_match_blockwise(w):
    # The cuDNN path's arguments (is_causal, local_window_size=(W-1, 0), segment mask), run through the
    # XLA implementation of the same jax.nn.dot_product_attention, against our blockwise path.
    from mistral_jax.attention import fused_self_attention

    rng = np.random.default_rng(3)
    t = 40
    q, k, v = _rand_qkv(rng, 2, t, 4, 2, 8)
    pos = np.stack([np.where(np.arange(t) < 31, np.arange(t), 0), np.concatenate([np.arange(15), np.arange(25)])])
    seg = np.stack([(np.arange(t) < 31).astype(int), np.repeat([1, 2], [15, 25])])
    pos, seg = jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)
    got = fused_self_attention(q, k, v, pos, seg, w, "xla")
    want = self_attention(q, k, v, pos, seg, w, block=8)
    valid = np.asarray(seg)[:, :, None, None] != 0
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-6)
