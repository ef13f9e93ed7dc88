"""The Mistral transformer as a functional Flax (Linen) module.

Names mirror the Mistral checkpoint (tok_embeddings, attention.wq, feed_forward.w1, attention_norm, ...), so
checkpoint.py reads as a table of name pairs. Params are a plain nested dict (layers stacked on a leading
axis by `nn.scan`, so a 32-layer model compiles one layer):

  tok_embeddings.embedding [V, D]        layers.attention.wq [L, D, N, H]   layers.attention.wo [L, N, H, D]
  layers.attention.wk/wv   [L, D, K, H]  layers.feed_forward.w1/w3 [L, D, F]  layers.feed_forward.w2 [L, F, D]
  layers.attention_norm.scale, layers.ffn_norm.scale [L, D]   norm.scale [D]   output.kernel [D, V] (untied)

Axis letters are explained in attention.py. Every param carries logical axis names (sharding.py maps them
to mesh axes); activations are constrained by logical names at block boundaries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .attention import (decode_attention, dot_attention_split, fused_self_attention, make_mask, self_attention,
                        splash_self_attention)
from .checkpoint import WEIGHT_INPUTS as _WEIGHT_INPUTS
from .checkpoint import aligned_copy, aligned_empty, leaf_shapes, out_major_perm
from .config import MistralConfig
from .rope import apply_rope, rope_tables

Params = dict[str, Any]

_init = nn.initializers.normal(stddev=0.02)

# LoRA targets by the transformers names that PEFT uses, mapped to our param names.
LORA_TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w1", "up": "w3", "down": "w2"}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters on the chosen projections: W x + (alpha / rank) * B(A(dropout(x))).

    A [in..., r] starts random, B [r, out...] starts at zero, so step 0 equals the base model."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose among {list(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def covers(self, name: str) -> bool:
        return any(LORA_TARGETS[t] == name for t in self.targets)


# Rows of a product below which, with out-major weights, the weight is the left operand (see _matmul).
_FEW_ROWS = 64


def _in_out_shapes(w, n_in: int, out_major: bool):
    """(input axes, output axes) of a projection weight held [in..., out...] or, out-major, [out..., in...]."""
    if out_major:
        return w.shape[w.ndim - n_in:], w.shape[:w.ndim - n_in]
    return w.shape[:n_in], w.shape[n_in:]


def _matmul(x, w, n_in: int, out_major: bool):
    """x [..., in...] times a weight [in..., out...], or [out..., in...] when `out_major`, -> [..., out...].

    Out-major weights on XLA:CPU: for a few rows (decode), the product is computed as w @ x^T, the weight as the
    left operand with its input axis minor, then transposed back (a few rows, cheap); an optimization barrier
    keeps XLA from folding the transpose into the product (it would swap the operands back, losing the gain).
    Many rows (prefill) take x @ w^T directly."""
    in_shape, out_shape = _in_out_shapes(w, n_in, out_major)
    k_in, k_out = math.prod(in_shape), math.prod(out_shape)
    if not out_major:
        lead = x.shape[:x.ndim - n_in]
        return jnp.dot(x.reshape(*lead, k_in), w.reshape(k_in, k_out)).reshape(*lead, *out_shape)
    x2 = x.reshape(-1, k_in)
    if x2.shape[0] <= _FEW_ROWS:
        w2 = w.reshape(k_out, k_in)
        y = jax.lax.optimization_barrier(jax.lax.dot_general(w2, x2, (((1,), (1,)), ((), ())))).T
    else:
        y = jax.lax.dot_general(x2, w.reshape(k_out, k_in), (((1,), (1,)), ((), ())))
    return y.reshape(*x.shape[:x.ndim - n_in], *out_shape)


def _project(module: nn.Module, name: str, x, w, eq: str, n_in: int, in_axes, out_axes):
    """einsum(eq, x, w) plus, when the module's LoRA spec covers `name`, the adapter branch.

    w's first `n_in` axes contract with x's last `n_in` (its last `n_in` with out-major weights, see
    _weight); adapters live in the 'lora' collection as `{name}_a` [in..., r] and `{name}_b` [r, out...]
    (layers stacked like the params)."""
    dt = jnp.dtype(module.config.dtype)
    out_major = module.config.out_major_weights
    if out_major or n_in > 1:
        # Out-major weights (see _matmul), or several contracting axes (wo: heads x head_dim) as one flattened
        # matmul: left as an einsum, XLA:CPU chose to transpose the whole weight at every call to match the
        # attention output's layout.
        y = _matmul(x, w.astype(dt), n_in, out_major)
    else:
        y = jnp.einsum(eq, x, w.astype(dt))
    spec = module.lora
    if spec is None or not spec.covers(name):
        return y
    in_shape, out_shape = _in_out_shapes(w, n_in, out_major)
    kaiming = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)),
                                               out_axis=-1)
    a = module.variable("lora", f"{name}_a", nn.with_logical_partitioning(kaiming, (*in_axes, None)),
                        module.make_rng("params") if module.is_initializing() else None,
                        (*in_shape, spec.rank), jnp.float32).value
    b = module.variable("lora", f"{name}_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, *out_axes)),
                        None, (spec.rank, *out_shape), jnp.float32).value
    if spec.dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
    h = jnp.tensordot(x, a.astype(dt), axes=n_in)
    return y + jnp.tensordot(h, b.astype(dt), axes=1) * jnp.asarray(spec.scale, dt)


# Logical axis names of every param, by its name, in the declared layout ([in..., out...] for a projection): the
# modules declare their params with them, and param_logical_axes / param_shapes build the param tree from them and
# checkpoint.leaf_shapes without tracing the model (a tool's start-up spent a third of a second on that trace).
_AXES = {
    "embedding": ("vocab", "embed"), "scale": ("embed",), "kernel": ("embed", "vocab"),
    "wq": ("embed", "heads", "head_dim"), "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"), "wo": ("heads", "head_dim", "embed"),
    "w1": ("embed", "mlp"), "w3": ("embed", "mlp"), "w2": ("mlp", "embed"),
}


# The fused CPU inference weights (config.fused_projections): name -> shape, and what each holds, in order.
_FUSED = {
    "wqkv": lambda c: ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim),
    "w13": lambda c: (2 * c.hidden_dim, c.dim),
}
_FUSED_PARTS = {"wqkv": ("attention", ("wq", "wk", "wv")), "w13": ("feed_forward", ("w1", "w3"))}
_AXES.update(wqkv=(None, "embed"), w13=(None, "embed"))


def _no_lora(module: nn.Module) -> None:
    if module.lora is not None:
        raise ValueError("LoRA adapters need the unfused projections (config.fused_projections=False)")


def _param(module: nn.Module, name: str, shape, init=_init, axes=None):
    cfg = module.config
    return module.param(name, nn.with_logical_partitioning(init, axes or _AXES[name]), shape,
                        jnp.dtype(cfg.param_dtype))


def _held(name: str, shape, out_major: bool) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(shape, logical axes) of param `name` declared with `shape`, as held: a projection weight [out..., in...]
    when `out_major`, anything else as declared."""
    axes = _AXES[name]
    perm = out_major_perm(name, len(shape)) if out_major else None
    if perm is not None:
        shape, axes = tuple(shape[i] for i in perm), tuple(axes[i] for i in perm)
    return tuple(shape), axes


def _weight(module: nn.Module, name: str, shape):
    """A projection weight declared [in..., out...], held [out..., in...] when config.out_major_weights."""
    shape, axes = _held(name, shape, module.config.out_major_weights)
    return _param(module, name, shape, axes=axes)


class RMSNorm(nn.Module):
    config: MistralConfig

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), nn.initializers.ones)
        # Statistics in float32 whatever the compute dtype; the scale is applied in the compute dtype, as in
        # the reference implementations.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)


class Attention(nn.Module):
    config: MistralConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x, positions, rope, segment_ids, cache=None, layer=None, cache_slots=None):
        """x [B, T, D] -> ([B, T, D], cache). `rope`: rope.rope_tables of `positions`. With `cache` ({'k','v'}:
        [L, B, K, S, H], all layers, updated in place at index `layer`; or this layer's [B, K, S, H] when `layer`
        is None) and `cache_slots` (see _cached_attention), the queries attend (cache, new tokens) and the new
        keys are written at slot `position % S`."""
        c = self.config
        d, n, k, h = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
        if c.fused_projections:  # one product, split into q, k, v (see fuse_projections)
            _no_lora(self)
            y = _matmul(x, _param(self, "wqkv", _FUSED["wqkv"](c)).astype(c.dtype), 1, True)
            q, kk, vv = jnp.split(y, [n * h, (n + k) * h], axis=-1)
            q, kk, vv = q.reshape(*x.shape[:2], n, h), kk.reshape(*x.shape[:2], k, h), vv.reshape(*x.shape[:2], k, h)
        else:
            q = _project(self, "wq", x, _weight(self, "wq", (d, n, h)), "btd,dnh->btnh", 1, ("embed",),
                         ("heads", "head_dim"))
            kk = _project(self, "wk", x, _weight(self, "wk", (d, k, h)), "btd,dkh->btkh", 1, ("embed",),
                          ("kv_heads", "head_dim"))
            vv = _project(self, "wv", x, _weight(self, "wv", (d, k, h)), "btd,dkh->btkh", 1, ("embed",),
                          ("kv_heads", "head_dim"))
        wo = _weight(self, "wo", (n, h, d))
        q = apply_rope(q, rope)
        kk = apply_rope(kk, rope)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        kk = nn.with_logical_constraint(kk, ("batch", "length", "kv_heads", "head_dim"))
        vv = nn.with_logical_constraint(vv, ("batch", "length", "kv_heads", "head_dim"))

        if cache is None or cache_slots[1] is None:
            # No cache, or an empty one (cache_slots[1] None: a prefill's first chunk), which the chunk fills
            # after attending itself alone.
            if c.attention_impl == "cudnn":
                out = fused_self_attention(q, kk, vv, positions, segment_ids, c.sliding_window, "cudnn")
            elif c.attention_impl == "splash":
                out = splash_self_attention(q, kk, vv, positions, segment_ids, c.sliding_window)
            else:
                out = self_attention(q, kk, vv, positions, segment_ids, c.sliding_window, c.attention_block)
            new_cache = None if cache is None else _cache_write(kk, vv, cache, layer, cache_slots[0])
        else:
            out, new_cache = _cached_attention(q, kk, vv, positions, segment_ids, cache, layer, cache_slots,
                                               c.sliding_window)
        out = _project(self, "wo", out, wo, "btnh,nhd->btd", 2, ("heads", "head_dim"), ("embed",))
        return out, new_cache


def cache_write_slots(positions, segment_ids, num_slots: int):
    """Slot of each new token in a rolling cache of `num_slots` slots: `position % num_slots`.

    Padding tokens, and tokens that a later token of the same chunk evicts (a chunk longer than the
    buffer), get slot `num_slots`, which scatters drop. Returns int32 [B, T].
    """
    valid = segment_ids != 0
    last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
    keep = valid & (positions > last - num_slots)
    return jnp.where(keep, positions % num_slots, num_slots).astype(jnp.int32)


def _cache_write(k, v, cache, layer, slots):
    """k, v [B, T, K, H] written at `slots` [B, T] (cache_write_slots) of this layer's cache."""
    rows = jnp.arange(k.shape[0])[:, None]
    if layer is None and k.shape[:2] == (1, 1):
        # One token of one row (decode at batch 1) in a per-layer buffer: the same update is written twice. XLA
        # turns a scatter of a single index into a dynamic-update-slice, which XLA:CPU then fused once into the
        # attention's read of the cache and once into the cache carried to the next step, copying every layer's
        # cache four times per step (batch-1 decode went from 59% to 75% of the bandwidth ceiling without them,
        # bench/generate_bench.py). Two identical indices keep the scatter, which updates the buffer in place,
        # as at larger batches.
        rows, slots = jnp.zeros((2, 1), rows.dtype), jnp.concatenate([slots, slots])
        k, v = jnp.concatenate([k, k]), jnp.concatenate([v, v])
    # Index arrays around a slice: the update is laid out [B, T, K, H], as k and v are.
    at = (rows, slice(None), slots) if layer is None else (layer, rows, slice(None), slots)
    return {"k": cache["k"].at[at].set(k.astype(cache["k"].dtype), mode="drop"),
            "v": cache["v"].at[at].set(v.astype(cache["v"].dtype), mode="drop")}


def _cached_attention(q, k, v, positions, segment_ids, cache, layer, cache_slots, window):
    """cache_slots = (slots [B, T] where the new tokens go (cache_write_slots), absolute position held by each
    slot [B, S] before and after the write, -1 when empty): the same for every layer, so Transformer works
    them out once."""
    slots, cache_pos, pos_after = cache_slots
    b, t = segment_ids.shape
    valid_new = (segment_ids != 0).astype(jnp.int32)

    def write(c):
        return _cache_write(k, v, c, layer, slots)

    def layer_kv(c):
        if layer is None:  # this layer's own buffers [B, K, S, H] (unrolled layers)
            return c["k"].astype(q.dtype), c["v"].astype(q.dtype)
        # all layers stacked [L, B, K, S, H] (scanned layers)
        return (jax.lax.dynamic_index_in_dim(c["k"], layer, 0, keepdims=False).astype(q.dtype),
                jax.lax.dynamic_index_in_dim(c["v"], layer, 0, keepdims=False).astype(q.dtype))

    if t == 1:
        # Decode: write the new token first, then attend over the cache alone. Exact: the slot it takes held
        # position p - S, outside the window of the query at p. The reads then depend on the write, so XLA
        # scatters in place; reading first made it copy the whole cache of every layer at every step.
        new_cache = write(cache)
        ck, cv = layer_kv(new_cache)
        mask = make_mask(positions, pos_after, valid_new, (pos_after >= 0).astype(jnp.int32), window)
        return decode_attention(q, ck, cv, mask), new_cache

    # A chunk attends (cache, chunk) before it is written: its positions must see the W-1 positions before
    # them, some of which the chunk itself overwrites in a rolling buffer. The two key sets are scored
    # separately and share one softmax, so the cache is never copied into a concatenation.
    ck, cv = layer_kv(cache)
    mask_cache = make_mask(positions, cache_pos, valid_new, (cache_pos >= 0).astype(jnp.int32), window)
    mask_new = make_mask(positions, positions, valid_new, valid_new, window)
    # The chunk's keys join the cache's [B, K, S, H] order (a transpose of T tokens, not of the cache).
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    out = dot_attention_split(q, (ck, kt), (cv, vt), (mask_cache, mask_new))
    return out, write(cache)


class FeedForward(nn.Module):
    config: MistralConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        if c.fused_projections:  # one product, split into gate and up (see fuse_projections)
            _no_lora(self)
            gate, up = jnp.split(_matmul(x, _param(self, "w13", _FUSED["w13"](c)).astype(c.dtype), 1, True), 2, axis=-1)
        else:
            gate = _project(self, "w1", x, _weight(self, "w1", (c.dim, c.hidden_dim)), "btd,df->btf", 1, ("embed",),
                            ("mlp",))
            up = _project(self, "w3", x, _weight(self, "w3", (c.dim, c.hidden_dim)), "btd,df->btf", 1, ("embed",),
                          ("mlp",))
        w2 = _weight(self, "w2", (c.hidden_dim, c.dim))
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _project(self, "w2", hidden, w2, "btf,fd->btd", 1, ("mlp",), ("embed",))


class Block(nn.Module):
    """One layer; `nn.scan` stacks these. The carry is (x, cache): the cache of all layers rides along and is
    updated in place at index `layer`, so a decode step never copies it."""

    config: MistralConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, carry, layer, positions, rope, segment_ids, cache_slots):
        x, cache = carry
        attn, cache = Attention(self.config, self.lora, name="attention")(
            RMSNorm(self.config, name="attention_norm")(x), positions, rope, segment_ids, cache, layer, cache_slots)
        h = x + attn
        out = h + FeedForward(self.config, self.lora, name="feed_forward")(RMSNorm(self.config, name="ffn_norm")(h))
        out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
        return (out, cache), None


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@functools.lru_cache(maxsize=None)
def _unrolled_layer(config: MistralConfig):
    """One layer as a jitted function of its params: called once per layer inside a program, it is traced once
    (JAX keeps the trace per argument shapes) and XLA inlines the calls, so the compiled program is the same as
    with L traced copies, whose tracing and lowering made up a large part of the decode program's compile time."""
    def layer(params, x, kv, positions, rope, segment_ids, cache_slots):
        (x, kv), _ = Block(config).apply({"params": params}, (x, kv), None, positions, rope, segment_ids,
                                         cache_slots)
        return x, kv
    return jax.jit(layer)


class Transformer(nn.Module):
    config: MistralConfig
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, logits_at=None, cache_empty=False):
        """tokens [B, T] int -> logits [B, T, V] float32.

        positions [B, T]: absolute positions (default 0..T-1); segment_ids [B, T]: 0 for padding, and
        distinct ids for examples packed in one row (default all 1). With `cache` (see kv_cache.py) returns
        (logits, new_cache) and attends the cached keys too. `logits_at` [B] int: compute the head only at
        that index of each row (logits [B, 1, V]); prefill needs one position, not a [B, T, V] tensor.
        `cache_empty` (static): the cache holds nothing yet (a prefill's first chunk), so it is written, not read.
        """
        c = self.config
        dt = jnp.dtype(c.dtype)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)

        embedding = _param(self, "embedding", (c.vocab_size, c.dim))  # in tok_embeddings
        x = jnp.take(embedding, tokens, axis=0).astype(dt)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        rope = rope_tables(positions, c.head_dim, c.rope_theta)  # once for all layers
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
        kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        cache_slots = None
        if cache is not None:  # where this call's tokens go, and what the slots hold before and after
            slots = cache_write_slots(positions, segment_ids, cache["pos"].shape[1])
            new_pos = cache["pos"].at[jnp.arange(b)[:, None], slots].set(
                positions.astype(cache["pos"].dtype), mode="drop")
            # None for an empty cache: the tokens attend each other only (Attention).
            cache_slots = (slots, None if cache_empty else cache["pos"], new_pos)
        if c.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.lora, name="layers")
            (x, new_kv), _ = layers((x, kv), jnp.arange(c.n_layers), positions, rope, segment_ids, cache_slots)
        else:
            # Applying per-layer params: one traced program for all layers (_unrolled_layer) when nothing but the
            # params is bound (no LoRA, no remat, not initializing); the model traced L copies of the layer before.
            shared = self.lora is None and c.remat == "none" and not self.is_initializing()
            new_layers = []
            for i in range(c.n_layers):
                layer_kv = None if kv is None else {"k": kv["k"][i], "v": kv["v"][i]}
                if shared:
                    x, layer_kv = _unrolled_layer(c)(self.variables["params"][f"layers_{i}"], x, layer_kv, positions,
                                                     rope, segment_ids, cache_slots)
                else:
                    (x, layer_kv), _ = block(c, self.lora, name=f"layers_{i}")(
                        (x, layer_kv), None, positions, rope, segment_ids, cache_slots)
                new_layers.append(layer_kv)
            new_kv = None if kv is None else {"k": tuple(l["k"] for l in new_layers),
                                              "v": tuple(l["v"] for l in new_layers)}

        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
        x = RMSNorm(c, name="norm")(x)
        if c.tie_embeddings:  # the embedding [V, D] is an out-major head
            logits = _matmul(x, embedding.astype(dt), 1, out_major=True) if c.out_major_weights else \
                jnp.einsum("btd,vd->btv", x, embedding.astype(dt))
        else:
            kernel = _weight(self, "kernel", (c.dim, c.vocab_size))  # in output
            logits = _matmul(x, kernel.astype(dt), 1, True) if c.out_major_weights else \
                jnp.einsum("btd,dv->btv", x, kernel.astype(dt))
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, {"k": new_kv["k"], "v": new_kv["v"], "pos": cache_slots[2]}


# The embedding and head params are declared on the top module (to share the embedding when tied); these
# two renames give them the checkpoint's names in the params dict.
_TOP_RENAMES = {"embedding": ("tok_embeddings", "embedding"), "kernel": ("output", "kernel")}


def _to_public(tree):
    if "layers_0" in tree:
        n = sum(1 for k in tree if k.startswith("layers_"))
        tree = {k: v for k, v in tree.items() if not k.startswith("layers_")} | {
            "layers": tuple(tree[f"layers_{i}"] for i in range(n))}
    out = {k: v for k, v in tree.items() if k not in _TOP_RENAMES}
    for k, (mod, leaf) in _TOP_RENAMES.items():
        if k in tree:
            out[mod] = {leaf: tree[k]}
    return out


def _to_flax(params):
    out = {k: v for k, v in params.items() if k not in ("tok_embeddings", "output")}
    if isinstance(params.get("layers"), (list, tuple)):  # unstacked (scan_layers=False)
        del out["layers"]
        out.update({f"layers_{i}": layer for i, layer in enumerate(params["layers"])})
    out["embedding"] = params["tok_embeddings"]["embedding"]
    if "output" in params:
        out["kernel"] = params["output"]["kernel"]
    return out


def init_params(config: MistralConfig, rng) -> Params:
    """Random params (std 0.02, norms at 1) as a plain nested dict."""
    boxed = Transformer(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return _to_public(nn.unbox(boxed))


def _param_tree(config: MistralConfig, leaf: Callable[[tuple[int, ...], tuple[str, ...]], Any]) -> Params:
    """The param tree of `config` (stacked or per-layer, in- or out-major) with leaf(shape, axes) at each leaf,
    built from checkpoint.leaf_shapes and _AXES: the tree Transformer.init gives (tests/test_sharding.py)."""
    c = config
    top: Params = {}
    layer: Params = {}  # group -> name -> (shape, axes) of one layer
    for path, shape in leaf_shapes(c).items():
        *groups, name = path.split("/")
        if groups[0] == "layers":
            layer.setdefault(groups[1], {})[name] = _held(name, shape[1:], c.out_major_weights)
        else:
            top.setdefault(groups[0], {})[name] = leaf(*_held(name, shape, c.out_major_weights))
    if c.fused_projections:
        for fused, (group, parts) in _FUSED_PARTS.items():
            layer[group] = {fused: (_FUSED[fused](c), _AXES[fused]),
                            **{k: v for k, v in layer[group].items() if k not in parts}}
    if c.scan_layers:
        top["layers"] = {g: {k: leaf((c.n_layers, *s), ("layers", *a)) for k, (s, a) in mods.items()}
                         for g, mods in layer.items()}
    else:
        top["layers"] = tuple({g: {k: leaf(s, a) for k, (s, a) in mods.items()} for g, mods in layer.items()}
                              for _ in range(c.n_layers))
    return top


def param_shapes(config: MistralConfig) -> Params:
    """The param tree as jax.ShapeDtypeStruct leaves (no memory)."""
    dtype = jnp.dtype(config.param_dtype)
    return _param_tree(config, lambda shape, _: jax.ShapeDtypeStruct(shape, dtype))


def param_logical_axes(config: MistralConfig) -> Params:
    """The param tree with a tuple of logical axis names at each leaf, e.g. ('layers', 'embed', 'heads', 'head_dim')."""
    return _param_tree(config, lambda _, axes: axes)


def apply(params: Params, config: MistralConfig, tokens, positions=None, segment_ids=None, cache=None,
          logits_at=None, lora: Params | None = None, lora_spec: LoraSpec | None = None, dropout_rng=None,
          cache_empty: bool = False):
    """Functional forward: see Transformer.__call__. Pure, so jit and grad apply directly.

    `lora` (from init_lora) with its `lora_spec` adds the adapters; `dropout_rng` turns on LoRA dropout."""
    unstacked = isinstance(params.get("layers"), (list, tuple))
    if unstacked == config.scan_layers:
        raise ValueError(f"apply: params have {'per-layer' if unstacked else 'stacked'} layers but config.scan_layers "
                         f"is {config.scan_layers}; see unstack_params")
    attention = (params["layers"][0] if unstacked else params["layers"])["attention"]
    if ("wqkv" in attention) != config.fused_projections:
        raise ValueError(f"apply: params hold {'one fused wqkv' if 'wqkv' in attention else 'separate wq, wk, wv'} "
                         f"but config.fused_projections is {config.fused_projections}; see fuse_projections")
    wq = attention.get("wq", attention.get("wqkv"))
    in_major, out_major = wq.shape[-2:] == (config.n_heads, config.head_dim), wq.shape[-1] == config.dim
    if in_major != out_major and out_major != config.out_major_weights:  # (both when head_dim == dim: unknowable)
        raise ValueError(f"apply: params hold their projection weights {'[out, in]' if out_major else '[in, out]'} "
                         f"(layers.attention.wq {tuple(wq.shape)}) but config.out_major_weights is "
                         f"{config.out_major_weights}; see out_major_weights")
    variables = {"params": _to_flax(params)}
    if lora is not None:
        if lora_spec is None:
            raise ValueError("apply: lora params given without their lora_spec")
        variables["lora"] = lora
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return Transformer(config, lora_spec if lora is not None else None).apply(
        variables, tokens, positions, segment_ids, cache, logits_at, cache_empty, rngs=rngs)


def on_one_cpu_device(sharding) -> bool:
    """Whether `sharding` puts its array whole on one CPU device (where out-major weights pay, see _matmul)."""
    return len(sharding.device_set) == 1 and next(iter(sharding.device_set)).platform == "cpu"


def _one_cpu_device(x) -> bool:
    return isinstance(x, jax.Array) and on_one_cpu_device(x.sharding)


def moved_sharding(sh, perm=None, drop_lead: bool = False):
    """The sharding of an array moved as unstack_params (`drop_lead`: one layer of a stacked leaf) or
    out_major_weights (`perm`) move it: a NamedSharding keeps its mesh with the spec dropped or permuted the
    same way; any other sharding (one device) is kept."""
    if not isinstance(sh, jax.sharding.NamedSharding):
        return sh
    spec = tuple(sh.spec)
    if drop_lead:
        spec = spec[1:]
    if perm is not None:
        spec = spec + (None,) * (len(perm) - len(spec))
        spec = tuple(spec[i] for i in perm)
    return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*spec))


def unstack_params(params: Params, config: MistralConfig) -> tuple[Params, MistralConfig]:
    """Stacked layers [L, ...] -> a tuple of L per-layer trees, and the config with scan_layers=False.

    Leaf by leaf, deleting each stacked array once split, so memory peaks near one copy plus one leaf."""
    if isinstance(params["layers"], (list, tuple)):
        return params, config.replace(scan_layers=False)
    leaves, treedef = jax.tree.flatten(params["layers"])
    per_layer = [[] for _ in range(config.n_layers)]
    for leaf in leaves:
        if _one_cpu_device(leaf):
            # Sliced on the host: indexing the jax.Array would compile and run one program per leaf shape.
            host = np.asarray(leaf)
            sh = moved_sharding(leaf.sharding, drop_lead=True)
            slices = [jax.device_put(aligned_copy(host[i]), sh) for i in range(config.n_layers)]
            del host
        else:
            slices = [leaf[i] for i in range(config.n_layers)]
        for i in range(config.n_layers):
            per_layer[i].append(slices[i])
        if isinstance(leaf, jax.Array):
            leaf.delete()
    layers = tuple(jax.tree.unflatten(treedef, xs) for xs in per_layer)
    return {**params, "layers": layers}, config.replace(scan_layers=False)


def out_major_weights(params: Params, config: MistralConfig) -> tuple[Params, MistralConfig]:
    """Projection weights [in..., out...] -> [out..., in...] (see _weight), and the config with
    out_major_weights=True. Stacked or per-layer params; leaf by leaf, each old array deleted once moved."""
    if config.out_major_weights:
        return params, config

    def move(w, name, stacked):
        perm = out_major_perm(name, w.ndim, 1 if stacked else 0)
        if _one_cpu_device(w):  # on the host: a transposed copy, no compiled program per shape
            out = jax.device_put(aligned_copy(np.transpose(np.asarray(w), perm)),
                                 moved_sharding(w.sharding, perm))
        else:
            out = jnp.transpose(w, perm)
        if isinstance(w, jax.Array):
            w.delete()
        return out

    def layer(tree, stacked):
        return {group: {k: move(v, k, stacked) if k in _WEIGHT_INPUTS else v for k, v in mods.items()}
                for group, mods in tree.items()}

    out = dict(params)
    if isinstance(params["layers"], (list, tuple)):
        out["layers"] = tuple(layer(t, False) for t in params["layers"])
    else:
        out["layers"] = layer(params["layers"], True)
    if "output" in params:
        out["output"] = {"kernel": move(params["output"]["kernel"], "kernel", False)}
    return out, config.replace(out_major_weights=True)


def fuse_projections(params: Params, config: MistralConfig) -> tuple[Params, MistralConfig]:
    """Per-layer, out-major params -> wq, wk, wv as one wqkv [(N + 2K) * H, D] and w1, w3 as one w13 [2F, D]
    (their rows one after the other), and the config with fused_projections=True. Layer by layer; on one CPU
    device the weights are joined on the host, into a buffer jax.device_put takes as it is."""
    if config.fused_projections:
        return params, config
    if not isinstance(params["layers"], (list, tuple)) or not config.out_major_weights:
        raise ValueError("fuse_projections: needs per-layer, out-major params (unstack_params, out_major_weights)")

    def join(ws):
        if all(_one_cpu_device(w) for w in ws):  # numpy views of the device buffers: no program per reshape
            rows = [np.asarray(w).reshape(-1, config.dim) for w in ws]
            out = aligned_empty((sum(r.shape[0] for r in rows), config.dim), rows[0].dtype)
            np.concatenate(rows, out=out)
            sh = ws[0].sharding  # one device: a mesh's sharding of it keeps the mesh, replicated
            if isinstance(sh, jax.sharding.NamedSharding):
                sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
            out = jax.device_put(out, sh)
        else:
            out = jnp.concatenate([w.reshape(-1, config.dim) for w in ws])
        for w in ws:
            if isinstance(w, jax.Array):
                w.delete()
        return out

    layers = []
    for layer in params["layers"]:
        layer = {g: dict(mods) for g, mods in layer.items()}
        for fused, (group, parts) in _FUSED_PARTS.items():
            layer[group] = {fused: join([layer[group].pop(k) for k in parts]), **layer[group]}
        layers.append(layer)
    return {**params, "layers": tuple(layers)}, config.replace(fused_projections=True)


def init_lora(config: MistralConfig, spec: LoraSpec, rng) -> Params:
    """LoRA adapters {'layers': {'attention': {'wq_a': [L, D, r], 'wq_b': [L, r, N, H], ...}, ...}}, f32.

    Only the adapters are computed (the base params' initialisers are dead code that jit removes)."""
    model = Transformer(config, spec)
    fn = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 1), jnp.int32))["lora"]))
    return fn(rng)


def lora_logical_axes(config: MistralConfig, spec: LoraSpec) -> Params:
    model = Transformer(config, spec)
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["lora"], jax.random.key(0))
    return jax.tree.map(lambda p: tuple(p.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def merge_lora(params: Params, lora: Params, spec: LoraSpec) -> Params:
    """Folds the adapters into the base weights: W + scale * A @ B, in the base weights' dtype."""
    out = jax.tree.map(lambda x: x, params)
    for group, mods in lora["layers"].items():
        for key in mods:
            if not key.endswith("_a"):
                continue
            name = key[:-2]
            a, b = mods[name + "_a"], mods[name + "_b"]
            w = params["layers"][group][name]
            n_in = a.ndim - 2  # a is [L, in..., r]
            delta = jnp.einsum(a, [0, *range(1, n_in + 1), 99], b, [0, 99, *range(n_in + 1, w.ndim)],
                               [0, *range(1, w.ndim)])
            out["layers"][group][name] = (w.astype(jnp.float32) + spec.scale * delta).astype(w.dtype)
    return out


@functools.partial(jax.jit, static_argnums=(1,))
def forward(params: Params, config: MistralConfig, tokens, positions=None, segment_ids=None):
    """Jitted logits [B, T, V] float32 (no cache)."""
    return apply(params, config, tokens, positions, segment_ids)
