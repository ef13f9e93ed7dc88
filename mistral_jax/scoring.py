"""Per-token log-probabilities of given sequences (the `infer.score` job), batched and bucketed."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import model as model_lib
from .batching import bucket_length, pad_rows
from .config import MistralConfig, Numerics
from .sharding import ModelMesh


def token_logprobs(params, tokens, lengths, *, config: MistralConfig, numerics: Numerics):
    """tokens [B, T] right-padded, lengths [B] -> [B, T-1] float32: log p(x_t | x_<t) for t = 1..T-1,
    0 where t >= length. Padding never influences real tokens (segment id 0 is never attended)."""
    t = tokens.shape[1]
    idx = jnp.arange(t)
    segment_ids = (idx[None, :] < lengths[:, None]).astype(jnp.int32)
    logits = model_lib.forward(params, tokens, None, segment_ids, config=config, numerics=numerics)[:, :-1]
    # log_softmax gathered at the target, without materialising a second [B, T, V] array.
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    lp = target - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(idx[None, 1:] < lengths[:, None], lp, 0.0)


@functools.cache
def _jitted(config: MistralConfig, numerics: Numerics):
    return jax.jit(functools.partial(token_logprobs, config=config, numerics=numerics))


def score(params, config: MistralConfig, numerics: Numerics, rows: Sequence[Sequence[int]], batch_size: int,
          mesh: ModelMesh | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (row index, log-probs [len-1]) for every row, in order of length (short first).

    Rows are sorted by length so a batch shares one length bucket; batches always hold `batch_size` rows,
    so the number of compiled programs is the number of buckets used. With a `mesh` the batches are split
    over its batch axes and the results gathered from every host."""
    fn = _jitted(config, numerics)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with mesh.activate() if mesh is not None else contextlib.nullcontext():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            length = bucket_length(max(len(rows[i]) for i in idx), config.max_seq_len)
            tokens, lengths = pad_rows([list(rows[i]) for i in idx], batch_size, length)
            if mesh is not None:
                tokens, lengths = mesh.place(tokens, lengths)
            lp = fn(params, tokens, lengths)
            lp = mesh.fetch(lp) if mesh is not None else np.asarray(lp)
            for j, i in enumerate(idx):
                yield i, lp[j, : len(rows[i]) - 1]
