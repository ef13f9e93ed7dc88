"""The training step: masked cross-entropy, gradients accumulated over microbatches, an AdamW update that a
non-finite loss skips. Pure functions over a state pytree, jitted once; the loop lives in trainer.py.

State (a dict, so orbax saves and restores it as is):
  step        int32 []   batches consumed so far (skipped ones included)
  params      the trainable tree: the full params, or only the LoRA adapters (then the base is `frozen`)
  opt_state   optax state for `params` only: frozen base weights get no optimizer state
  rng         uint32 [2] key data; step i uses fold_in(rng, i), so a resumed run draws the same dropout masks
  bad_streak  int32 []   non-finite losses in a row (the trainer aborts past a limit)
  skipped     int32 []   updates skipped in total; the optimizer has applied `step - skipped` updates

Batches are the dicts of data.pack / DataIterator: tokens, targets, positions, segment_ids [B, T] int32 and
loss_mask [B, T] float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from . import model as model_lib
from .config import MistralConfig
from .model import LoraSpec

Params = Any
State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""

    lr: float = 1e-4
    total_steps: int = 1000
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0   # global-norm clipping; None or 0 = off

    def schedule(self) -> optax.Schedule:
        warmup = min(self.warmup_steps, self.total_steps)
        if warmup >= self.total_steps:
            return optax.linear_schedule(0.0, self.lr, max(warmup, 1))
        return optax.warmup_cosine_decay_schedule(0.0, self.lr, warmup, self.total_steps,
                                                  end_value=self.lr * self.min_lr_ratio)


def decay_mask(params: Params) -> Params:
    """True on the leaves that get weight decay: everything but the norm scales (whose 1.0 is no bias to
    shrink towards 0). Norm leaves are [L, D] once stacked, so they are told apart by name, not rank."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", "")) for k in path), params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(cfg.schedule(), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    if cfg.clip_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def init_state(params: Params, optimizer: optax.GradientTransformation, seed: int) -> State:
    """The state at step 0 for the trainable `params` (full params, or LoRA adapters)."""
    return {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params),
            "rng": jax.random.key_data(jax.random.key(seed)), "bad_streak": jnp.int32(0),
            "skipped": jnp.int32(0)}


# ---- loss --------------------------------------------------------------------------------------------------

def token_nll(logits, targets):
    """logits [B, T, V] float32, targets [B, T] -> -log p(target) [B, T], without a second [B, T, V] array."""
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def loss_sums(trainable: Params, frozen: Params | None, batch: dict, config: MistralConfig,
              lora_spec: LoraSpec | None = None, dropout_rng=None):
    """(sum of the token NLL over loss_mask, number of loss tokens), both float32 scalars.

    Sums, not a mean, so that microbatches and data-parallel shards add up to the exact big-batch loss:
    the step divides once by the token count of the whole global batch."""
    if lora_spec is None:
        params, lora = trainable, None
    else:
        params, lora = frozen, trainable
    use_dropout = lora_spec is not None and lora_spec.dropout > 0 and dropout_rng is not None
    logits = model_lib.apply(params, config, batch["tokens"], batch["positions"], batch["segment_ids"],
                             lora=lora, lora_spec=lora_spec, dropout_rng=dropout_rng if use_dropout else None)
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


def accumulate_grads(trainable: Params, frozen: Params | None, batch: dict, rng, *, config: MistralConfig,
                     lora_spec: LoraSpec | None = None, grad_accum: int = 1):
    """(grads, loss, loss-token count) of the global `batch` [B, T], run as `grad_accum` microbatches of
    B / grad_accum rows (a scan, so one microbatch's activations live at a time).

    The gradient is that of the mean NLL over all loss tokens of the batch: per-microbatch sums are added and
    divided once by the total count, so 4 microbatches of 2 rows give exactly the gradient of one batch of 8
    (a mean of per-microbatch means would weigh a token by the size of its microbatch)."""
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def micro(carry, xs):
        i, mb = xs
        g_acc, s_acc, n_acc = carry
        (s, n), g = grad_fn(trainable, frozen, mb, config, lora_spec, jax.random.fold_in(rng, i))
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


def train_step(state: State, frozen: Params | None, batch: dict, *, config: MistralConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               lora_spec: LoraSpec | None = None, grad_accum: int = 1) -> tuple[State, dict]:
    """One optimizer step on the global `batch` (see accumulate_grads for the gradient).

    A non-finite loss or gradient norm leaves params and opt_state as they were and bumps bad_streak and
    skipped. Returns (new state, metrics: loss, grad_norm (before clipping), lr, loss_tokens, tokens
    (non-padding inputs), skipped, and the new bad_streak and skipped_total)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    trainable = state["params"]
    grads, loss, count = accumulate_grads(trainable, frozen, batch, rng, config=config, lora_spec=lora_spec,
                                          grad_accum=grad_accum)
    grad_norm = optax.tree.norm(grads)

    updates, new_opt = optimizer.update(grads, state["opt_state"], trainable)
    new_params = optax.apply_updates(trainable, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, trainable),
        "opt_state": keep(new_opt, state["opt_state"]),
        "rng": state["rng"],
        "bad_streak": jnp.where(ok, 0, state["bad_streak"] + 1).astype(jnp.int32),
        "skipped": state["skipped"] + (~ok).astype(jnp.int32),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"] - state["skipped"]),
               "loss_tokens": count, "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32),
               "skipped": ~ok, "bad_streak": new_state["bad_streak"], "skipped_total": new_state["skipped"]}
    return new_state, metrics


def jit_train_step(config: MistralConfig, opt_cfg: OptimizerConfig, lora_spec: LoraSpec | None = None,
                   grad_accum: int = 1, shardings: tuple | None = None) -> Callable:
    """jit(train_step) with the state donated. `shardings` = (state, frozen, batch) sharding trees pins the
    layout of inputs and of the new state (the mesh's logical-axis rules must be active while it traces).

    Without shardings the jitted function is cached on its (hashable) settings, so runs of one process that
    share them (a resumed run, tests, the demo) trace and compile once."""
    if shardings is None:
        return _jit_train_step(config, opt_cfg, lora_spec, grad_accum)
    return _jit_train_step.__wrapped__(config, opt_cfg, lora_spec, grad_accum, shardings)


@functools.lru_cache(maxsize=16)
def _jit_train_step(config, opt_cfg, lora_spec, grad_accum, shardings=None):
    fn = functools.partial(train_step, config=config, optimizer=make_optimizer(opt_cfg),
                           schedule=opt_cfg.schedule(), lora_spec=lora_spec, grad_accum=grad_accum)
    if shardings is None:
        return jax.jit(fn, donate_argnums=0)
    state_sh, frozen_sh, batch_sh = shardings
    return jax.jit(fn, donate_argnums=0, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, None))


# ---- layout on a mesh -------------------------------------------------------------------------------------

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def trainable_shardings(mm, config: MistralConfig, lora_spec: LoraSpec | None = None):
    """Shardings of the trainable tree on the sharding.ModelMesh `mm`: the params' for full fine-tuning, the
    adapters' logical axes for LoRA (the frozen base keeps mm.param_shardings)."""
    if lora_spec is None:
        return mm.param_shardings
    return mm.logical_shardings(model_lib.lora_logical_axes(config, lora_spec))


def state_shardings(mm, abstract_state: State, trainable_sh) -> State:
    """Shardings of a train state (init_state's tree, abstract): params as `trainable_sh`, optimizer state
    laid out like the params it tracks, the scalars and RNG replicated."""
    from .sharding import like_params

    repl = jax.sharding.NamedSharding(mm.mesh, jax.sharding.PartitionSpec())
    out = jax.tree.map(lambda _: repl, abstract_state)
    out["params"] = trainable_sh
    out["opt_state"] = like_params(abstract_state["opt_state"], trainable_sh, mm.mesh)
    return out


def batch_shardings(mm) -> dict:
    """Shardings of a batch dict: rows over the batch axes (data, fsdp)."""
    from .sharding import batch_sharding

    s = batch_sharding(mm.mesh, 2, mm.rules)
    return {k: s for k in BATCH_KEYS}


@functools.lru_cache(maxsize=16)
def jit_eval_step(config: MistralConfig, lora_spec: LoraSpec | None = None) -> Callable:
    """jit(loss_sums) without dropout: (trainable, frozen, batch) -> (NLL sum, loss-token count)."""
    return jax.jit(functools.partial(loss_sums, config=config, lora_spec=lora_spec))
