"""The pure generation programs: chunked prefill into the KV cache, then one `lax.while_loop` that decodes
until every row has stopped (no Python call per token). programs.py jits them; generator.py drives them.

Rows are right-padded; each row carries its own absolute positions, so rotary embeddings and the window are
exact for every row whatever its length.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from . import model as model_lib
from .config import MistralConfig, Numerics
from .kv_cache import KVCache
from .sampling import greedy, sample

RUNNING, STOP, LENGTH = 0, 1, 2  # DecodeState.reason


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries, one row per sequence (B rows, M the completion buffer's length)."""

    cache: KVCache  # the rows' keys and values so far
    logits: jax.Array  # [B, V] float32: logits of the next token to pick
    out: jax.Array  # [B, M] int32: tokens generated so far (0 past n)
    n: jax.Array  # [B] int32: tokens generated so far
    pos: jax.Array  # [B] int32: position of the next token fed to the model
    done: jax.Array  # [B] bool: the row has stopped (padding rows start done)
    reason: jax.Array  # [B] int32: RUNNING, STOP (a stop id) or LENGTH (max_new reached)
    seeds: jax.Array  # [B] uint32: per-row sampling seed
    temperature: jax.Array  # [B] float32: 0 is greedy
    top_k: jax.Array  # [B] int32: 0 is off
    top_p: jax.Array  # [B] float32: 1 is off
    max_new: jax.Array  # [B] int32: the row's token limit
    stop_ids: jax.Array  # [B, NS] int32: the row's stop tokens, -1 padded

    @classmethod
    def greedy(cls, cache: KVCache, logits, pos, max_new, out_len: int) -> DecodeState:
        """Greedy rows with nothing generated yet: `pos` [B] (or one for all) the position of each row's next
        token, `max_new` [B] (or one) its token limit, an output buffer of `out_len` tokens, no stop id."""
        b = logits.shape[0]

        def rows(value, dtype):
            return jnp.broadcast_to(jnp.asarray(value, dtype), (b,))

        return cls(
            cache=cache,
            logits=logits,
            out=jnp.zeros((b, out_len), jnp.int32),
            n=rows(0, jnp.int32),
            pos=rows(pos, jnp.int32),
            done=rows(False, bool),
            reason=rows(RUNNING, jnp.int32),
            seeds=rows(0, jnp.uint32),
            temperature=rows(0.0, jnp.float32),
            top_k=rows(0, jnp.int32),
            top_p=rows(1.0, jnp.float32),
            max_new=rows(max_new, jnp.int32),
            stop_ids=jnp.full((b, 1), -1, jnp.int32),
        )

    def check(self, config: MistralConfig) -> None:
        """Shapes agree with each other and with `config` (chex)."""
        self.cache.check(config)
        b, m = self.out.shape
        chex.assert_shape(self.logits, (b, config.vocab_size))
        chex.assert_shape(
            [
                self.n,
                self.pos,
                self.done,
                self.reason,
                self.seeds,
                self.temperature,
                self.top_k,
                self.top_p,
                self.max_new,
            ],
            (b,),
        )
        chex.assert_shape(self.stop_ids, (b, None))


def prefill(params, tokens, lengths, cache: KVCache, *, config: MistralConfig, numerics: Numerics, chunk: int):
    """tokens [B, T] right-padded, lengths [B], an empty cache -> (logits of each row's last prompt token
    [B, V], cache).

    Prompts longer than `chunk` (T a multiple of it) are prefilled chunk by chunk (a scan); each chunk after the
    first attends (cache, chunk) and is then written into the rolling buffer, so the cache never holds more
    than its slots. The first chunk attends itself alone, with the configured attention kernel."""
    b, t = tokens.shape
    chex.assert_shape(lengths, (b,))
    cache.check(config)
    c = min(chunk, t)
    n = t // c
    chunks = tokens.reshape(b, n, c).transpose(1, 0, 2)

    def step(cache, i, first=False):
        start = i * c
        pos = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
        seg = (pos < lengths[:, None]).astype(jnp.int32)
        at = jnp.clip(lengths - 1 - start, 0, c - 1)
        logits, cache = model_lib.forward(
            params, chunks[i], pos, seg, cache, config=config, numerics=numerics, logits_at=at, cache_empty=first
        )
        return cache, logits[:, 0]

    cache, logits = step(cache, 0, first=True)
    if n > 1:
        cache, rest = jax.lax.scan(step, cache, jnp.arange(1, n))
        # Each row's logits come from the chunk holding its last prompt token.
        logits = jnp.concatenate([logits[None], rest])[jnp.clip((lengths - 1) // c, 0, n - 1), jnp.arange(b)]
    return logits, cache


def _pick(st: DecodeState, sampled: bool) -> tuple[DecodeState, jax.Array]:
    """The next token of every active row, written to `out`, with the stop and length bookkeeping."""
    rows = jnp.arange(st.n.shape[0])
    new = ~st.done
    tok = sample(st.logits, st.seeds, st.n, st.temperature, st.top_k, st.top_p) if sampled else greedy(st.logits)
    out = st.out.at[rows, st.n].set(jnp.where(new, tok, 0), mode="drop")
    n = st.n + new
    is_stop = new & jnp.any(tok[:, None] == st.stop_ids, axis=-1)
    is_len = new & ~is_stop & (n >= st.max_new)
    reason = jnp.where(is_stop, STOP, jnp.where(is_len, LENGTH, st.reason))
    return st.replace(out=out, n=n, done=st.done | is_stop | is_len, reason=reason), tok


def decode(
    params,
    state: DecodeState,
    max_steps,
    *,
    config: MistralConfig,
    numerics: Numerics,
    sampled: bool = True,
    final: bool = False,
) -> DecodeState:
    """Decodes at most `max_steps` tokens per row, or until every row is done.

    `sampled=False` (static) compiles a greedy-only loop: an all-greedy batch never needs the sampler.
    `final=True` (static): no call follows this one, so the last token picked is not fed to the model (one
    forward fewer); the returned `logits` and cache then do not include it."""
    state.check(config)

    def cond(carry):
        i, st = carry
        return (i < max_steps - final) & jnp.any(~st.done)

    def body(carry):
        i, st = carry
        st, tok = _pick(st, sampled)
        # One forward per step even once every row is done: a lax.cond would copy its operands, the params.
        seg = (~st.done).astype(jnp.int32)[:, None]
        logits, cache = model_lib.forward(
            params, tok[:, None], st.pos[:, None], seg, st.cache, config=config, numerics=numerics
        )
        return i + 1, st.replace(cache=cache, logits=logits[:, 0], pos=st.pos + (~st.done))

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    if final:  # the last token: picked, not fed (a no-op when every row is already done)
        state, _ = _pick(state, sampled)
    return state
