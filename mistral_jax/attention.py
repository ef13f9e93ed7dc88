"""Grouped-query attention with Mistral's exact sliding window, and the one place that picks a kernel.

Einsum axis letters, used across the library:
  B batch    T query length    S key length    N query heads    K kv heads    G query heads per kv head (N/K)
  H head dim D model dim       F ffn dim       V vocab          L layers      C query block

The window rule: a query at absolute position i sees key j iff j <= i and i - j < W, i.e. W keys including
its own (transformers, mistral-inference, vLLM). Masks are built from absolute positions, never from array
indices, so the same code is exact for left-padded batches, packed rows, decode and chunked prefill.

`self_attention` dispatches a sequence's attention over itself to a kernel (Numerics.attention_impl):
"xla" (the blockwise einsum path, any backend), "cudnn" (jax.nn.dot_product_attention on GPU), "splash"
(Pallas on TPU, under shard_map on a mesh) or "auto" (splash on TPU, cuDNN on GPU, else blockwise; training's
default). Shapes a kernel cannot take (a sequence no splash tile divides, such
as the [1, 1] batch that init traces, or heads that do not split evenly) take the blockwise path, decided
there and nowhere else. Attention over a KV cache always takes the einsum path (`cache_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# A large finite negative rather than -inf: a fully masked row (a padding query) then gives a uniform
# softmax instead of NaN, and NaN cannot leak into gradients through 0 * NaN.
_NEG = -1e30

# Scores of the query blocks processed together in one step of the blockwise path stay under this many
# bytes; it bounds temporary memory independently of the sequence length.
_BLOCK_SCORE_BYTES = 64 * 2**20

# Sequences of up to this many query blocks take the dense path: their [T, T] scores are small.
_DENSE_BLOCKS = 2

# Splash attention's tiles (queries and keys alike): the largest that divides the sequence is used; a sequence
# none divides takes the blockwise path. Multiples of 128 match the TPU's lanes.
SPLASH_BLOCKS = (512, 256, 128)

# True runs the Pallas kernels interpreted, on any backend (the kernel tests set it on the CPU); production
# leaves it False, which compiles them for the TPU.
SPLASH_INTERPRET = False


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
    scores = [
        jnp.where(m[:, None, None], jnp.einsum("BTKGH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32), _NEG)
        for k, m in zip(ks, masks)
    ]
    p = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)  # [B, K, G, T, sum S_i]
    out, start = 0, 0
    for v, s in zip(vs, scores):
        size = s.shape[-1]
        # The product in its own output order (batch axes first): asked for T-major, it ran a slower kernel.
        out = out + jnp.einsum("BKGTS,BKSH->BKGTH", p[..., start : start + size].astype(v.dtype), v)
        start += size
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def blockwise_attention(q, k, v, positions, segment_ids, window: int | None, block: int):
    """Attention of a sequence over itself. q [B, T, N, H], k/v [B, T, K, H], positions/segment_ids [B, T].

    Memory grows linearly in T, not as T^2: with a window shorter than the sequence, query block b (C queries)
    only visits the keys [bC - PC, bC + C), P = ceil((W-1)/C) blocks back; otherwise (no window, or one about
    as long as the sequence) it is one dense masked attention up to _DENSE_BLOCKS blocks, and
    causal_blockwise_attention beyond. Assumes positions rise by one along each segment (true for
    padded and packed rows), so that a key within W positions is also within W array slots.
    """
    b, t = positions.shape
    if window is None or t <= block + window:
        if t <= _DENSE_BLOCKS * block:
            return dot_attention(q, k, v, make_mask(positions, positions, segment_ids, segment_ids, window))
        return causal_blockwise_attention(q, k, v, positions, segment_ids, window, block)

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


def causal_blockwise_attention(q, k, v, positions, segment_ids, window: int | None, block: int):
    """Blockwise causal attention (any window) whose memory grows linearly in T: queries in blocks of
    `block`, each block's scores against the keys before its end only, never a [T, T] array.

    Query blocks go in groups of a static key extent: the last half of the blocks visit every key, the
    quarter before them the first half of the keys, and so on (with a window, keys more than W-1 before a
    group's first query are left out too), so the work is about 4/3 of the causal triangle's. Each block is
    rematerialized in the backward pass, so a gradient holds one block's scores at a time, not every block's."""
    b, t = positions.shape
    c = block
    nb = -(-t // c)
    pad_t = nb * c - t

    def pad(x):
        return jnp.pad(x, [(0, 0), (0, pad_t)] + [(0, 0)] * (x.ndim - 2))

    qb, qpos, qseg = (pad(x).reshape(b, nb, c, *x.shape[2:]) for x in (q, positions, segment_ids))
    outs, hi = [], nb
    while hi > 0:
        lo = hi // 2
        start = 0 if window is None else max(0, lo * c - (window - 1))
        end = min(t, hi * c)
        ks, vs = k[:, start:end], v[:, start:end]
        kpos, kseg = positions[:, start:end], segment_ids[:, start:end]

        @jax.checkpoint
        def one_block(args, ks=ks, vs=vs, kpos=kpos, kseg=kseg):
            qi, qposi, qsegi = args
            return dot_attention(qi, ks, vs, make_mask(qposi, kpos, qsegi, kseg, window))

        per_block = b * q.shape[2] * c * (end - start) * 4 * 3  # scores, probabilities, mask-select in float32
        group = max(1, min(hi - lo, _BLOCK_SCORE_BYTES // per_block))
        xs = tuple(jnp.moveaxis(x[:, lo:hi], 1, 0) for x in (qb, qpos, qseg))
        outs.insert(0, jax.lax.map(one_block, xs, batch_size=group))  # [hi - lo, B, C, N, H]
        hi = lo
    out = jnp.moveaxis(jnp.concatenate(outs, axis=0), 0, 1).reshape(b, nb * c, *q.shape[2:])
    return out[:, :t]


def resolve_impl(impl: str, dtype, head_dim: int) -> str:
    """The kernel "auto" stands for where this program runs (the current mesh's devices, else JAX's default
    backend): splash on TPU, cuDNN on GPU for bfloat16 / float16 with a head size it takes, the blockwise
    path otherwise. Other names are returned as they are."""
    if impl != "auto":
        return impl
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    if platform == "tpu":
        return "splash"
    if (
        platform in ("gpu", "cuda", "rocm")
        and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    return "xla"


def self_attention(q, k, v, positions, segment_ids, window: int | None, numerics):
    """The attention of a sequence over itself (no cache), by the kernel `numerics.attention_impl` names
    ("auto": resolve_impl). q [B, T, N, H], k/v [B, T, K, H], positions/segment_ids [B, T] -> [B, T, N, H]."""
    impl = resolve_impl(numerics.attention_impl, q.dtype, q.shape[-1])
    if impl == "cudnn":
        return fused_self_attention(q, k, v, positions, segment_ids, window, "cudnn")
    if impl == "splash":
        plan = splash_plan(q.shape, k.shape)
        if plan is not None:
            return splash_self_attention(q, k, v, segment_ids, window, plan)
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
        q,
        k,
        v,
        mask=mask[:, None],
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )


@dataclasses.dataclass(frozen=True)
class SplashPlan:
    """How splash runs for one shape: its tile, and the shard_map around it (None without a mesh)."""

    block: int  # query and key tile; divides T
    mesh: object | None  # the context's abstract mesh, or None: the kernel is called directly
    q_spec: P = P()  # [B, T, N, H] over the mesh (the rules' batch and heads axes)
    kv_spec: P = P()  # [B, T, K, H]
    seg_spec: P = P()  # [B, T]
    head_axis: str | None = None  # the mesh axis splitting query heads while KV heads are replicated over it


def _size(mesh, entry) -> int:
    if entry is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))


def splash_plan(q_shape, k_shape) -> SplashPlan | None:
    """The SplashPlan for q [B, T, N, H], k [B, T, K, H] under the current mesh and logical axis rules
    (sharding.activate), or None when splash cannot take them: no tile divides T, or the batch or the heads
    do not split evenly over their mesh axes."""
    b, t, n, _ = q_shape
    kh = k_shape[2]
    block = next((c for c in SPLASH_BLOCKS if t % c == 0), None)
    if block is None:
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return SplashPlan(block, None)
    # The specs the model's logical constraints give these arrays (sharding.activate's rules).
    q_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
    kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))
    seg_spec = nn.logical_to_mesh_axes(("batch", "length"))
    if q_spec[1] is not None or kv_spec[1] is not None:
        return None  # the kernel needs whole sequences
    nq, nk = _size(mesh, q_spec[2]), _size(mesh, kv_spec[2])
    if b % _size(mesh, q_spec[0]) or n % nq or kh % nk or q_spec[0] != kv_spec[0] or q_spec[0] != seg_spec[0]:
        return None
    head_axis = None
    if nk != nq:
        # KV heads replicated over the axis that splits query heads: each device's query heads must then share
        # one KV head, which it picks by its index on that axis.
        if nk != 1 or not isinstance(q_spec[2], str) or (n // kh) % (n // nq):
            return None
        head_axis = q_spec[2]
    return SplashPlan(block, mesh, q_spec, kv_spec, seg_spec, head_axis)


def _splash_kernel(t: int, groups: int, window: int | None, block: int, interpret: bool):
    """One multi-query kernel for `groups` query heads sharing one KV head, over sequences of t tokens."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    # W keys including its own: (W - 1) to the left, none to the right, which is also the causal mask.
    m = sm.CausalMask((t, t)) if window is None else sm.LocalMask((t, t), (window - 1, 0), offset=0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # Made in the caller's trace: its mask tables become that program's constants (splash caches the numpy
    # work of making them).
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([m] * groups), block_sizes=sizes, interpret=interpret)


def _splash_local(kernel, q, k, v, segment_ids, head_axis: str | None, groups: int):
    """Splash on one device's shard: q [b, T, n, H], k/v [b, T, k, H] -> [b, T, n, H]. GQA as one multi-query
    kernel per KV head (`groups` = N/K query heads each); segment ids for padding and packing."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q.shape
    if head_axis is not None:  # all KV heads here: keep the one this device's query heads use
        first = jax.lax.axis_index(head_axis) * n // groups
        k = jax.lax.dynamic_slice_in_dim(k, first, 1, axis=2)
        v = jax.lax.dynamic_slice_in_dim(v, first, 1, axis=2)
    kh = k.shape[2]
    # The same scaling as dot_attention, in q's dtype.
    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
    qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [b, k, G, T, H]
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, k, T, H]
    seg = sk.SegmentIds(q=segment_ids, kv=segment_ids)
    per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_group, in_axes=(0, 0, 0, 0))(qg, kg, vg, seg)  # [b, k, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def splash_self_attention(q, k, v, segment_ids, window: int | None, plan: SplashPlan):
    """Pallas splash attention (TPU; any backend with SPLASH_INTERPRET), called under shard_map over the mesh
    axes that split the batch and the heads, since Mosaic kernels cannot be partitioned automatically.

    Its masks are aligned on array indices, so, as for fused_self_attention, positions must rise by one along
    each segment (right-padded or packed rows). Padding queries (segment 0) attend each other; their outputs
    differ from the blockwise path's but reach no real token."""
    b, t, n, _ = q.shape
    groups = n // k.shape[2]
    local_heads = n // _size(plan.mesh, plan.q_spec[2]) if plan.mesh is not None else n
    # The kernel (its mask tables) is made out here and passed in as a replicated argument, as shard_map
    # wants the arrays its body uses.
    kernel = _splash_kernel(t, min(groups, local_heads), window, plan.block, SPLASH_INTERPRET)
    local = functools.partial(_splash_local, head_axis=plan.head_axis, groups=groups)
    if plan.mesh is None:
        return local(kernel, q, k, v, segment_ids)
    return jax.shard_map(
        local,
        mesh=plan.mesh,
        in_specs=(P(), plan.q_spec, plan.kv_spec, plan.kv_spec, plan.seg_spec),
        out_specs=plan.q_spec,
        check_vma=False,
    )(kernel, q, k, v, segment_ids)
