"""Platform tuning: the one place where a loaded model is adapted to the machine it runs on.

`for_inference(params, mesh)` is applied once, when a model is loaded for inference (api.load_model), and
returns params that model.forward computes the same logits from (tests/test_tuning.py).

One tuning is kept:
  per-layer params on one CPU device: the stacked layer params [L, ...] become a tuple of L per-layer trees,
  which model.run_layers loops over. Inside a scanned layer XLA:CPU copies each layer's weights out of the
  stack before its products, so a decode step reads every weight three times instead of once. On TPU and
  GPU the scanned layer reads the stack in place, and the per-layer form costs compile time and memory.
"""

from __future__ import annotations

import jax
import numpy as np

from .sharding import ModelMesh


def on_one_cpu_device(mesh: ModelMesh) -> bool:
    devices = mesh.mesh.devices.flat
    return mesh.size == 1 and next(iter(devices)).platform == "cpu"


def for_inference(params, mesh: ModelMesh):
    """`params` as they run fastest for inference on `mesh`'s devices (see the module docstring)."""
    if on_one_cpu_device(mesh) and not isinstance(params["layers"], (list, tuple)):
        return {**params, "layers": per_layer(params["layers"])}
    return params


def per_layer(layers) -> tuple:
    """Stacked layer params [L, ...] -> a tuple of L trees, leaf by leaf so that memory peaks near one copy of
    the weights plus one leaf. The slices are taken on the host: indexing the device array would compile a
    program per leaf shape."""
    leaves, treedef = jax.tree.flatten(layers)
    n = leaves[0].shape[0]
    per = [[] for _ in range(n)]
    for leaf in leaves:
        host = np.asarray(leaf)
        sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
        for i in range(n):
            per[i].append(jax.device_put(np.ascontiguousarray(host[i]), sharding and _drop_layer(sharding)))
        if isinstance(leaf, jax.Array):
            leaf.delete()
        del host
    return tuple(jax.tree.unflatten(treedef, xs) for xs in per)


def _drop_layer(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding
