"""Grouped-query attention with Mistral's exact sliding window, and the one place that picks a kernel.

Einsum axis letters, used across the library:
  B batch    T query length    S key length    N query heads    K kv heads    G query heads per kv head (N/K)
  H head dim D model dim       F ffn dim       V vocab          L layers      C query block

The window rule: a query at absolute position i sees key j iff j <= i and i - j < W, i.e. W keys including
its own (transformers, mistral-inference, vLLM). Masks are built from absolute positions, never from array
indices, so the same code is exact for left-padded batches, packed rows, decode and chunked prefill.

`self_attention` dispatches a sequence's attention over itself to a kernel (Numerics.attention_impl):
"xla" (the blockwise einsum path, any backend), "cudnn" (jax.nn.dot_product_attention on GPU) or "splash"
(Pallas on TPU). Attention over a KV cache always takes the einsum path (`cache_attention`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# A large finite negative rather than -inf: a fully masked row (a padding query) then gives a uniform
# softmax instead of NaN, and NaN cannot leak into gradients through 0 * NaN.
_NEG = -1e30

# Scores of the query blocks processed together in one step of the blockwise path stay under this many
# bytes; it bounds temporary memory independently of the sequence length.
_BLOCK_SCORE_BYTES = 64 * 2**20


def make_mask(q_pos, k_pos, q_seg, k_seg, window: int | None):
    """Boolean mask [B, T, S]: key visible to query.

    q_pos [B, T], k_pos [B, S]: absolute positions. q_seg [B, T], k_seg [B, S]: segment ids, 0 marks
    padding (never attended); a query only sees keys of its own segment (packed rows).
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp <= qp) & (k_seg[:, None, :] != 0) & (q_seg[:, :, None] == k_seg[:, None, :])
    if window is not None:
        mask &= qp - kp < window
    return mask


def dot_attention(q, k, v, mask):
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]. Softmax in float32."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, h) * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    s = jnp.where(mask[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v)
    return out.reshape(b, t, n, h)


def cache_attention(q, ks, vs, masks):
    """Attention over one or more key sets sharing one softmax, without concatenating them.

    q [B, T, N, H]; ks/vs: tuples of [B, K, S_i, H] (the KV cache's order); masks: tuples of [B, T, S_i].
    (cache, new tokens) at a prefill chunk: a concatenation would copy the whole cache."""
    b, t, n, h = q.shape
    kh = ks[0].shape[1]
    q = q.reshape(b, t, kh, n // kh, h) * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
    scores = [jnp.where(m[:, None, None], jnp.einsum("BTKGH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32),
                        _NEG) for k, m in zip(ks, masks)]
    p = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)  # [B, K, G, T, sum S_i]
    out, start = 0, 0
    for v, s in zip(vs, scores):
        size = s.shape[-1]
        out = out + jnp.einsum("BKGTS,BKSH->BTKGH", p[..., start:start + size].astype(v.dtype), v)
        start += size
    return out.reshape(b, t, n, h)


def blockwise_attention(q, k, v, positions, segment_ids, window: int | None, block: int):
    """Attention of a sequence over itself. q [B, T, N, H], k/v [B, T, K, H], positions/segment_ids [B, T].

    Without a window, or when the whole sequence fits in one window span, this is one dense masked
    attention. Otherwise it is blockwise: query block b (C queries) only visits the keys
    [bC - PC, bC + C), P = ceil((W-1)/C) blocks back, so memory and work grow linearly in T, not as T^2.
    Assumes positions rise by one along each segment (true for padded and packed rows), so that a key
    within W positions is also within W array slots.
    """
    b, t = positions.shape
    if window is None or t <= block + window:
        return dot_attention(q, k, v, make_mask(positions, positions, segment_ids, segment_ids, window))

    c = block
    p = -(-(window - 1) // c)  # key blocks before the query block
    nb = -(-t // c)
    pad_t = nb * c - t
    span = (p + 1) * c

    def pad(x, front, back, value=0):
        widths = [(0, 0)] * x.ndim
        widths[1] = (front, back)
        return jnp.pad(x, widths, constant_values=value)

    # Queries padded at the back; keys padded at the front (P blocks of padding, segment 0) and back.
    qb = pad(q, 0, pad_t).reshape(b, nb, c, *q.shape[2:])
    qpos = pad(positions, 0, pad_t).reshape(b, nb, c)
    qseg = pad(segment_ids, 0, pad_t).reshape(b, nb, c)
    kp, vp = pad(k, p * c, pad_t), pad(v, p * c, pad_t)
    kpos, kseg = pad(positions, p * c, pad_t), pad(segment_ids, p * c, pad_t)

    def one_block(args):
        i, qi, qposi, qsegi = args
        start = i * c
        ki = jax.lax.dynamic_slice_in_dim(kp, start, span, axis=1)
        vi = jax.lax.dynamic_slice_in_dim(vp, start, span, axis=1)
        kposi = jax.lax.dynamic_slice_in_dim(kpos, start, span, axis=1)
        ksegi = jax.lax.dynamic_slice_in_dim(kseg, start, span, axis=1)
        return dot_attention(qi, ki, vi, make_mask(qposi, kposi, qsegi, ksegi, window))

    n = q.shape[2]
    per_block = b * n * c * span * 4 * 3  # scores, probabilities, mask-select in float32
    group = max(1, min(nb, _BLOCK_SCORE_BYTES // per_block))
    xs = (jnp.arange(nb), jnp.moveaxis(qb, 1, 0), jnp.moveaxis(qpos, 1, 0), jnp.moveaxis(qseg, 1, 0))
    out = jax.lax.map(one_block, xs, batch_size=group)  # [nb, B, C, N, H]
    out = jnp.moveaxis(out, 0, 1).reshape(b, nb * c, *q.shape[2:])
    return out[:, :t]


def self_attention(q, k, v, positions, segment_ids, window: int | None, numerics):
    """The attention of a sequence over itself (no cache), by the kernel `numerics.attention_impl` names.
    q [B, T, N, H], k/v [B, T, K, H], positions/segment_ids [B, T] -> [B, T, N, H]."""
    impl = numerics.attention_impl
    if impl == "cudnn":
        return fused_self_attention(q, k, v, positions, segment_ids, window, "cudnn")
    if impl == "splash":
        return splash_self_attention(q, k, v, positions, segment_ids, window)
    return blockwise_attention(q, k, v, positions, segment_ids, window, numerics.attention_block)


def fused_self_attention(q, k, v, positions, segment_ids, window: int | None, implementation: str):
    """Self-attention through `jax.nn.dot_product_attention` (implementation "cudnn" on GPU; "xla" runs the
    same arguments anywhere, which is how CPU tests check them).

    Its causal and window masks are aligned on array indices (top left), so this path requires what holds
    for self-attention over right-padded or packed rows: positions rise by one along each segment, so index
    distance equals position distance. W keys including its own: local_window_size=(W-1, 0), always with
    is_causal=True. Padding (segment 0) and packed segments go in as a boolean mask."""
    b, t = segment_ids.shape
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)


def splash_self_attention(q, k, v, positions, segment_ids, window: int | None):
    """TPU: Pallas splash attention with CausalMask & LocalMask((W-1, 0)), GQA as one multi-query kernel
    per KV group, segment ids for padding and packing. Runs on TPU only."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    kh = k.shape[2]
    shape = (t, t)
    m = sm.CausalMask(shape)
    if window is not None:
        m = m & sm.LocalMask(shape, (window - 1, 0), offset=0)
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([m] * (n // kh)))
    seg = sk.SegmentIds(q=segment_ids, kv=segment_ids)
    # [B, T, N, H] -> per batch row and KV group: q [G, T, H], k/v [T, H].
    qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4) / math.sqrt(h)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_group, in_axes=(0, 0, 0, 0))(qg, kg, vg, seg)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
