"""The training step: masked cross-entropy, gradients accumulated over microbatches, an AdamW update that a
non-finite loss skips. Pure functions over a `TrainState` (train_state.py), jitted once; the loop lives in
trainer.py.

The trainable tree is the full params (full fine-tuning) or the LoRA adapters; with adapters the loss runs
`model.forward(lora.attach(frozen, adapters, spec, dropout_rng), ...)`, so the model never sees LoRA.

Batches are the dicts of data.pack / DataIterator: tokens, targets, positions, segment_ids [B, T] int32 and
loss_mask [B, T] float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from . import lora as lora_lib
from . import model as model_lib
from .config import MistralConfig, Numerics
from .lora import LoraConfig
from .params import param_shapes
from .sharding import ModelMesh
from .train_state import TrainState, state_shardings

Params = Any

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
F32 = Numerics()  # the default numerics: float32 params and compute


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`
    (None: the run's steps, see TrainConfig)."""

    lr: float = 1e-4
    total_steps: int | None = None
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # never applied to norm scales
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global-norm clipping; None or 0 = off
    mu_dtype: str | None = None  # AdamW's first moment: None = the params' dtype; "bfloat16" halves its memory

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"OptimizerConfig: {msg}")

        if self.lr <= 0:
            bad(f"lr must be positive, got {self.lr}")
        if self.total_steps is not None and self.total_steps <= 0:
            bad(f"total_steps must be positive, got {self.total_steps}")
        if self.warmup_steps < 0:
            bad(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            bad(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.mu_dtype not in (None, "float32", "bfloat16"):
            bad(f"mu_dtype must be float32 or bfloat16, got {self.mu_dtype!r}")

    def replace(self, **kw) -> OptimizerConfig:
        return dataclasses.replace(self, **kw)

    def schedule(self) -> optax.Schedule:
        if self.total_steps is None:
            raise ValueError("OptimizerConfig: total_steps is not set (TrainConfig sets it to the run's steps)")
        total = self.total_steps
        warmup = min(self.warmup_steps, total)
        if warmup >= total:
            return optax.linear_schedule(0.0, self.lr, max(warmup, 1))
        return optax.warmup_cosine_decay_schedule(0.0, self.lr, warmup, total, end_value=self.lr * self.min_lr_ratio)


def decay_mask(params: Params) -> Params:
    """True on the leaves that get weight decay: everything but the norm scales (whose 1.0 is no bias to
    shrink towards 0). Norm leaves are [L, D] once stacked, so they are told apart by name, not rank."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", "")) for k in path), params
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        cfg.schedule(),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
        mu_dtype=cfg.mu_dtype,
    )
    if cfg.clip_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


# ---- loss --------------------------------------------------------------------------------------------------


def token_nll(logits, targets):
    """logits [B, T, V] float32, targets [B, T] -> -log p(target) [B, T], without a second [B, T, V] array."""
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def loss_sums(
    trainable: Params,
    frozen: Params | None,
    batch: dict,
    *,
    config: MistralConfig,
    numerics: Numerics = F32,
    lora_spec: LoraConfig | None = None,
    dropout_rng=None,
):
    """(sum of the token NLL over loss_mask, number of loss tokens), both float32 scalars.

    Sums, not a mean, so that microbatches and data-parallel shards add up to the exact big-batch loss:
    the step divides once by the token count of the whole global batch."""
    chex.assert_equal_shape([batch[k] for k in BATCH_KEYS])
    if lora_spec is None:
        params = trainable
    else:
        params = lora_lib.attach(frozen, trainable, lora_spec, dropout_rng)
    logits = model_lib.forward(
        params, batch["tokens"], batch["positions"], batch["segment_ids"], config=config, numerics=numerics
    )
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(token_nll(logits, batch["targets"]) * mask), jnp.sum(mask)


def _microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...]. Microbatch i takes rows i, i+n, i+2n...: with the batch sharded in
    contiguous blocks over the data axes, every device then holds a share of every microbatch."""

    def split(x):
        b = x.shape[0]
        if b % n:
            raise ValueError(f"batch size {b} is not a multiple of grad_accum {n}")
        return x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate_grads(
    trainable: Params,
    frozen: Params | None,
    batch: dict,
    rng,
    *,
    config: MistralConfig,
    numerics: Numerics = F32,
    lora_spec: LoraConfig | None = None,
    grad_accum: int = 1,
):
    """(grads, loss, loss-token count) of the global `batch` [B, T], run as `grad_accum` microbatches of
    B / grad_accum rows (a scan, so one microbatch's activations live at a time).

    The gradient is that of the mean NLL over all loss tokens of the batch: per-microbatch sums are added and
    divided once by the total count, so 4 microbatches of 2 rows give exactly the gradient of one batch of 8
    (a mean of per-microbatch means would weigh a token by the size of its microbatch)."""
    loss = functools.partial(loss_sums, config=config, numerics=numerics, lora_spec=lora_spec)
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    use_dropout = lora_spec is not None and lora_spec.dropout > 0

    def micro(carry, xs):
        i, mb = xs
        g_acc, s_acc, n_acc = carry
        (s, n), g = grad_fn(trainable, frozen, mb, dropout_rng=jax.random.fold_in(rng, i) if use_dropout else None)
        return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    carry = (zeros, jnp.float32(0), jnp.float32(0))
    if grad_accum == 1:
        carry, _ = micro(carry, (0, batch))
    else:
        carry, _ = jax.lax.scan(micro, carry, (jnp.arange(grad_accum), _microbatches(batch, grad_accum)))
    g_sum, loss_sum, count = carry
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, trainable)
    return grads, loss_sum / denom, count


def train_step(
    state: TrainState,
    frozen: Params | None,
    batch: dict,
    *,
    config: MistralConfig,
    numerics: Numerics,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    lora_spec: LoraConfig | None = None,
    grad_accum: int = 1,
) -> tuple[TrainState, dict]:
    """One optimizer step on the global `batch` (see accumulate_grads for the gradient).

    A non-finite loss or gradient norm leaves params and opt_state as they were and bumps bad_streak and
    skipped. Returns (new state, metrics: loss, grad_norm (before clipping), lr, loss_tokens, tokens
    (non-padding inputs), skipped, and the new bad_streak and skipped_total)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable = state.params
    grads, loss, count = accumulate_grads(
        trainable, frozen, batch, rng, config=config, numerics=numerics, lora_spec=lora_spec, grad_accum=grad_accum
    )
    grad_norm = optax.tree.norm(grads)

    updates, new_opt = optimizer.update(grads, state.opt_state, trainable)
    new_params = optax.apply_updates(trainable, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, trainable),
        opt_state=keep(new_opt, state.opt_state),
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1).astype(jnp.int32),
        skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": schedule(state.step - state.skipped),
        "loss_tokens": count,
        "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32),
        "skipped": ~ok,
        "bad_streak": new_state.bad_streak,
        "skipped_total": new_state.skipped,
    }
    return new_state, metrics


# ---- jitted, and laid out on a mesh ---------------------------------------------------------------------------


def trainable_shardings(mm, config: MistralConfig, lora_spec: LoraConfig | None = None):
    """Shardings of the trainable tree on the sharding.ModelMesh `mm`: the params' for full fine-tuning, the
    adapters' logical axes for LoRA (the frozen base keeps mm.param_shardings)."""
    if lora_spec is None:
        return mm.param_shardings
    return mm.logical_shardings(lora_lib.lora_logical_axes(config, lora_spec))


def batch_shardings(mm) -> dict:
    """Shardings of a batch dict: rows over the batch axes (data, fsdp)."""
    s = mm.batch_sharding(2)
    return {k: s for k in BATCH_KEYS}


def trainable_shapes(config: MistralConfig, numerics: Numerics, lora_spec: LoraConfig | None = None):
    """The trainable tree as ShapeDtypeStructs: the params in numerics.param_dtype, or the f32 adapters."""
    if lora_spec is None:
        return param_shapes(config, numerics.param_dtype)
    return lora_lib.lora_shapes(config, lora_spec)


def layout(
    mm, config: MistralConfig, numerics: Numerics, opt_cfg: OptimizerConfig, lora_spec: LoraConfig | None = None
) -> tuple[TrainState, TrainState]:
    """(abstract state, its shardings) of a run on the ModelMesh `mm`."""
    optimizer = make_optimizer(opt_cfg)
    abstract = jax.eval_shape(
        lambda p: TrainState.create(p, optimizer, 0), trainable_shapes(config, numerics, lora_spec)
    )
    return abstract, state_shardings(mm, abstract, trainable_shardings(mm, config, lora_spec))


def jit_train_step(
    config: MistralConfig,
    opt_cfg: OptimizerConfig,
    *,
    numerics: Numerics = F32,
    lora_spec: LoraConfig | None = None,
    grad_accum: int = 1,
    mm=None,
) -> Callable:
    """jit(train_step) with the state donated: (state, frozen, batch) -> (state, metrics). With the
    sharding.ModelMesh `mm` the inputs and the new state are pinned to the trainer's layout (trace it inside
    mm.activate()). Cached on its settings and mesh, so runs of one process that share them (a resumed run,
    tests, the demo) trace and compile once."""
    return _jit_train_step(config, numerics, opt_cfg, lora_spec, grad_accum, None if mm is None else mm.mesh)


@functools.lru_cache(maxsize=16)
def _jit_train_step(config, numerics, opt_cfg, lora_spec, grad_accum, mesh):
    fn = functools.partial(
        train_step,
        config=config,
        numerics=numerics,
        optimizer=make_optimizer(opt_cfg),
        schedule=opt_cfg.schedule(),
        lora_spec=lora_spec,
        grad_accum=grad_accum,
    )
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    mm = ModelMesh(mesh, config)
    _, state_sh = layout(mm, config, numerics, opt_cfg, lora_spec)
    frozen_sh = None if lora_spec is None else mm.param_shardings
    return jax.jit(
        fn, donate_argnums=0, in_shardings=(state_sh, frozen_sh, batch_shardings(mm)), out_shardings=(state_sh, None)
    )


@functools.lru_cache(maxsize=16)
def jit_eval_step(config: MistralConfig, numerics: Numerics = F32, lora_spec: LoraConfig | None = None) -> Callable:
    """jit(loss_sums) without dropout: (trainable, frozen, batch) -> (NLL sum, loss-token count)."""
    return jax.jit(functools.partial(loss_sums, config=config, numerics=numerics, lora_spec=lora_spec))
