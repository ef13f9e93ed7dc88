"""LoRA: low-rank adapters that wrap the model's projections from outside.

    y = x W + (alpha / rank) * (dropout(x) A) B        A [in..., r] random, B [r, out...] zero at the start

The adapters are their own tree, shaped like the layer params they cover ({'layers': {'attention': {'wq_a':
[L, D, r], 'wq_b': [L, r, N, H], ...}}}). `attach` puts a `LoraWeight` (base weight + its adapters) where
the base has a covered weight; model.project calls its `project`, so the base model knows nothing of adapters
and `model.forward` takes no LoRA argument. Training differentiates with respect to the adapters only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from . import params as params_lib
from .config import MistralConfig

Params = dict[str, Any]

# LoRA targets by the transformers names that PEFT uses, and our layer param they adapt.
TARGETS = {
    "q": "attention/wq",
    "k": "attention/wk",
    "v": "attention/wv",
    "o": "attention/wo",
    "gate": "feed_forward/w1",
    "up": "feed_forward/w3",
    "down": "feed_forward/w2",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters of `rank` on the `targets` projections, scaled by alpha / rank; `dropout` on their input."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {list(TARGETS)}, got {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weights(self) -> list[params_lib.Weight]:
        return [params_lib.BY_PATH["layers/" + TARGETS[t]] for t in self.targets]


@struct.dataclass
class LoraWeight:
    """A base projection weight with its adapters; model.project calls `project`."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    key: jax.Array | None = None  # uint32 key data for dropout, None: no dropout
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    def reshape(self, *shape) -> LoraWeight:
        """The weight reshaped, its input axes merged or split within themselves (a [in..., r], b [r, out...])."""
        w = self.w.reshape(*shape)
        n_in, k, size = math.prod(self.a.shape[:-1]), 0, 1
        while size < n_in:
            size *= w.shape[k]
            k += 1
        if size != n_in:
            raise ValueError(f"LoraWeight.reshape: {shape} splits an input axis of {self.w.shape} with an output axis")
        return self.replace(
            w=w, a=self.a.reshape(*w.shape[:k], self.a.shape[-1]), b=self.b.reshape(self.b.shape[0], *w.shape[k:])
        )

    def project(self, eq: str, x):
        xs, rest = eq.split(",")
        ws, out = rest.split("->")
        contract = "".join(c for c in ws if c in xs and c not in out)
        w_out = "".join(c for c in ws if c not in contract)
        x_rest = "".join(c for c in xs if c not in contract)
        y = jnp.einsum(eq, x, self.w.astype(x.dtype))
        if self.key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.key), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = jnp.einsum(f"{xs},{contract}r->{x_rest}r", x, self.a.astype(x.dtype))
        return y + jnp.einsum(f"{x_rest}r,r{w_out}->{out}", h, self.b.astype(x.dtype)) * jnp.asarray(
            self.scale, x.dtype
        )


def _split(w: params_lib.Weight, c: MistralConfig):
    """(input shape, output shape, input axes, output axes) of one layer of projection `w`."""
    shape = w.shape(c)
    return shape[: w.n_in], shape[w.n_in :], w.axes[: w.n_in], w.axes[w.n_in :]


def _group_name(w: params_lib.Weight) -> tuple[str, str]:
    _, group, name = w.path.split("/")
    return group, name


def init_lora(config: MistralConfig, spec: LoraConfig, rng) -> Params:
    """Adapters for `spec`, float32: A uniform with variance 1/(3 fan_in) (PEFT's kaiming init), B zero, so the
    adapted model starts equal to the base."""
    layers: Params = {}
    keys = jax.random.split(rng, len(spec.targets))
    for key, w in zip(keys, spec.weights()):
        shape_in, shape_out, _, _ = _split(w, config)
        fan_in = math.prod(shape_in)
        bound = math.sqrt(1.0 / fan_in)  # sqrt(3 * var), var = 1 / (3 fan_in)
        group, name = _group_name(w)
        a = jax.random.uniform(key, (config.n_layers, *shape_in, spec.rank), jnp.float32, -bound, bound)
        layers.setdefault(group, {})[name + "_a"] = a
        layers[group][name + "_b"] = jnp.zeros((config.n_layers, spec.rank, *shape_out), jnp.float32)
    return {"layers": layers}


def lora_shapes(config: MistralConfig, spec: LoraConfig) -> Params:
    return jax.eval_shape(lambda: init_lora(config, spec, jax.random.key(0)))


def lora_logical_axes(config: MistralConfig, spec: LoraConfig) -> Params:
    layers: Params = {}
    for w in spec.weights():
        _, _, axes_in, axes_out = _split(w, config)
        group, name = _group_name(w)
        layers.setdefault(group, {})[name + "_a"] = ("layers", *axes_in, "lora_rank")
        layers[group][name + "_b"] = ("layers", "lora_rank", *axes_out)
    return {"layers": layers}


def attach(params: Params, adapters: Params, spec: LoraConfig, dropout_rng=None) -> Params:
    """The param tree with each covered weight replaced by a LoraWeight (base + adapters). `dropout_rng` turns
    on the adapters' input dropout (training); each layer and target draws its own mask."""
    layers = {g: dict(m) for g, m in params["layers"].items()}
    use_dropout = dropout_rng is not None and spec.dropout > 0
    for k, w in enumerate(spec.weights()):
        group, name = _group_name(w)
        base = layers[group][name]
        key = None
        if use_dropout:
            n = jax.tree.leaves(base)[0].shape[0]
            key = jax.random.key_data(jax.random.split(jax.random.fold_in(dropout_rng, k), n))
        ad = adapters["layers"][group]
        layers[group][name] = LoraWeight(
            base, ad[name + "_a"], ad[name + "_b"], key, spec.scale, spec.dropout if use_dropout else 0.0
        )
    return {**params, "layers": layers}


def merge_lora(params: Params, adapters: Params, spec: LoraConfig) -> Params:
    """Folds the adapters into the base weights: W + scale * A B, in the base weights' dtype."""
    layers = {g: dict(m) for g, m in params["layers"].items()}
    for w in spec.weights():
        group, name = _group_name(w)
        a, b = adapters["layers"][group][name + "_a"], adapters["layers"][group][name + "_b"]
        base = layers[group][name]
        n_in = a.ndim - 2  # a is [L, in..., r]
        delta = jnp.einsum(
            a, [0, *range(1, n_in + 1), 99], b, [0, 99, *range(n_in + 1, base.ndim)], [0, *range(1, base.ndim)]
        )
        layers[group][name] = (base.astype(jnp.float32) + spec.scale * delta).astype(base.dtype)
    return {**params, "layers": layers}
