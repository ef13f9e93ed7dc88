"""Platform tuning: the one place where a loaded model is adapted to the machine it runs on.

`for_inference(params, mesh)` is applied once, when a model is loaded for inference (api.load_model), and
returns params that model.forward computes the same logits from (tests/test_tuning.py). Both tunings below
apply on one CPU device only; on TPU and GPU the plain stacked params are what runs.

  per-layer params (PerLayer): the stacked layer params [L, ...] become L per-layer trees, which bring
    their own loop over the layers to model.run_layers. Inside a scanned layer XLA:CPU copies each layer's
    weights out of the stack before its products, so a decode step reads every weight three times, not once.
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

from . import params as params_lib
from .sharding import ModelMesh

TUNINGS = ("per_layer", "out_major")
FEW_ROWS = 64  # one-position products of at most this many rows take the W x^T form


def on_one_cpu_device(mesh: ModelMesh) -> bool:
    devices = mesh.mesh.devices.flat
    return mesh.size == 1 and next(iter(devices)).platform == "cpu"


def for_inference(params, mesh: ModelMesh, tunings: tuple[str, ...] = TUNINGS):
    """`params` as they run fastest for inference on `mesh`'s devices (see the module docstring); `tunings`
    picks a subset, for benchmarks."""
    unknown = set(tunings) - set(TUNINGS)
    if unknown:
        raise ValueError(f"unknown tunings {sorted(unknown)}; known: {TUNINGS}")
    if not on_one_cpu_device(mesh) or isinstance(params["layers"], PerLayer) or not tunings:
        return params
    out_major = "out_major" in tunings
    if "per_layer" in tunings:
        params = {**params, "layers": per_layer(params["layers"], out_major)}
    return _out_major(params) if out_major else params


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


def per_layer(layers, out_major: bool = False) -> PerLayer:
    """Stacked layer params [L, ...] -> L trees, leaf by leaf so that memory peaks near one copy of
    the weights plus one leaf. The slices are taken on the host: indexing the device array would compile a
    program per leaf shape."""
    leaves = params_lib.flatten(layers)
    n = next(iter(leaves.values())).shape[0]
    per: list[dict] = [{} for _ in range(n)]
    for path, leaf in leaves.items():
        n_in = params_lib.BY_PATH["layers/" + path].n_in if out_major else 0
        host = np.asarray(leaf)
        sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
        # Strided copies, one layer per thread: numpy releases the GIL while it copies.
        put = functools.partial(_put_moved, sharding=sharding and _drop_layer(sharding), start=0, n_in=n_in)
        moved = _pool().map(put, host)
        for i, one in enumerate(moved):
            params_lib.tree_set(per[i], path, OutMajorWeight(one, n_in) if n_in else one)
        if isinstance(leaf, jax.Array):
            leaf.delete()
        del host
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
    with the spec moved alike. The one copy goes into a 64-byte aligned buffer, which a CPU device then takes
    as its own without a second copy."""
    perm = [i for i in range(host.ndim) if not start <= i < start + n_in] + list(range(start, start + n_in))
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = (*sharding.spec, *[None] * (host.ndim - len(sharding.spec)))
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*(spec[i] for i in perm)))
    host = host.transpose(perm)
    buf = np.empty(host.nbytes + 64, np.uint8)
    at = -buf.ctypes.data % 64
    out = buf[at : at + host.nbytes].view(host.dtype).reshape(host.shape)
    out[...] = host
    return jax.device_put(out, sharding)


def _drop_layer(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding
