"""Rotary position embeddings.

Convention inside this project: transformers' "rotate half" layout, pairing x_i with x_{i + H/2}. Mistral's
native checkpoints pair interleaved (x_0, x_1), (x_2, x_3), ...; checkpoint.py permutes the rows of wq/wk on
import and export, so the model only ever sees one layout.
"""

import jax
import jax.numpy as jnp


def rope_tables(positions, head_dim: int, theta: float):
    """positions [B, T] absolute (int) -> (cos, sin), each [B, T, 1, H/2] float32.

    Computed once per forward and shared by every layer's queries and keys (model.Transformer). Angles are
    float32 whatever the compute dtype: bf16 angles at position ~30k would be off by whole radians.

    For more than one position per row, the tables are computed in a while loop of one iteration that XLA
    cannot count (its condition reads the positions), so they are materialized once. Otherwise XLA fuses the
    sines and cosines into every layer's rotation, where they are evaluated again for each head and element:
    on the CPU, rotating a prefill's queries and keys took several times longer than with the tables read from
    memory (an optimization barrier does not stop it: XLA removes barriers before fusing).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]

    def tables():
        angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, H/2]
        return jnp.cos(angles), jnp.sin(angles)

    if positions.shape[-1] == 1:  # a decode step: one angle per row, cheap to fuse
        return tables()
    empty = jnp.zeros((*positions.shape, 1, head_dim // 2), jnp.float32)
    once = jnp.max(positions) > jnp.iinfo(jnp.int32).min  # always true, unknown to XLA
    _, out = jax.lax.while_loop(lambda c: c[0] & once, lambda c: (jnp.bool_(False), tables()),
                                (jnp.bool_(True), (empty, empty)))
    return out


def apply_rope(x, tables):
    """x: [B, T, N, H], tables: rope_tables of its positions -> x rotated, same dtype (rotation in float32)."""
    cos, sin = tables
    h = x.shape[-1]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
