"""Our format: mistral_jax.json (MistralConfig.to_dict()) + params/, an orbax PyTree checkpoint of the param tree.

`save` is crash-safe on one process (written beside the destination and swapped in at the end); on several
processes each writes its own shards into one checkpoint (orbax coordinates the commit). `restore` reads leaf
by leaf, each straight into its dtype and sharding, after checking every leaf's shape against the config.
Beside params/, mistral_jax.checksums.json holds each array's checksum (integrity.py), checked on restore
with a count of non-finite values. Checkpoints written by v0.1 load unchanged: the tree is the same, their
extra config keys are ignored, and without checksums only the non-finite count is checked.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np

from .. import distributed
from .. import params as params_lib
from ..config import MistralConfig
from . import files, integrity
from .files import ORBAX_CONFIG, ORBAX_PARAMS, CheckpointError, check_tree, reason


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


def _checksums(params: dict) -> dict:
    """The checksums file's content; every process computes it (sharded arrays are summed where they lie)."""
    arrays = {}
    for leaf, x in params_lib.flatten(params).items():
        arrays[leaf] = {"dtype": np.dtype(x.dtype).name, "checksum": integrity.stats(x)[1]}
    return {"algorithm": integrity.ALGORITHM, "arrays": arrays}


def save(
    path: str, params: dict, config: MistralConfig, *, tokenizer: str | None = None, overwrite: bool = True
) -> None:
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
            files.write_json(os.path.join(tmp, integrity.CHECKSUMS), _checksums(params))
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
    sums = _checksums(params)
    if distributed.is_main():
        files.write_json(os.path.join(path, integrity.CHECKSUMS), sums)
        files.write_json(os.path.join(path, ORBAX_CONFIG), config.to_dict())
        files.copy_tokenizer(path, tokenizer)
    distributed.barrier("mistral_jax.checkpoint.save.done")


# Files orbax cannot restore without; with OCDBT (ocdbt.process_* / d/) the database's manifest too.
REQUIRED = ("_METADATA",)
OCDBT_REQUIRED = ("manifest.ocdbt",)


def _metadata(params_dir: str, ckptr) -> dict:
    """{leaf: orbax array metadata}; CheckpointError naming a missing or unreadable file."""
    found = set(os.listdir(params_dir))
    required = REQUIRED + (OCDBT_REQUIRED if any(f.startswith("ocdbt.") or f == "d" for f in found) else ())
    missing = [f for f in required if f not in found]
    if missing:
        raise CheckpointError(f"{params_dir}: incomplete orbax checkpoint, missing {', '.join(missing)}")
    try:
        item = ckptr.metadata(params_dir).item_metadata  # None for metadata orbax cannot parse
        why = ""
    except Exception as e:  # or its parser's error
        item, why = None, f" ({reason(e)})"
    if item is None or getattr(item, "tree", None) is None:
        raise CheckpointError(
            f"{params_dir}: unreadable orbax metadata{why}; one of {', '.join(sorted(found))} is corrupt"
        )
    return params_lib.flatten(dict(item.tree))


def _checksum_file(path: str) -> dict:
    """{leaf: {"dtype", "checksum"}} written with the checkpoint; {} for checkpoints without (v0.1)."""
    fname = os.path.join(path, integrity.CHECKSUMS)
    if not os.path.exists(fname):
        return {}
    data = files.read_json(fname, "checksum file")
    arrays = data.get("arrays") if isinstance(data, dict) else None
    if not (
        isinstance(data, dict)
        and data.get("algorithm") == integrity.ALGORITHM
        and isinstance(arrays, dict)
        and all(isinstance(v, dict) for v in arrays.values())
    ):
        raise CheckpointError(
            f"{fname}: corrupt checksum file (expected algorithm {integrity.ALGORITHM!r} "
            "and 'arrays' of {'dtype', 'checksum'})"
        )
    return arrays


def stored_dtype(path: str) -> str:
    """The dtype name of the checkpoint's final norm scale (every leaf has the params' dtype)."""
    pdir = os.path.join(os.path.abspath(path), ORBAX_PARAMS)
    with _checkpointer() as ckptr:
        meta = _metadata(pdir, ckptr)
    if "norm/scale" not in meta:
        raise CheckpointError(f"{pdir}: missing array 'norm/scale'")
    return np.dtype(meta["norm/scale"].dtype).name


def _read(ckptr, pdir: str, leaf: str, shape, dtype, sharding) -> jax.Array:
    """One array, straight into its sharding (tensorstore casts while reading)."""
    ocp = _ocp()
    target: dict = {}
    params_lib.tree_set(target, leaf, jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    # One leaf per restore: orbax stages everything one restore asks for in host memory before the device
    # copies, so leaf by leaf the staging is one leaf.
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    try:
        return params_lib.tree_get(ckptr.restore(pdir, args=args), leaf)
    except Exception as e:  # tensorstore's errors carry its whole spec; the status code is what says why
        cause = e.__cause__ or e.__context__ or e
        m = re.match(r"([A-Z_]{4,}):", str(cause))  # NOT_FOUND, OUT_OF_RANGE, DATA_LOSS...
        code = m.group(1) if m else type(cause).__name__
        raise CheckpointError(
            f"{pdir}: cannot read array {leaf!r}: a data file is missing, truncated or corrupt ({code})"
        ) from None


def _check(path: str, leaf: str, x: jax.Array, want: dict | None) -> None:
    """CheckpointError if `x` does not match its saved checksum or holds NaN/inf."""
    bad, checksum = integrity.stats(x)
    if want is not None and (want.get("dtype") != np.dtype(x.dtype).name or want.get("checksum") != checksum):
        raise CheckpointError(
            f"{path}: array {leaf!r} does not match the checksum saved with it "
            f"({integrity.CHECKSUMS}): its data file is corrupt"
        )
    if bad:
        raise CheckpointError(
            f"{path}: array {leaf!r} has {bad} non-finite values (NaN/inf) of {x.size}; "
            "load with check_finite=False (--no-check) to accept them"
        )


def restore(path: str, config: MistralConfig, dtype: np.dtype, shardings=None, check_finite: bool = True) -> dict:
    """The param tree of jax.Arrays of `dtype`, each placed with its sharding in `shardings` (a tree like the
    params; None: the first device). Every process reads only the slices its devices hold.

    `check_finite`: each array is read in its stored dtype, checked against its checksum and for NaN/inf on
    its devices, then cast (so a leaf stored wider than `dtype` briefly takes its stored size there)."""
    pdir = os.path.join(os.path.abspath(path), ORBAX_PARAMS)
    want = params_lib.leaf_shapes(config)
    sums = _checksum_file(path) if check_finite else {}
    with _checkpointer() as ckptr:
        meta = _metadata(pdir, ckptr)
        for leaf, shape in want.items():
            if leaf not in meta:
                raise CheckpointError(f"{pdir}: missing array {leaf!r} (expected shape {shape})")
            if tuple(meta[leaf].shape) != shape:
                raise CheckpointError(f"{pdir}: array {leaf!r} has shape {tuple(meta[leaf].shape)}, expected {shape}")
        unexpected = sorted(set(meta) - set(want))
        if unexpected:
            raise CheckpointError(f"{pdir}: unexpected array {files.short(unexpected[0])} for the config")
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params: dict = {}
        for leaf, shape in want.items():
            s = default if shardings is None else params_lib.tree_get(shardings, leaf)
            if not check_finite:
                params_lib.tree_set(params, leaf, _read(ckptr, pdir, leaf, shape, dtype, s))
                continue
            x = _read(ckptr, pdir, leaf, shape, np.dtype(meta[leaf].dtype), s)
            if sums and leaf not in sums:
                raise CheckpointError(f"{path}: {integrity.CHECKSUMS} has no checksum for array {leaf!r}")
            _check(path, leaf, x, sums.get(leaf))
            if x.dtype != dtype:
                x = integrity.cast(x, dtype)
                bad = int(integrity.nonfinite(x))
                if bad:
                    raise CheckpointError(
                        f"{path}: array {leaf!r}: {bad} values overflow {dtype} (finite as "
                        "stored, infinite after the cast); load it in a wider dtype"
                    )
            params_lib.tree_set(params, leaf, x)
        return params
