"""The KV cache: a rolling buffer of keys and values per layer, and attention over it.

For a windowed model the cache holds S = min(W, longest sequence) slots per layer: position p lives at slot
p % S, so memory never grows past W however long the generation. Keys are rotated before they are cached, so
the order of slots does not matter, only which positions they hold: `pos` records the absolute position in
each slot (-1 for an empty one) and masks are built from it. Worked example, W = S = 4, a prompt of 6 tokens:
positions 0..5 go to slots 0,1,2,3,0,1, so after the write the slots hold [4, 5, 2, 3]; the query at 5 sees
2..5, exactly its window. Two rules keep that exact:
  - a prefill chunk attends (cache, chunk) *before* it is written: its early positions need keys that its
    late positions overwrite;
  - a decode token is written *first* and then attends the cache alone: the slot it takes held position
    p - S, outside its window. The reads then depend on the write, so the update is in place.

KV heads come before slots ([B, K, S, H], transformers' order): both attention products read the cache as it
lies, with (batch, kv head) as the batch of a batched matmul.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from .attention import cache_attention, make_mask
from .config import MistralConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H] rotated keys
    v: jax.Array  # [L, B, K, S, H] values
    pos: jax.Array  # [B, S] int32: absolute position held by each slot, -1 when empty

    @classmethod
    def init(cls, config: MistralConfig, batch: int, slots: int, dtype="float32") -> KVCache:
        shape = (config.n_layers, batch, config.n_kv_heads, slots, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32))

    @classmethod
    def shapes(cls, config: MistralConfig, batch: int, slots: int, dtype="float32") -> KVCache:
        """The cache as jax.ShapeDtypeStruct leaves (no memory)."""
        return jax.eval_shape(lambda: cls.init(config, batch, slots, dtype))

    @property
    def num_slots(self) -> int:
        return self.pos.shape[1]

    def check(self, config: MistralConfig) -> None:
        _, b, _, s, _ = self.k.shape
        chex.assert_shape([self.k, self.v], (config.n_layers, b, config.n_kv_heads, s, config.head_dim))
        chex.assert_shape(self.pos, (b, s))

    def plan(self, positions, segment_ids, empty: bool = False) -> CacheUpdate:
        """Where a call's tokens go and what the slots hold before and after: the same for every layer."""
        slots = write_slots(positions, segment_ids, self.num_slots)
        rows = jnp.arange(positions.shape[0])[:, None]
        after = self.pos.at[rows, slots].set(positions.astype(jnp.int32), mode="drop")
        return CacheUpdate(slots, None if empty else self.pos, after)


@struct.dataclass
class CacheUpdate:
    slots: jax.Array  # [B, T] slot of each new token; S (dropped) for padding and evicted tokens
    before: jax.Array | None  # [B, S] positions held before the write; None: the cache is empty
    after: jax.Array  # [B, S] positions held after it


def num_slots(config: MistralConfig, max_total_len: int) -> int:
    """Slots per layer for sequences of up to max_total_len tokens."""
    if config.sliding_window is None:
        return max_total_len
    return min(config.sliding_window, max_total_len)


def cache_bytes(config: MistralConfig, batch: int, slots: int, dtype="float32") -> int:
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * config.n_layers * batch * slots * config.n_kv_heads * config.head_dim * itemsize + batch * slots * 4


def write_slots(positions, segment_ids, num_slots: int):
    """Slot of each new token: `position % num_slots`. Padding tokens, and tokens that a later token of the
    same chunk evicts (a chunk longer than the buffer), get slot `num_slots`, which the write drops."""
    valid = segment_ids != 0
    last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
    keep = valid & (positions > last - num_slots)
    return jnp.where(keep, positions % num_slots, num_slots).astype(jnp.int32)


def _write(ck, cv, layer, k, v, slots):
    """k, v [B, T, K, H] written at `slots` [B, T] of layer `layer` of ck, cv [L, B, K, S, H]."""
    rows = jnp.arange(k.shape[0])[:, None]
    # Index arrays around a slice: the update is laid out [B, T, K, H], as k and v are.
    at = (layer, rows, slice(None), slots)
    return (ck.at[at].set(k.astype(ck.dtype), mode="drop"), cv.at[at].set(v.astype(cv.dtype), mode="drop"))


def _layer(c, layer, dtype):
    return jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False).astype(dtype)


def attend_and_write(q, k, v, positions, segment_ids, ck, cv, layer, update: CacheUpdate, window, self_attention):
    """One layer's attention with the cache: q [B, T, N, H], k/v [B, T, K, H] (rotated), ck/cv [L, B, K, S, H]
    (all layers). Returns (out [B, T, N, H], ck, cv with this layer's new keys and values written).

    `self_attention(q, k, v)`: the kernel for a chunk over itself, used when the cache is empty."""
    valid = (segment_ids != 0).astype(jnp.int32)
    if update.before is None:  # nothing cached yet (a prefill's first chunk): the chunk attends itself alone
        out = self_attention(q, k, v)
        return (out, *_write(ck, cv, layer, k, v, update.slots))
    if q.shape[1] == 1:  # decode: write first, then attend the cache alone (see the module docstring)
        ck, cv = _write(ck, cv, layer, k, v, update.slots)
        mask = make_mask(positions, update.after, valid, (update.after >= 0).astype(jnp.int32), window)
        return cache_attention(q, (_layer(ck, layer, q.dtype),), (_layer(cv, layer, q.dtype),), (mask,)), ck, cv
    # A later prefill chunk: (cache, chunk) scored apart and sharing one softmax, then written.
    mask_cache = make_mask(positions, update.before, valid, (update.before >= 0).astype(jnp.int32), window)
    mask_new = make_mask(positions, positions, valid, valid, window)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, T, H], the cache's order
    out = cache_attention(q, (_layer(ck, layer, q.dtype), kt), (_layer(cv, layer, q.dtype), vt), (mask_cache, mask_new))
    return (out, *_write(ck, cv, layer, k, v, update.slots))
