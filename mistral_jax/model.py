"""The Mistral transformer: pure functions over the param tree of params.py.

  h   = x + Attention(RMSNorm(x))            Attention: GQA with rotary embeddings and the sliding window
  out = h + FeedForward(RMSNorm(h))          FeedForward: w2(silu(w1 h) * w3 h)

Axis letters are those of attention.py. Every projection is an einsum whose equation is the computation
(`project`); a weight that is not an array brings its own product (lora.LoraWeight), so the model knows
nothing of adapters. Layers run as one scanned layer over the stacked params. Activations carry logical axis
names (sharding.py maps them to the mesh; without a mesh they are no-ops).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import kv_cache
from .attention import make_mask, self_attention
from .config import MistralConfig, Numerics
from .kv_cache import CacheUpdate, KVCache
from .rope import apply_rope, rope_tables

Params = dict[str, Any]

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def project(eq: str, x, w):
    """einsum(eq, x, w) in x's dtype; a weight with its own product (lora.LoraWeight) computes it."""
    if hasattr(w, "project"):
        return w.project(eq, x)
    return jnp.einsum(eq, x, jnp.asarray(w).astype(x.dtype))


def rms_norm(x, scale, eps: float):
    # Statistics in float32 whatever the compute dtype; the scale applies in the compute dtype, as in the peers.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale.astype(x.dtype)


def attention(
    p: Params,
    x,
    rope,
    positions,
    segment_ids,
    kv,
    update: CacheUpdate | None,
    *,
    config: MistralConfig,
    numerics: Numerics,
):
    """x [B, T, D] -> ([B, T, D], kv). `kv` = (k, v, layer) of the cache ([L, B, K, S, H] each) or None."""
    q = project("BTD,DNH->BTNH", x, p["wq"])
    k = project("BTD,DKH->BTKH", x, p["wk"])
    v = project("BTD,DKH->BTKH", x, p["wv"])
    q = nn.with_logical_constraint(apply_rope(q, rope), ("batch", "length", "heads", "head_dim"))
    k = nn.with_logical_constraint(apply_rope(k, rope), ("batch", "length", "kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
    window = config.sliding_window

    def itself(q, k, v):
        return self_attention(q, k, v, positions, segment_ids, window, numerics)

    if kv is None:
        out = itself(q, k, v)  # [B, T, N, H]
    else:
        ck, cv, layer = kv
        out, ck, cv = kv_cache.attend_and_write(q, k, v, positions, segment_ids, ck, cv, layer, update, window, itself)
        kv = (ck, cv, layer)
    # Heads concatenated (E = N*H), then one product: as mistral-inference's wo(output.view(B, T, -1)).
    wo = p["wo"]
    return project("BTE,ED->BTD", out.reshape(*out.shape[:2], -1), wo.reshape(-1, wo.shape[-1])), kv


def feed_forward(p: Params, x):
    gate = project("BTD,DF->BTF", x, p["w1"])
    up = project("BTD,DF->BTF", x, p["w3"])
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return project("BTF,FD->BTD", hidden, p["w2"])


def block(p: Params, x, rope, positions, segment_ids, kv, update, *, config: MistralConfig, numerics: Numerics):
    """One layer: p is one layer's slice of params['layers']."""
    h, kv = attention(
        p["attention"],
        rms_norm(x, p["attention_norm"]["scale"], config.norm_eps),
        rope,
        positions,
        segment_ids,
        kv,
        update,
        config=config,
        numerics=numerics,
    )
    h = x + h
    out = h + feed_forward(p["feed_forward"], rms_norm(h, p["ffn_norm"]["scale"], config.norm_eps))
    return nn.with_logical_constraint(out, ("batch", "length", "embed")), kv


def forward(
    params: Params,
    tokens,
    positions=None,
    segment_ids=None,
    cache: KVCache | None = None,
    *,
    config: MistralConfig,
    numerics: Numerics = Numerics(),
    logits_at=None,
    cache_empty: bool = False,
    hidden_states: bool = False,
):
    """tokens [B, T] int -> logits [B, T, V] float32, or (logits, new cache) when `cache` is given.

    positions [B, T]: absolute positions (default 0..T-1). segment_ids [B, T]: 0 for padding, distinct ids
    for examples packed in one row (default all 1). With a cache the tokens attend the cached keys too and are
    written into it. `logits_at` [B]: the head only at that index of each row (logits [B, 1, V]; a prefill
    needs one position). `cache_empty` (static): the cache holds nothing yet, so it is written, not read.
    `hidden_states` (static): also return [L + 1, B, T, D] after the logits, as transformers'
    output_hidden_states: the embeddings, each layer's output, the last one after the final norm."""
    c = config
    dt = jnp.dtype(numerics.dtype)
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)

    embedding = params["tok_embeddings"]["embedding"]
    x = nn.with_logical_constraint(jnp.take(embedding, tokens, axis=0).astype(dt), ("batch", "length", "embed"))
    rope = rope_tables(positions, c.head_dim, c.rope_theta)  # once for all layers
    update = None if cache is None else cache.plan(positions, segment_ids, cache_empty)

    def layer(carry, xs):
        x, kv = carry
        p, i = xs
        x, kv = block(
            p, x, rope, positions, segment_ids, None if kv is None else (*kv, i), update, config=c, numerics=numerics
        )
        return (x, None if kv is None else kv[:2]), x if hidden_states else None

    if numerics.remat != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[numerics.remat], prevent_cse=False)
    kv = None if cache is None else (cache.k, cache.v)
    x0 = x
    (x, kv), per_layer = run_layers(layer, (x, kv), params["layers"], c.n_layers)

    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
    x = rms_norm(x, params["norm"]["scale"], c.norm_eps)
    if c.tie_embeddings:
        logits = project("BTD,VD->BTV", x, embedding)
    else:
        logits = project("BTD,DV->BTV", x, params["output"]["kernel"])
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    out = (logits,) if cache is None else (logits, KVCache(kv[0], kv[1], update.after))
    if hidden_states:
        last = rms_norm(per_layer[-1], params["norm"]["scale"], c.norm_eps)
        out += (jnp.concatenate([x0[None], per_layer[:-1], last[None]]),)
    return out[0] if len(out) == 1 else out


def run_layers(layer, carry, layers, n_layers: int):
    """Runs `layer(carry, (params of layer i, i)) -> (carry, y)` over every layer: a scan over the stacked
    params; layer params held otherwise (tuning.PerLayer) bring their own loop. Returns (carry, the ys
    stacked)."""
    if hasattr(layers, "run"):
        return layers.run(layer, carry)
    return jax.lax.scan(layer, carry, (layers, jnp.arange(n_layers, dtype=jnp.int32)))


def attention_weights(
    params: Params,
    hidden,
    layer: int,
    positions=None,
    segment_ids=None,
    *,
    config: MistralConfig,
    numerics: Numerics = Numerics(),
):
    """The attention probabilities [B, N, T, T] of layer `layer` given its input `hidden` [B, T, D] (that
    layer's entry of forward's hidden_states), for looking inside the model."""
    b, t, _ = hidden.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    layers = params["layers"]
    p = layers.layer(layer) if hasattr(layers, "layer") else jax.tree.map(lambda w: w[layer], layers)
    x = rms_norm(hidden.astype(numerics.dtype), p["attention_norm"]["scale"], config.norm_eps)
    rope = rope_tables(positions, config.head_dim, config.rope_theta)
    q = apply_rope(project("BTD,DNH->BTNH", x, p["attention"]["wq"]), rope)
    k = apply_rope(project("BTD,DKH->BTKH", x, p["attention"]["wk"]), rope)
    q = q.reshape(b, t, config.n_kv_heads, config.n_heads // config.n_kv_heads, config.head_dim)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(config.head_dim)
    mask = make_mask(positions, positions, segment_ids, segment_ids, config.sliding_window)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1).reshape(b, config.n_heads, t, t)


@functools.partial(jax.jit, static_argnames=("config", "numerics"))
def logits(
    params: Params, tokens, positions=None, segment_ids=None, *, config: MistralConfig, numerics: Numerics = Numerics()
):
    """Jitted logits [B, T, V] float32 (no cache)."""
    return forward(params, tokens, positions, segment_ids, config=config, numerics=numerics)
