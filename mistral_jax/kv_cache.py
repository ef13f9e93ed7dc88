"""The KV cache: a pytree {'k', 'v': [L, B, K, S, H], 'pos': [B, S]}; with unrolled layers
(config.scan_layers False) 'k' and 'v' are tuples of L arrays [B, K, S, H], so that each layer's update is
in place in its own buffer (a scatter into one stacked array made XLA:CPU copy the whole cache per layer).

KV heads come before slots (transformers' order): both attention products then read the cache as it lies,
with (batch, kv head) as the batch of a batched matmul. With slots first, XLA:CPU transposed the whole cache
of every layer at every decode step.

For a windowed model the cache is a rolling buffer of S = min(W, max_total_len) slots: position p lives at
slot p % S, so memory never grows past W however long the generation. Keys are rotated before they are
cached, so the order of slots does not matter at decode, only which positions they hold: `pos` records the
absolute position held by each slot (-1 for an empty slot), and the attention mask is built from it.
A prefill chunk is written (model.cache_write_slots) after it has attended the old cache, because its early
positions need keys its late positions overwrite; a decode token is written first (the slot it takes holds a
position outside its window), so XLA updates the cache in place.
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
    shape = (batch, config.n_kv_heads, slots, config.head_dim)
    pos = jnp.full((batch, slots), -1, jnp.int32)
    if not config.scan_layers:
        layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))  # noqa: E731
        return {"k": layers(), "v": layers(), "pos": pos}
    return {"k": jnp.zeros((config.n_layers, *shape), dtype), "v": jnp.zeros((config.n_layers, *shape), dtype),
            "pos": pos}


def cache_shape(cache) -> tuple[int, ...]:
    """(L, B, K, S, H) of either layout (stacked or per-layer)."""
    k = cache["k"]
    return (len(k), *k[0].shape) if isinstance(k, (list, tuple)) else tuple(k.shape)


def cache_bytes(config: MistralConfig, batch: int, slots: int, dtype=None) -> int:
    itemsize = jnp.dtype(dtype or config.dtype).itemsize
    return 2 * config.n_layers * batch * slots * config.n_kv_heads * config.head_dim * itemsize + batch * slots * 4
