"""Per-token log-probabilities of given sequences (the `infer.score` job), batched and bucketed."""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import model as model_lib
from .batching import bucket_length, pad_rows
from .config import MistralConfig


def token_logprobs(params, config: MistralConfig, tokens, lengths):
    """tokens [B, T] right-padded, lengths [B] -> [B, T-1] float32: log p(x_t | x_<t) for t = 1..T-1,
    0 where t >= length. Padding never influences real tokens (segment id 0 is never attended)."""
    t = tokens.shape[1]
    idx = jnp.arange(t)
    segment_ids = (idx[None, :] < lengths[:, None]).astype(jnp.int32)
    logits = model_lib.apply(params, config, tokens, None, segment_ids)[:, :-1]
    # log_softmax gathered at the target, without materialising a second [B, T, V] array.
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    lp = target - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(idx[None, 1:] < lengths[:, None], lp, 0.0)


@functools.lru_cache(maxsize=None)
def _jitted(config: MistralConfig):
    return jax.jit(functools.partial(token_logprobs, config=config))


def score(params, config: MistralConfig, rows: Sequence[Sequence[int]], batch_size: int,
          place=None, fetch=None) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (row index, log-probs [len-1]) for every row, in order of length (short first).

    Rows are sorted by length so a batch shares one length bucket; batches always hold `batch_size` rows,
    so the number of compiled programs is the number of buckets used. `place(tokens, lengths)` may put
    the host arrays on a mesh and `fetch(lp)` bring the result back from every host (sharding.py)."""
    fn = _jitted(config)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = bucket_length(max(len(rows[i]) for i in idx), config.max_seq_len)
        tokens, lengths = pad_rows([list(rows[i]) for i in idx], batch_size, length)
        if place is not None:
            tokens, lengths = place(tokens, lengths)
        lp = fn(params, tokens=tokens, lengths=lengths)
        lp = np.asarray(lp if fetch is None else fetch(lp))  # fetch: gathers rows held by other hosts
        for j, i in enumerate(idx):
            yield i, lp[j, : len(rows[i]) - 1]
