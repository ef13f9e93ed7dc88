"""Integrity of loaded weights: a count of non-finite values, and for our orbax format a checksum per array.

The checksum is order-independent (a wrapping sum of a mix of each value's bits with its position), so it is
computed in one fused pass on whatever devices hold the array, sharded or not, and equals the one computed
when the array was saved, whatever the shardings then and now. Two 32-bit lanes: a corrupted value goes
unnoticed with probability 2^-64. It covers the bits as stored, so it is checked before any cast.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CHECKSUMS = "mistral_jax.checksums.json"
ALGORITHM = "position-mixed-sum-2x32-v1"


def _fmix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer: every input bit flips about half the output bits."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _mixed(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per value, the two uint32 words whose wrapping sums are the checksum: its bits mixed with its position."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for d, n in enumerate(x.shape):  # the row-major position, wrapping past 2^32 values
        index = index * np.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
    key = _fmix(index + np.uint32(0x9E3779B9))
    return _fmix(bits ^ key), _fmix(bits + _fmix(key ^ np.uint32(0x7F4A7C15)))


def _sums(parts, ndim: int):
    # One variadic reduction: XLA fuses it with everything above, so no temporary as large as x.
    return jax.lax.reduce(
        parts, (np.uint32(0),) * len(parts), lambda p, q: tuple(u + v for u, v in zip(p, q)), tuple(range(ndim))
    )


def lanes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two uint32 checksum lanes of an array of any dtype (traceable)."""
    return _sums(_mixed(x), x.ndim)


@jax.jit
def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(number of non-finite values, checksum lane a, lane b) of a float array, as uint32 (wrapping)."""
    return _sums(((~jnp.isfinite(x)).astype(jnp.uint32), *_mixed(x)), x.ndim)


def stats(x: Any) -> tuple[int, str]:
    """(non-finite count, checksum as 16 hex digits) of a jax.Array (on its devices; every process of a
    multi-process array calls this) or a numpy array (on the CPU)."""
    if not isinstance(x, jax.Array):
        try:
            device = jax.devices("cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS without cpu
            device = jax.devices()[0]
        x = jax.device_put(np.asarray(x), device)
    bad, a, b = _stats(x)
    return int(bad), f"{int(a):08x}{int(b):08x}"


@jax.jit
def nonfinite(x: jax.Array) -> jax.Array:
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


@partial(jax.jit, static_argnums=1)
def cast(x: jax.Array, dtype) -> jax.Array:
    return x.astype(dtype)  # elementwise: keeps the sharding
