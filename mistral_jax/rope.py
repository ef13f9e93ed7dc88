"""Rotary position embeddings.

Convention inside this project: transformers' "rotate half" layout, pairing x_i with x_{i + H/2}. Mistral's
native checkpoints pair interleaved (x_0, x_1), (x_2, x_3), ...; checkpoint.py permutes the rows of wq/wk on
import and export, so the model only ever sees one layout.
"""

import jax.numpy as jnp


def apply_rope(x, positions, theta: float):
    """x: [B, T, N, H], positions: [B, T] absolute (int) -> x rotated, same dtype.

    Angles and the rotation are computed in float32 whatever the compute dtype: bf16 angles at position
    ~30k would be off by whole radians.
    """
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
