"""Platform tuning: the one place where a loaded model is adapted to the machine it runs on.

`for_inference(params, mesh)` is applied once, when a model is loaded for inference (api.load_model, through
`load_for_inference`, which reads a safetensors checkpoint straight into the tuned layout), and returns params
that model.forward computes the same logits from (tests/test_tuning.py). Which tunings apply depends on the
devices (default_tunings): both on one CPU device, per-layer params on GPUs, none on TPUs, where the plain
stacked params are what runs.

  per-layer params (PerLayer): the stacked layer params [L, ...] become L per-layer trees, which bring
    their own loop over the layers to model.run_layers. Inside a scanned layer XLA:CPU and XLA:GPU copy each
    layer's weights out of the stack before its products, so a decode step reads every weight three times.
  out-major projections (OutMajorWeight): each projection weight is held [out..., in...] and brings its own
    product (as lora.LoraWeight does). XLA:CPU's matmul library streams the weight fastest as the left
    operand of a few-row product, W x^T; its transpose back is kept apart from the product, or XLA folds it
    in and swaps the operands back. Decode's products (one position per row) take that form.
bench/generate_bench.py --tuning measures each against the plain path.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import checkpoint
from . import params as params_lib
from .checkpoint import safetensors
from .checkpoint.files import np_dtype
from .config import MistralConfig
from .sharding import ModelMesh

TUNINGS = ("per_layer", "out_major")
FEW_ROWS = 64  # one-position products of at most this many rows take the W x^T form


def on_one_cpu_device(mesh: ModelMesh) -> bool:
    devices = mesh.mesh.devices.flat
    return mesh.size == 1 and next(iter(devices)).platform == "cpu"


def default_tunings(mesh: ModelMesh) -> tuple[str, ...]:
    """The tunings that pay on `mesh`'s devices (bench/generate_bench.py --tuning on the CPU,
    bench/device_check.py on a GPU): both on one CPU device, per-layer params on GPUs, none on TPUs."""
    if on_one_cpu_device(mesh):
        return TUNINGS
    if {d.platform for d in mesh.mesh.devices.flat} == {"gpu"}:
        return ("per_layer",)
    return ()


def for_inference(params, mesh: ModelMesh, tunings: tuple[str, ...] | None = None):
    """`params` as they run fastest for inference on `mesh`'s devices (see the module docstring); `tunings`
    (default: default_tunings(mesh)) picks a subset, for benchmarks and tests."""
    tunings = default_tunings(mesh) if tunings is None else tunings
    unknown = set(tunings) - set(TUNINGS)
    if unknown:
        raise ValueError(f"unknown tunings {sorted(unknown)}; known: {TUNINGS}")
    if isinstance(params["layers"], PerLayer) or not tunings:
        return params
    out_major = "out_major" in tunings
    if out_major and not on_one_cpu_device(mesh):
        raise ValueError("the out_major tuning is for one CPU device")
    if "per_layer" in tunings:
        params = {**params, "layers": per_layer(params["layers"], out_major, on_host=on_one_cpu_device(mesh))}
    return _out_major(params) if out_major else params


def load_for_inference(path: str, config: MistralConfig, dtype: str, mesh: ModelMesh, *, check_finite: bool = True):
    """for_inference(checkpoint.load_params(...)). Where both tunings apply (one CPU device), from a transformers
    or native checkpoint, in one pass: the projections are read in the checkpoints' [out, in] order, which is
    the out-major one, and each layer's slice goes to the device where it lies, without the two transposing
    copies."""
    path = os.fspath(path)
    fmt = checkpoint.detect_format(path)
    if fmt == "orbax" or default_tunings(mesh) != TUNINGS:
        params = checkpoint.load_params(path, config, dtype, mesh.param_shardings, check_finite=check_finite)
        return for_inference(params, mesh)
    out: dict = {}
    layers: list[dict] = [{} for _ in range(config.n_layers)]
    with safetensors.open_checked(path, fmt, config) as source:
        leaves = safetensors.host_leaves(source, fmt, config, np_dtype(dtype), check_finite, stored_order=True)
        for w, host in leaves:
            order = safetensors.inputs_last(host.ndim, int(w.layered), w.n_in)
            moved = host.transpose(order)  # C order: a CPU device takes its aligned slices as they lie
            sharding = _moved_sharding(params_lib.tree_get(mesh.param_shardings, w.path), order)
            if not w.layered:
                params_lib.tree_set(out, w.path, _as_weight(jax.device_put(moved, sharding), w.n_in))
                continue
            sharding, path_in_layer = _drop_layer(sharding), w.path.split("/", 1)[1]
            for i, one in enumerate(moved):
                params_lib.tree_set(layers[i], path_in_layer, _as_weight(jax.device_put(one, sharding), w.n_in))
    out["layers"] = PerLayer(tuple(layers))
    return out


def _as_weight(x, n_in: int):
    return OutMajorWeight(x, n_in) if n_in else x


@struct.dataclass
class PerLayer:
    """Layer params held as one tree per layer; model.run_layers calls `run`."""

    layers: tuple

    def run(self, layer, carry):
        """layer(carry, (params of layer i, i)) -> (carry, y) over every layer, as one traced layer called L
        times (inlined); returns (carry, the ys stacked)."""
        step = jax.jit(layer)
        ys = []
        for i, p in enumerate(self.layers):
            carry, y = step(carry, (p, jnp.int32(i)))
            ys.append(y)
        return carry, None if ys[0] is None else jnp.stack(ys)

    def layer(self, i: int):
        return self.layers[i]


def per_layer(layers, out_major: bool = False, on_host: bool = False) -> PerLayer:
    """Stacked layer params [L, ...] -> L trees, leaf by leaf so that memory peaks near one copy of
    the weights plus one leaf. `on_host` (one CPU device): the layers are copied on the host into aligned
    buffers, projections out-major when `out_major`; else each leaf's layers are sliced on its devices by one
    small compiled program per leaf."""
    leaves = params_lib.flatten(layers)
    n = next(iter(leaves.values())).shape[0]
    per: list[dict] = [{} for _ in range(n)]
    for path, leaf in leaves.items():
        n_in = params_lib.BY_PATH["layers/" + path].n_in if out_major else 0
        sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
        if on_host:
            # Strided copies, one layer per thread: numpy releases the GIL while it copies.
            put = functools.partial(_put_moved, sharding=sharding and _drop_layer(sharding), start=0, n_in=n_in)
            moved = list(_pool().map(put, np.asarray(leaf)))
        else:
            take = _take(sharding and _drop_layer(sharding))
            moved = [take(leaf, np.int32(i)) for i in range(n)]
        for i, one in enumerate(moved):
            params_lib.tree_set(per[i], path, _as_weight(one, n_in))
        if isinstance(leaf, jax.Array):
            jax.block_until_ready(moved)
            leaf.delete()
    return PerLayer(tuple(per))


@struct.dataclass
class OutMajorWeight:
    """A projection weight [in..., out...] held as w [out..., in...]; model.project calls `project`."""

    w: jax.Array  # [out..., in...]
    n_in: int = struct.field(pytree_node=False)  # trailing input axes of w

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight it stands for, [in..., out...]."""
        k = self.w.ndim - self.n_in
        return (*self.w.shape[k:], *self.w.shape[:k])

    def reshape(self, *shape) -> OutMajorWeight:
        """The weight reshaped as an [in..., out...] array would be, its input and output axes each merged or
        split within themselves."""
        shape = np.empty(self.shape, np.int8).reshape(*shape).shape
        n_in, k, size = math.prod(self.shape[: self.n_in]), 0, 1
        while size < n_in:
            size *= shape[k]
            k += 1
        if size != n_in:
            raise ValueError(f"OutMajorWeight.reshape: {shape} mixes input and output axes of {self.shape}")
        return OutMajorWeight(self.w.reshape(*shape[k:], *shape[:k]), k)

    def project(self, eq: str, x):
        xs, rest = eq.split(",")
        ws, out = rest.split("->")
        w_in, w_out = ws[: self.n_in], ws[self.n_in :]
        w = self.w.astype(x.dtype)
        if not (xs.endswith(w_in) and out == xs[: len(xs) - self.n_in] + w_out):
            return jnp.einsum(f"{xs},{w_out}{w_in}->{out}", x, w)
        lead, out_shape = x.shape[: x.ndim - self.n_in], w.shape[: w.ndim - self.n_in]
        x2 = x.reshape(math.prod(lead), -1)
        w2 = w.reshape(math.prod(out_shape), -1)
        contract = (((1,), (1,)), ((), ()))
        # Decode's products only (one position per row): a row's result then never depends on its batch.
        if lead and lead[-1] == 1 and x2.shape[0] <= FEW_ROWS:
            y = jax.lax.optimization_barrier(jax.lax.dot_general(w2, x2, contract)).T
        else:
            y = jax.lax.dot_general(x2, w2, contract)
        return y.reshape(*lead, *out_shape)


@functools.cache
def _take(sharding):
    """Layer i of a stacked leaf onto `sharding`: one program per leaf shape, shared by leaves alike."""
    return jax.jit(lambda w, i: w[i], out_shardings=sharding)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="mistral-jax-tuning")


def _out_major(params):
    """`params` with each projection leaf that is still an array (stacked layers included) as an
    OutMajorWeight; layers already per layer (PerLayer) are kept as they are."""
    out: dict = {}
    for path, leaf in params_lib.flatten(params).items():
        weight = params_lib.BY_PATH.get(path)
        if weight is not None and weight.n_in:
            sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
            leaf = OutMajorWeight(_put_moved(np.asarray(leaf), sharding, int(weight.layered), weight.n_in), weight.n_in)
        params_lib.tree_set(out, path, leaf)
    return out


def _put_moved(host: np.ndarray, sharding, start: int, n_in: int):
    """`host` with its axes [start, start + n_in) moved last (none when n_in is 0), onto `sharding`'s devices
    with the spec moved alike, through one copy into an aligned buffer (which the CPU device adopts)."""
    perm = safetensors.inputs_last(host.ndim, start, n_in)
    out = safetensors.aligned_empty(tuple(host.shape[i] for i in perm), host.dtype)
    out[...] = host.transpose(perm)
    return jax.device_put(out, _moved_sharding(sharding, perm))


def _moved_sharding(sharding, perm):
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = (*sharding.spec, *[None] * (len(perm) - len(sharding.spec)))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*(spec[i] for i in perm)))
    return sharding


def _drop_layer(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding
