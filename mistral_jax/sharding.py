"""Device meshes and the one table that maps the model's logical axes onto them.

The mesh has three axes, always in this order:
  data    pure data parallelism: the batch is split, every weight is replicated.
  fsdp    data parallelism with sharded state: the batch is split AND every weight (and optimizer state) is
          split along its `embed` dimension; XLA gathers one layer's weights just before using them.
  tensor  tensor (Megatron) parallelism: heads, the MLP hidden dimension and the vocabulary are split, so one
          matmul runs on several devices and their partial results are summed.

Model code names logical axes only (`batch`, `embed`, `heads`, ... see model.py); `RULES` below turns those
names into mesh axes. The names take effect only inside `activate(mesh, rules)` (jax.set_mesh + flax's
logical_axis_rules), which the tools and the trainer wrap around the calls that trace jitted functions.

  mm = ModelMesh.build(config, "data=2,fsdp=2,tensor=2")   # -1 = the rest; default: every device on fsdp
  mm = mesh_choice.default_mesh(config, "generate")        # the inference tools' default: data x tensor
  params = checkpoint.load_params(path, config, dtype, shardings=mm.param_shardings)
  with mm.activate():
      cache = mm.cache(batch, slots, dtype)                   # a KVCache created sharded
      rows = mm.fetch(program(params, mm.place(host_batch)))

Every tool, training included, builds a ModelMesh (one device is a mesh of one) and passes it as one object.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import params as params_lib
from .config import MistralConfig
from .kv_cache import KVCache

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Order matters: an array takes the first rule for each of its dimensions whose
# mesh axes no earlier dimension of the same array has used (flax's logical_to_mesh_axes). So an activation
# [batch, length, embed] gives fsdp to `batch` and leaves `embed` whole, while a weight [embed, mlp], having
# no batch dimension, is split over fsdp along `embed`: that is FSDP.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),  # activations, KV cache, per-row inputs and outputs
    ("vocab", "tensor"),  # embedding rows, output head columns, logits
    ("heads", "tensor"),  # query heads (wq, wo, attention activations)
    ("kv_heads", "tensor"),  # KV heads (wk, wv, KV cache); replicated when they do not divide, below
    ("mlp", "tensor"),  # SwiGLU hidden dimension
    ("embed", "fsdp"),  # model dimension of every weight (FSDP)
    ("length", None),  # sequence positions: no sequence parallelism
    ("cache_length", None),  # KV cache slots
    ("head_dim", None),
    ("layers", None),  # stacked layers of nn.scan: every device holds every layer's shard
    ("lora_rank", None),  # LoRA adapters: the rank is tiny, the other dimension carries the split
)

# Logical axes of the KV cache's fields (kv_cache.KVCache: k, v [L, B, K, S, H], pos [B, S]).
CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    "pos": ("batch", "cache_length"),
}

# For the error messages: the config field behind each logical axis that the rules split.
_FIELD = {"vocab": "vocab_size", "heads": "n_heads", "kv_heads": "n_kv_heads", "mlp": "hidden_dim", "embed": "dim"}


class ShardingError(ValueError):
    """A mesh that does not fit the devices or the model; the message names the axis and the sizes."""


# ---- the mesh ----------------------------------------------------------------------------------------------


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
    """'data=2,fsdp=-1' -> {'data': 2, 'fsdp': N/2, 'tensor': 1}. Missing axes are 1; one axis may be -1 (the
    rest of the devices); None or '' puts every device on fsdp. The product may be below `num_devices` (the
    first devices are used) but not above."""
    if not spec:
        return {"data": 1, "fsdp": num_devices, "tensor": 1}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ShardingError(
                f"--mesh {spec!r}: bad entry {part!r}; expected name=size with name one of "
                f"{', '.join(MESH_AXES)}, e.g. data=2,fsdp=2,tensor=2"
            )
        if name in sizes:
            raise ShardingError(f"--mesh {spec!r}: axis {name} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ShardingError(f"--mesh {spec!r}: size of {name} must be an int or -1, got {value!r}") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ShardingError(f"--mesh {spec!r}: size of {name} must be positive or -1, got {sizes[name]}")
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ShardingError(f"--mesh {spec!r}: only one axis may be -1, got {', '.join(rest)}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % known:
            raise ShardingError(
                f"--mesh {spec!r}: {rest[0]}=-1 takes the rest of the devices, but {num_devices} "
                f"devices do not divide by the other axes' product {known}"
            )
        sizes[rest[0]] = num_devices // known
    out = {a: sizes.get(a, 1) for a in MESH_AXES}
    if math.prod(out.values()) > num_devices:
        raise ShardingError(
            f"--mesh {spec!r} needs {math.prod(out.values())} devices "
            f"({'x'.join(str(v) for v in out.values())}), but {num_devices} are available"
        )
    return out


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) from a spec string (see parse_mesh) or a {axis: size} dict.

    Axes are `Auto`: XLA propagates shardings from the inputs and the constraints, as the model expects
    (jax.make_mesh would default to Explicit axes, which need sharding in types)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = (
        parse_mesh(spec, len(devices))
        if spec is None or isinstance(spec, str)
        else {a: int(spec.get(a, 1)) for a in MESH_AXES}
    )
    n = math.prod(sizes.values())
    if n < len(devices) and jax.process_count() > 1:
        raise ShardingError(
            f"--mesh {spec!r} uses {n} of {len(devices)} devices; on several hosts the mesh must use every device"
        )
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:n]
    )


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """{axis: size} of a Mesh, or of a dict (the memory plan works on sizes alone, without devices)."""
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    return {a: int(shape.get(a, 1)) for a in MESH_AXES}


def describe(mesh: Mesh | Mapping[str, int]) -> str:
    return ",".join(f"{a}={s}" for a, s in mesh_sizes(mesh).items())


def data_parallel_size(mesh: Mesh | Mapping[str, int]) -> int:
    """How many ways the batch is split (data x fsdp)."""
    s = mesh_sizes(mesh)
    return math.prod(s[a] for a in BATCH_AXES)


def round_batch(batch_size: int, mesh: Mesh | Mapping[str, int]) -> int:
    """`batch_size` rounded up to a multiple of the data-parallel size (the extra rows are padding)."""
    dp = data_parallel_size(mesh)
    return -(-batch_size // dp) * dp


# ---- rules and specs ----------------------------------------------------------------------------------------


def rules_for(config: MistralConfig, mesh: Mesh | Mapping[str, int]) -> tuple[tuple[tuple, ...], list[str]]:
    """(the rules for this model on this mesh, notes saying where they depart from RULES).

    The one departure: KV heads that do not divide over `tensor` (Mistral 7B has 8; a tensor size of 16, or
    a 1-KV-head model on tensor=2) are replicated over `tensor`: every tensor device holds all of wk, wv and
    its batch rows of the KV cache. Query heads stay split, so each device attends its query heads to the
    full set of KV heads; the price is KV memory not shrinking with `tensor`."""
    t = mesh_sizes(mesh)["tensor"]
    if config.n_kv_heads % t == 0:
        return RULES, []
    rules = tuple((name, None if name == "kv_heads" else axes) for name, axes in RULES)
    note = (
        f"kv_heads: n_kv_heads={config.n_kv_heads} does not divide over tensor={t}; wk, wv and the KV cache "
        f"are replicated over tensor (each tensor device holds all {config.n_kv_heads} KV heads)"
    )
    return rules, [note]


def spec_for(names: Sequence[str | None], rules) -> P:
    """Logical axis names -> PartitionSpec (flax's resolution of the rules table)."""
    return nn.logical_to_mesh_axes(tuple(names), rules)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def param_specs(config: MistralConfig, mesh: Mesh | Mapping[str, int], rules=None) -> Any:
    """The param tree with a PartitionSpec at each leaf."""
    rules = rules if rules is not None else rules_for(config, mesh)[0]
    return jax.tree.map(lambda names: spec_for(names, rules), params_lib.param_logical_axes(config), is_leaf=_is_names)


def _axis_size(sizes: Mapping[str, int], entry) -> int:
    if entry is None:
        return 1
    return math.prod(sizes[a] for a in ((entry,) if isinstance(entry, str) else entry))


def shard_shape(shape: Sequence[int], spec: P, mesh: Mesh | Mapping[str, int]) -> tuple[int, ...]:
    """Shape of one device's shard of an array of `shape` laid out by `spec`."""
    sizes = mesh_sizes(mesh)
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(-(-d // _axis_size(sizes, e)) for d, e in zip(shape, entries))


def check_divisible(config: MistralConfig, mesh: Mesh | Mapping[str, int], rules=None) -> None:
    """ShardingError naming the first model dimension that does not split evenly over its mesh axes."""
    rules = rules if rules is not None else rules_for(config, mesh)[0]
    sizes = mesh_sizes(mesh)
    axes = params_lib.param_logical_axes(config)
    shapes = params_lib.param_shapes(config)
    for (path, names), shape in zip(
        jax.tree_util.tree_flatten_with_path(axes, is_leaf=_is_names)[0], jax.tree.leaves(shapes)
    ):
        spec = spec_for(names, rules)
        for dim, name, entry in zip(shape.shape, names, tuple(spec) + (None,) * len(names)):
            n = _axis_size(sizes, entry)
            if dim % n:
                axis = entry if isinstance(entry, str) else "x".join(entry)
                field = _FIELD.get(name, name)
                leaf = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ShardingError(
                    f"mesh {describe(sizes)}: the model's {name} dimension ({field}={dim}, in {leaf} "
                    f"{tuple(shape.shape)}) does not divide over mesh axis {axis} of size {n}; choose a {axis} "
                    f"size that divides {dim}"
                )


def logical_shardings(logical_tree: Any, mesh: Mesh, rules=RULES) -> Any:
    """A tree of logical-name tuples -> the same tree of NamedShardings (e.g. LoRA adapters, whose module
    names their axes, 'lora_rank' for the rank)."""
    return jax.tree.map(lambda names: NamedSharding(mesh, spec_for(names, rules)), logical_tree, is_leaf=_is_names)


def like_params(tree: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree that mirrors the params somewhere inside it (optax state: mu and nu are param
    trees): a leaf whose path ends with a param's path and has its shape gets that param's sharding, any
    other leaf (step counts, scalars) is replicated. Use as out_shardings of a jitted `tx.init`."""
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[tuple(_key(k) for k in path)] = s
    longest = max((len(k) for k in by_path), default=0)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = tuple(_key(k) for k in path)
        for n in range(min(longest, len(keys)), 0, -1):
            s = by_path.get(keys[-n:])
            if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


# ---- activations: the context -----------------------------------------------------------------------------


@contextlib.contextmanager
def activate(mesh: Mesh, rules=RULES):
    """Makes the model's logical constraints real: inside, `nn.with_logical_constraint` becomes
    `jax.lax.with_sharding_constraint` on `mesh`. Wrap every call that traces a jitted function (the first
    call of each shape); outside it the same code runs unconstrained (one device)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


# ---- data in and out ----------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: int, rules=RULES) -> NamedSharding:
    """Rows split over the batch axes, other dimensions whole; scalars replicated."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (ndim - 1), rules) if ndim else P())


def place_batch(mesh: Mesh, *trees, rules=RULES):
    """Host arrays [B, ...] -> global jax.Arrays with rows split over (data, fsdp).

    Every process passes the same full host batch; each builds only the rows its own devices hold
    (make_array_from_callback asks for local shards only). Returns one tree, or a tuple for several."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim, rules), lambda idx: x[idx])

    out = tuple(jax.tree.map(put, t) for t in trees)
    return out[0] if len(out) == 1 else out


def place_local_batch(mesh: Mesh, tree, rules=RULES):
    """Each process's own rows [B/P, ...] -> global arrays [B, ...] (training data: every process reads only
    its share, see distributed.process_shard)."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)

    return jax.tree.map(put, tree)


def fetch(tree):
    """jax.Arrays -> numpy on every process. Arrays spread over several hosts are all-gathered first
    (np.asarray cannot read another host's shards)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def cache_shardings(mesh: Mesh, rules=RULES) -> KVCache:
    """The KV cache's shardings: batch over (data, fsdp), KV heads over tensor."""
    return KVCache(**{k: NamedSharding(mesh, spec_for(names, rules)) for k, names in CACHE_AXES.items()})


@functools.cache
def _cache_init(config: MistralConfig, batch: int, slots: int, dtype: str, shardings: KVCache):
    return jax.jit(functools.partial(KVCache.init, config, batch, slots, dtype), out_shardings=shardings)


# ---- one model on one mesh ------------------------------------------------------------------------------------


class ModelMesh:
    """A mesh with the rules for one model config: what the tools and the trainer hold on to.

    Construction checks that the model divides over the mesh (ShardingError otherwise), so a bad mesh fails
    at start-up, before any weight is read. `notes` says where the rules depart from RULES."""

    def __init__(self, mesh: Mesh, config: MistralConfig):
        self.mesh, self.config = mesh, config
        self.rules, self.notes = rules_for(config, mesh)
        check_divisible(config, mesh, self.rules)
        self.param_specs = param_specs(config, mesh, self.rules)
        self.param_shardings = jax.tree.map(
            lambda s: NamedSharding(mesh, s), self.param_specs, is_leaf=lambda x: isinstance(x, P)
        )

    @property
    def data_parallel_size(self) -> int:
        return data_parallel_size(self.mesh)

    def round_batch(self, batch_size: int) -> int:
        return round_batch(batch_size, self.mesh)

    def activate(self):
        return activate(self.mesh, self.rules)

    @classmethod
    def build(
        cls, config: MistralConfig, spec: str | Mapping[str, int] | None = None, devices: Sequence | None = None
    ) -> ModelMesh:
        """The mesh of `spec` (see parse_mesh; default: every device on fsdp) for `config`."""
        return cls(make_mesh(spec, devices), config)

    @property
    def size(self) -> int:
        return self.mesh.devices.size

    def init_params(self, rng, dtype: str = "float32"):
        """Random params created sharded: the initialiser runs under jit with the param shardings as outputs,
        so no device ever holds the whole model."""
        init = jax.jit(
            functools.partial(params_lib.init_params, self.config, dtype=dtype), out_shardings=self.param_shardings
        )
        with self.activate():
            return init(rng)

    def place(self, *trees):
        return place_batch(self.mesh, *trees, rules=self.rules)

    def place_local(self, tree):
        return place_local_batch(self.mesh, tree, rules=self.rules)

    @staticmethod
    def fetch(tree):
        return fetch(tree)

    def cache(self, batch: int, slots: int, dtype: str = "float32") -> KVCache:
        """An empty KVCache created in place on the mesh."""
        return _cache_init(self.config, batch, slots, dtype, cache_shardings(self.mesh, self.rules))()

    def cache_shardings(self) -> KVCache:
        return cache_shardings(self.mesh, self.rules)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return batch_sharding(self.mesh, ndim, self.rules)

    def logical_shardings(self, logical_tree):
        return logical_shardings(logical_tree, self.mesh, self.rules)

    def like_params(self, tree):
        return like_params(tree, self.param_shardings, self.mesh)
