"""Rotary position embeddings.

Convention inside this project: transformers' "rotate half" layout, pairing x_i with x_{i + H/2}. Mistral's
native checkpoints pair interleaved (x_0, x_1), (x_2, x_3), ...; the param spec (params.py) reorders the rows
of wq and wk on import and export, so the model only ever sees one layout.
"""

import jax.numpy as jnp


def rope_tables(positions, head_dim: int, theta: float):
    """positions [B, T] absolute (int) -> (cos, sin), each [B, T, 1, H/2] float32, shared by every layer.

    Angles are float32 whatever the compute dtype: bf16 angles at position ~30k would be off by whole radians."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, H/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, tables):
    """x [B, T, N, H] rotated by the tables of its positions; same dtype (rotation in float32)."""
    cos, sin = tables
    h = x.shape[-1]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : h // 2], x32[..., h // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
