"""The param spec: every weight of the model declared once.

Each `Weight` gives one leaf's path in the param tree, its shape (one layer's, for the stacked layer leaves),
its logical axes (sharding.py maps them to mesh axes), its initializer, its names in transformers' and
Mistral's checkpoints, and the view between our layout and theirs. Init, shapes, logical axes, shardings,
import and export all derive from this table.

The tree (layers stacked on a leading axis L, run by one scanned layer; projections [in..., out...]):

  tok_embeddings/embedding [V, D]      layers/attention/wq [L, D, N, H]    layers/attention/wo [L, N, H, D]
  layers/attention/wk, wv [L, D, K, H]  layers/feed_forward/w1, w3 [L, D, F]  layers/feed_forward/w2 [L, F, D]
  layers/attention_norm/scale, layers/ffn_norm/scale [L, D]   norm/scale [D]   output/kernel [D, V] (untied)

Checkpoints store Linear weights [out, in]. transformers' conversion permutes the rows of wq and wk so that
rotary embeddings rotate halves (x_i, x_{i+H/2}); Mistral's own checkpoints rotate interleaved pairs
(x_0, x_1), (x_2, x_3), ... . We keep the halves, so the native view of wq and wk reorders their rows.
A view is a numpy view of one layer of our array, with the shape the stored tensor reshapes to so that the
two line up element for element: import assigns into it, export copies out of it, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from .config import MistralConfig

Params = dict[str, Any]
View = Callable[[np.ndarray, MistralConfig], tuple[np.ndarray, tuple[int, ...]]]


def _same(x, c):  # embeddings and norm scales are stored as we keep them
    return x, x.shape


def _linear(x, c):  # [in, out] -> stored [out, in]
    return x.T, x.T.shape


def _heads_out(n_heads: Callable[[MistralConfig], int]) -> View:
    def view(x, c):  # [D, n, H] -> stored [n*H, D], heads in half-rotary order
        n = n_heads(c)
        return x.reshape(c.dim, n * c.head_dim).T, (n * c.head_dim, c.dim)

    return view


def _heads_out_interleaved(n_heads: Callable[[MistralConfig], int]) -> View:
    # Native row n*H + 2i + p is our column (n, p*H/2 + i): ours split [D, n, p, i], theirs [n, i, p, D].
    def view(x, c):
        n, h2 = n_heads(c), c.head_dim // 2
        return x.reshape(c.dim, n, 2, h2).transpose(1, 3, 2, 0), (n, h2, 2, c.dim)

    return view


def _heads_in(x, c):  # [N, H, D] -> stored [D, N*H]
    return x.reshape(c.n_heads * c.head_dim, c.dim).T, (c.dim, c.n_heads * c.head_dim)


def _q(c):
    return c.n_heads


def _kv(c):
    return c.n_kv_heads


@dataclasses.dataclass(frozen=True)
class Weight:
    path: str  # leaf path in the param tree
    shape: Callable[[MistralConfig], tuple[int, ...]]  # one layer's shape for layer leaves
    axes: tuple[str, ...]  # logical axes of that shape
    init: str  # "normal" (std 0.02) | "ones"
    hf: str  # transformers tensor name ("{l}": layer index)
    native: str  # Mistral native tensor name
    view: View  # our layer array -> the stored layout (transformers)
    native_view: View | None = None  # when the native layout differs
    n_in: int = 0  # leading input axes of a projection (0: not one)

    @property
    def layered(self) -> bool:
        return self.path.startswith("layers/")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    def full_shape(self, c: MistralConfig) -> tuple[int, ...]:
        return (c.n_layers, *self.shape(c)) if self.layered else self.shape(c)

    def full_axes(self) -> tuple[str, ...]:
        return ("layers", *self.axes) if self.layered else self.axes

    def stored_name(self, fmt: str) -> str:
        return self.hf if fmt == "hf" else self.native

    def stored_view(self, fmt: str) -> View:
        return self.native_view if fmt == "native" and self.native_view is not None else self.view

    def stored_shape(self, c: MistralConfig) -> tuple[int, ...]:
        """One layer's tensor shape in a checkpoint file (the same in both formats)."""
        view, _ = self.view(np.empty(self.shape(c), np.int8), c)
        return tuple(view.shape)


WEIGHTS: tuple[Weight, ...] = (
    Weight(
        "tok_embeddings/embedding",
        lambda c: (c.vocab_size, c.dim),
        ("vocab", "embed"),
        "normal",
        "model.embed_tokens.weight",
        "tok_embeddings.weight",
        _same,
    ),
    Weight(
        "layers/attention_norm/scale",
        lambda c: (c.dim,),
        ("embed",),
        "ones",
        "model.layers.{l}.input_layernorm.weight",
        "layers.{l}.attention_norm.weight",
        _same,
    ),
    Weight(
        "layers/attention/wq",
        lambda c: (c.dim, c.n_heads, c.head_dim),
        ("embed", "heads", "head_dim"),
        "normal",
        "model.layers.{l}.self_attn.q_proj.weight",
        "layers.{l}.attention.wq.weight",
        _heads_out(_q),
        _heads_out_interleaved(_q),
        n_in=1,
    ),
    Weight(
        "layers/attention/wk",
        lambda c: (c.dim, c.n_kv_heads, c.head_dim),
        ("embed", "kv_heads", "head_dim"),
        "normal",
        "model.layers.{l}.self_attn.k_proj.weight",
        "layers.{l}.attention.wk.weight",
        _heads_out(_kv),
        _heads_out_interleaved(_kv),
        n_in=1,
    ),
    Weight(
        "layers/attention/wv",
        lambda c: (c.dim, c.n_kv_heads, c.head_dim),
        ("embed", "kv_heads", "head_dim"),
        "normal",
        "model.layers.{l}.self_attn.v_proj.weight",
        "layers.{l}.attention.wv.weight",
        _heads_out(_kv),
        n_in=1,
    ),
    Weight(
        "layers/attention/wo",
        lambda c: (c.n_heads, c.head_dim, c.dim),
        ("heads", "head_dim", "embed"),
        "normal",
        "model.layers.{l}.self_attn.o_proj.weight",
        "layers.{l}.attention.wo.weight",
        _heads_in,
        n_in=2,
    ),
    Weight(
        "layers/ffn_norm/scale",
        lambda c: (c.dim,),
        ("embed",),
        "ones",
        "model.layers.{l}.post_attention_layernorm.weight",
        "layers.{l}.ffn_norm.weight",
        _same,
    ),
    Weight(
        "layers/feed_forward/w1",
        lambda c: (c.dim, c.hidden_dim),
        ("embed", "mlp"),
        "normal",
        "model.layers.{l}.mlp.gate_proj.weight",
        "layers.{l}.feed_forward.w1.weight",
        _linear,
        n_in=1,
    ),
    Weight(
        "layers/feed_forward/w2",
        lambda c: (c.hidden_dim, c.dim),
        ("mlp", "embed"),
        "normal",
        "model.layers.{l}.mlp.down_proj.weight",
        "layers.{l}.feed_forward.w2.weight",
        _linear,
        n_in=1,
    ),
    Weight(
        "layers/feed_forward/w3",
        lambda c: (c.dim, c.hidden_dim),
        ("embed", "mlp"),
        "normal",
        "model.layers.{l}.mlp.up_proj.weight",
        "layers.{l}.feed_forward.w3.weight",
        _linear,
        n_in=1,
    ),
    Weight("norm/scale", lambda c: (c.dim,), ("embed",), "ones", "model.norm.weight", "norm.weight", _same),
    Weight(
        "output/kernel",
        lambda c: (c.dim, c.vocab_size),
        ("embed", "vocab"),
        "normal",
        "lm_head.weight",
        "output.weight",
        _linear,
        n_in=1,
    ),
)
BY_PATH = {w.path: w for w in WEIGHTS}


def weights(config: MistralConfig) -> tuple[Weight, ...]:
    """The weights of `config` (a tied model has no output head)."""
    return tuple(w for w in WEIGHTS if not (config.tie_embeddings and w.path == "output/kernel"))


# ---- trees by path ------------------------------------------------------------------------------------------


def tree_get(tree: dict, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def tree_set(tree: dict, path: str, value) -> None:
    *parents, last = path.split("/")
    for k in parents:
        tree = tree.setdefault(k, {})
    tree[last] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build(config: MistralConfig, leaf: Callable[[Weight], Any]) -> Params:
    """The param tree of `config` with leaf(weight) at each leaf."""
    tree: Params = {}
    for w in weights(config):
        tree_set(tree, w.path, leaf(w))
    return tree


# ---- derived trees ------------------------------------------------------------------------------------------


def leaf_shapes(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    """Leaf path -> full shape (stacked layers lead with L)."""
    return {w.path: w.full_shape(config) for w in weights(config)}


def param_shapes(config: MistralConfig, dtype: str = "float32") -> Params:
    """The param tree as jax.ShapeDtypeStruct leaves (no memory)."""
    import jax

    return build(config, lambda w: jax.ShapeDtypeStruct(w.full_shape(config), np.dtype(_np_dtype(dtype))))


def param_logical_axes(config: MistralConfig) -> Params:
    """The param tree with a tuple of logical axis names at each leaf, e.g. ('layers', 'embed', 'heads', 'head_dim')."""
    return build(config, lambda w: w.full_axes())


def init_params(config: MistralConfig, rng, dtype: str = "float32") -> Params:
    """Random params: projections and embeddings normal with std 0.02, norm scales 1. Pure (jit it with
    out_shardings to create them sharded)."""
    import jax
    import jax.numpy as jnp

    ws = weights(config)
    keys = dict(zip((w.path for w in ws), jax.random.split(rng, len(ws))))

    def leaf(w: Weight):
        shape = w.full_shape(config)
        if w.init == "ones":
            return jnp.ones(shape, dtype)
        return (0.02 * jax.random.normal(keys[w.path], shape, jnp.float32)).astype(dtype)

    return build(config, leaf)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)
