"""The forward pass over given sequences, batched and bucketed: per-token log-probabilities (the `infer.score`
job, api.Mistral.logprobs) and, for experiments, the logits, hidden states and attention weights of each row
(api.Mistral.forward)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import model as model_lib
from .batching import bucket_length, pad_rows
from .config import MistralConfig, Numerics
from .sharding import ModelMesh


def _segments(tokens, lengths):
    """Segment ids [B, T]: 1 on each row's tokens, 0 on its padding (never attended)."""
    return (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)


def token_logprobs(params, tokens, lengths, *, config: MistralConfig, numerics: Numerics):
    """tokens [B, T] right-padded, lengths [B] -> [B, T-1] float32: log p(x_t | x_<t) for t = 1..T-1,
    0 where t >= length. Padding never influences real tokens (segment id 0 is never attended)."""
    idx = jnp.arange(tokens.shape[1])
    logits = model_lib.forward(params, tokens, None, _segments(tokens, lengths), config=config, numerics=numerics)[
        :, :-1
    ]
    # log_softmax gathered at the target, without materialising a second [B, T, V] array.
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    lp = target - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(idx[None, 1:] < lengths[:, None], lp, 0.0)


def inside(
    params,
    tokens,
    lengths,
    *,
    config: MistralConfig,
    numerics: Numerics,
    hidden_states: bool,
    attention_layers: tuple[int, ...],
):
    """tokens [B, T] right-padded, lengths [B] -> (logits [B, T, V] float32, hidden states [L + 1, B, T, D] or
    None, a tuple of attention probabilities [B, N, T, T], one per layer of `attention_layers`). Entries at
    padding positions are meaningless (the attention rows of padding queries are NaN)."""
    segment_ids = _segments(tokens, lengths)
    if not hidden_states and not attention_layers:
        return model_lib.forward(params, tokens, None, segment_ids, config=config, numerics=numerics), None, ()
    logits, hidden = model_lib.forward(
        params, tokens, None, segment_ids, config=config, numerics=numerics, hidden_states=True
    )
    # hidden[l] is the input of layer l (the embeddings for l = 0).
    attention = tuple(
        model_lib.attention_weights(params, hidden[layer], layer, None, segment_ids, config=config, numerics=numerics)
        for layer in attention_layers
    )
    return logits, hidden if hidden_states else None, attention


@functools.cache
def _jitted(config: MistralConfig, numerics: Numerics):
    return jax.jit(functools.partial(token_logprobs, config=config, numerics=numerics))


@functools.cache
def _jitted_inside(config: MistralConfig, numerics: Numerics, hidden_states: bool, attention_layers: tuple[int, ...]):
    return jax.jit(
        functools.partial(
            inside, config=config, numerics=numerics, hidden_states=hidden_states, attention_layers=attention_layers
        )
    )


def _batches(
    fn: Callable, params, config: MistralConfig, rows: Sequence[Sequence[int]], batch_size: int, mesh: ModelMesh | None
) -> Iterator[tuple[list[int], object]]:
    """Yields (row indices, fn(params, tokens, lengths) on the host) per batch, in order of length (short first).

    Rows are sorted by length so a batch shares one length bucket; batches always hold `batch_size` rows,
    so the number of compiled programs is the number of buckets used. With a `mesh` the batches are split
    over its batch axes and the results gathered from every host."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with mesh.activate() if mesh is not None else contextlib.nullcontext():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            length = bucket_length(max(len(rows[i]) for i in idx), config.max_seq_len)
            tokens, lengths = pad_rows([list(rows[i]) for i in idx], batch_size, length)
            if mesh is not None:
                tokens, lengths = mesh.place(tokens, lengths)
            out = fn(params, tokens, lengths)
            yield idx, mesh.fetch(out) if mesh is not None else jax.tree.map(np.asarray, out)


def score(
    params,
    config: MistralConfig,
    numerics: Numerics,
    rows: Sequence[Sequence[int]],
    batch_size: int,
    mesh: ModelMesh | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (row index, log-probs [len-1]) for every row, in order of length (short first); batched as
    _batches says."""
    for idx, lp in _batches(_jitted(config, numerics), params, config, rows, batch_size, mesh):
        for j, i in enumerate(idx):
            yield i, lp[j, : len(rows[i]) - 1]


@dataclasses.dataclass
class Inside:
    """What the model computes on one sequence of T tokens (numpy, float32 unless the model computes in less)."""

    ids: list[int]  # the tokens
    logits: np.ndarray  # [T, V] float32: the prediction of the token after each position
    hidden_states: np.ndarray | None  # [L + 1, T, D] (when asked): the embeddings, the output of each layer, the
    # last one after the final norm (transformers' output_hidden_states)
    attentions: dict[int, np.ndarray]  # layer -> [N, T, T] attention probabilities (query, key), when asked


def look_inside(
    params,
    config: MistralConfig,
    numerics: Numerics,
    rows: Sequence[Sequence[int]],
    batch_size: int,
    mesh: ModelMesh | None = None,
    *,
    hidden_states: bool = False,
    attention_layers: Sequence[int] = (),
) -> Iterator[tuple[int, Inside]]:
    """Yields (row index, Inside) for every row, in order of length (short first); batched as _batches says."""
    layers = tuple(int(x) for x in attention_layers)
    for layer in layers:
        if not 0 <= layer < config.n_layers:
            raise ValueError(f"attention layer {layer} is not one of the model's layers 0..{config.n_layers - 1}")
    fn = _jitted_inside(config, numerics, bool(hidden_states), layers)
    for idx, (logits, hidden, attention) in _batches(fn, params, config, rows, batch_size, mesh):
        for j, i in enumerate(idx):
            n = len(rows[i])
            yield (
                i,
                Inside(
                    ids=[int(t) for t in rows[i]],
                    logits=logits[j, :n],
                    hidden_states=None if hidden is None else hidden[:, j, :n],
                    attentions={layer: a[j, :, :n, :n] for layer, a in zip(layers, attention)},
                ),
            )
