"""Our format: mistral_jax.json (MistralConfig.to_dict()) + params/, an orbax PyTree checkpoint of the param tree.

`save` is crash-safe on one process (written beside the destination and swapped in at the end); on several
processes each writes its own shards into one checkpoint (orbax coordinates the commit). `restore` reads leaf
by leaf, each straight into its dtype and sharding, after checking every leaf's shape against the config.
Checkpoints written by v0.1 load unchanged: the tree is the same and their extra config keys are ignored.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from .. import distributed
from .. import params as params_lib
from ..config import MistralConfig
from . import files
from .files import ORBAX_CONFIG, ORBAX_PARAMS, CheckpointError, check_tree


def _ocp():
    import orbax.checkpoint as ocp  # slow to import, and only needed here

    return ocp


def _checkpointer():
    """A synchronous orbax PyTree checkpointer that adds no host copy of the weights while saving: orbax's
    defaults deep-copy numpy leaves before writing and hold every compressed chunk until the commit. The save
    is synchronous, so the copy guards nothing; compression gains little on trained weights, so it is off."""
    ocp = _ocp()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))


def _write(params_dir: str, params: dict, force: bool = False) -> None:
    with _checkpointer() as ckptr:
        ckptr.save(params_dir, args=_ocp().args.PyTreeSave(params), force=force)


def save(path: str, params: dict, config: MistralConfig, *, tokenizer: str | None = None,
         overwrite: bool = True) -> None:
    """Saves params (jax or numpy leaves, any sharding) as our orbax checkpoint: mistral_jax.json + params/,
    and the tokenizer (a file, or a checkpoint directory whose tokenizer files come along).

    One process: everything is written into `.{name}.partial` next to `path` and moved into place at the end,
    so a crash leaves any previous checkpoint intact. Several processes (every one calls this): each writes
    the shards its devices hold straight into `path` (shared by all, so no swap); process 0 writes the config
    and tokenizer. A crash there leaves no commit marker in params/, and restore fails naming the directory."""
    check_tree(params, config)
    if jax.process_count() == 1:
        with files.atomic_dir(path, overwrite) as tmp:
            _write(os.path.join(tmp, ORBAX_PARAMS), params)
            files.write_json(os.path.join(tmp, ORBAX_CONFIG), config.to_dict())
            files.copy_tokenizer(tmp, tokenizer)
        return
    path = os.path.abspath(os.fspath(path))
    files.check_replaceable(path, overwrite)
    distributed.barrier("mistral_jax.checkpoint.save.check")  # before process 0 creates anything
    if distributed.is_main():
        os.makedirs(path, exist_ok=True)
    distributed.barrier("mistral_jax.checkpoint.save.mkdir")
    _write(os.path.join(path, ORBAX_PARAMS), params, force=True)
    if distributed.is_main():
        files.write_json(os.path.join(path, ORBAX_CONFIG), config.to_dict())
        files.copy_tokenizer(path, tokenizer)
    distributed.barrier("mistral_jax.checkpoint.save.done")


def _metadata(params_dir: str, ckptr) -> dict:
    return params_lib.flatten(dict(ckptr.metadata(params_dir).item_metadata.tree))


def stored_dtype(path: str) -> str:
    """The dtype name of the checkpoint's final norm scale (every leaf has the params' dtype)."""
    with _checkpointer() as ckptr:
        meta = _metadata(os.path.join(os.path.abspath(path), ORBAX_PARAMS), ckptr)
    return np.dtype(meta["norm/scale"].dtype).name


def restore(path: str, config: MistralConfig, dtype: np.dtype, shardings=None) -> dict:
    """The param tree of jax.Arrays of `dtype`, each placed with its sharding in `shardings` (a tree like the
    params; None: the first device). Every process reads only the slices its devices hold."""
    ocp = _ocp()
    pdir = os.path.join(os.path.abspath(path), ORBAX_PARAMS)
    want = params_lib.leaf_shapes(config)
    with _checkpointer() as ckptr:
        meta = _metadata(pdir, ckptr)
        for leaf, shape in want.items():
            if leaf not in meta:
                raise CheckpointError(f"{pdir}: missing array {leaf!r} (expected shape {shape})")
            if tuple(meta[leaf].shape) != shape:
                raise CheckpointError(f"{pdir}: array {leaf!r} has shape {tuple(meta[leaf].shape)}, "
                                      f"expected {shape}")
        unexpected = sorted(set(meta) - set(want))
        if unexpected:
            raise CheckpointError(f"{pdir}: unexpected array {unexpected[0]!r} for the config")
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params: dict = {}
        for leaf, shape in want.items():
            s = default if shardings is None else params_lib.tree_get(shardings, leaf)
            target: dict = {}
            params_lib.tree_set(target, leaf, jax.ShapeDtypeStruct(shape, dtype, sharding=s))
            # One leaf per restore: orbax stages everything one restore asks for in host memory before the
            # device copies, so leaf by leaf the staging is one leaf. tensorstore casts while reading.
            args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(
                target), partial_restore=True)
            params_lib.tree_set(params, leaf, params_lib.tree_get(ckptr.restore(pdir, args=args), leaf))
        return params
