"""Token sampling for the compiled generation loop.

One compiled program serves every row of a batch, so every setting is a per-row array: changing a row's
temperature, top-k, top-p or seed never recompiles.

Semantics (transformers' warpers, applied in their usual order):
  * temperature == 0: greedy, exactly ``argmax`` (the first maximum on ties, like torch / transformers).
  * otherwise the logits are divided by the temperature, then
  * top-k (k > 0 and k < V): keeps the tokens whose logit is >= the k-th largest. Ties at the k-th value are
    all kept (so a row may keep more than k tokens), which is what transformers' TopKLogitsWarper does
    (``logits < topk(...).values[..., -1]`` is removed);
  * top-p (p < 1): on the distribution left by temperature and top-k, keeps the smallest set of most likely
    tokens whose mass reaches p, always at least the top token. In descending order a token is kept when the
    mass strictly before it is < p, the same rule as TopPLogitsWarper's ``cumsum_ascending <= 1 - p``
    removal. The cut is applied as a logit threshold, so tokens tied with the last kept one are kept too
    (transformers splits such ties by sort position, i.e. arbitrarily);
  * a token is drawn with ``jax.random.categorical`` from the filtered logits.

The random key of a row is ``fold_in(key(seed), step)``: it depends on the row's seed and on the index of the
token being generated only, so a seed gives the same tokens whatever the batch size or the row's position.

Cost (``lax.cond`` on the batch): an all-greedy batch is one argmax, no RNG; filtering runs only when some
sampled row uses top-k or top-p, and then looks at the 256 largest logits of each row (lax.top_k), sorting
the whole vocabulary only when a cut lies beyond them (k > 256, or a nucleus of more than 256 tokens).
"""

import jax
import jax.numpy as jnp
from jax import lax


def _row_keys(seeds, steps):
    """[B] seeds, [B] steps -> [B] typed PRNG keys, each fold_in(key(seed), step). Seeds are read as uint32,
    so an int32 seed s >= 0 gives the same key as the uint32 one."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(
        seeds.astype(jnp.uint32), steps.astype(jnp.uint32)
    )


PREFIX = 256  # candidates (lax.top_k) tried before falling back to a full sort of the vocabulary


def _thresholds(scaled, desc, top_k, top_p):
    """Per-row logit threshold of top-k then top-p (keep scaled >= it; -inf when both are off).

    desc [B, n] holds the n largest values of each row of scaled [B, V], descending: the whole sorted row
    (n = V) or a prefix. Returns (threshold [B], ok [B]); ok is False where the prefix was too short to place
    the cut (k > n, or the nucleus reaches past n tokens)."""
    v, n = scaled.shape[-1], desc.shape[-1]
    ranks = jnp.arange(n)

    # top-k: the k-th largest value (ties with it kept); k <= 0 or k >= V is off.
    k_on = (top_k > 0) & (top_k < v)
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, n - 1)[:, None], axis=-1)[:, 0]
    k_thresh = jnp.where(k_on, kth, -jnp.inf)[:, None]

    # top-p on the distribution left by top-k, normalised over the whole row (so desc may be a prefix):
    # rank r is kept when the mass before it is < p; always rank 0. The kept ranks form a prefix.
    top = desc[:, :1]
    z = jnp.sum(jnp.where(scaled >= k_thresh, jnp.exp(scaled - top), 0.0), axis=-1, keepdims=True)
    in_k = desc >= k_thresh
    probs = jnp.where(in_k, jnp.exp(desc - top), 0.0) / z
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (in_k & (mass_before < top_p[:, None])) | (ranks == 0)
    n_keep = jnp.sum(keep, axis=-1)
    p_on = top_p < 1.0
    last_kept = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)[:, 0]
    p_thresh = jnp.where(p_on, last_kept, -jnp.inf)

    ok = (n == v) | ((~k_on | (top_k <= n)) & (~p_on | (n_keep < n)))
    return jnp.maximum(k_thresh[:, 0], p_thresh), ok


def _filter(scaled, top_k, top_p, active):
    """Mask (to -inf) the tokens that top-k then top-p remove. scaled [B, V] float32; rows where active is
    False are returned unchanged. Tries the PREFIX largest values first (lax.top_k, far cheaper than a full
    sort of the vocabulary) and sorts the whole vocabulary only when some active row's cut lies beyond them.
    Both give the same threshold, so a row's tokens do not depend on which path its batch took."""
    v = scaled.shape[-1]

    def full_sort(_):
        return _thresholds(scaled, -jnp.sort(-scaled, axis=-1), top_k, top_p)[0]

    if v <= PREFIX:
        thresh = full_sort(None)
    else:
        prefix = lax.top_k(scaled, PREFIX)[0]
        thresh, ok = _thresholds(scaled, prefix, top_k, top_p)
        thresh = lax.cond(jnp.all(ok | ~active), lambda _: thresh, full_sort, None)
    thresh = jnp.where(active, thresh, -jnp.inf)
    return jnp.where(scaled >= thresh[:, None], scaled, -jnp.inf)


def greedy(logits):
    """[B, V] -> int32 [B]: the first maximum of each row (argmax), as torch / transformers."""
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)


def sample(logits, seeds, steps, temperature, top_k, top_p):
    """logits [B, V] float32; seeds [B] uint32/int32 (per-row seed); steps [B] int32 (index of the token being
    generated in that row, i.e. 0 for the first new token); temperature [B] float32 (0 = greedy argmax);
    top_k [B] int32 (0 = off); top_p [B] float32 (1.0 = off). Returns int32 tokens [B]."""
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    temperature = temperature.astype(jnp.float32)
    top_k = top_k.astype(jnp.int32)
    top_p = top_p.astype(jnp.float32)
    greedy_tokens = greedy(logits)
    sampled_rows = temperature > 0

    def draw(_):
        scaled = logits / jnp.where(sampled_rows, temperature, 1.0)[:, None]
        filtered_rows = sampled_rows & (((top_k > 0) & (top_k < v)) | (top_p < 1.0))
        scaled = lax.cond(
            jnp.any(filtered_rows), lambda x: _filter(x, top_k, top_p, filtered_rows), lambda x: x, scaled
        )
        keys = _row_keys(seeds, steps)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(sampled_rows, drawn, greedy_tokens)

    return lax.cond(jnp.any(sampled_rows), draw, lambda _: greedy_tokens, None)
