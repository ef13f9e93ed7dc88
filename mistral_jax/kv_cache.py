"""The KV cache: a pytree {'k', 'v': [L, B, S, K, H], 'pos': [B, S]}.

For a windowed model the cache is a rolling buffer of S = min(W, max_total_len) slots: position p lives at
slot p % S, so memory never grows past W however long the generation. Keys are rotated before they are
cached, so the order of slots does not matter at decode, only which positions they hold: `pos` records the
absolute position held by each slot (-1 for an empty slot), and the attention mask is built from it.
Writing (model.cache_write_slots) happens after the new tokens have attended the old cache, because a
chunk's early positions need keys its late positions overwrite.
"""

from __future__ import annotations

import jax.numpy as jnp

from .config import MistralConfig


def num_slots(config: MistralConfig, max_total_len: int) -> int:
    """Slots per layer for sequences of up to max_total_len tokens."""
    if config.sliding_window is None:
        return max_total_len
    return min(config.sliding_window, max_total_len)


def init_cache(config: MistralConfig, batch: int, slots: int, dtype=None):
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.n_layers, batch, slots, config.n_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch, slots), -1, jnp.int32)}


def cache_bytes(config: MistralConfig, batch: int, slots: int, dtype=None) -> int:
    itemsize = jnp.dtype(dtype or config.dtype).itemsize
    return 2 * config.n_layers * batch * slots * config.n_kv_heads * config.head_dim * itemsize + batch * slots * 4
