"""transformers and Mistral-native checkpoints: safetensors files read and written with the `safetensors` package.

Reading is lazy: every file's header is opened and checked first (names, shapes, dtypes, a sharded set's
index), so a bad checkpoint fails before any weight is read, with the file and tensor named. Then the tensors
are read one at a time into the host buffer of one param leaf (cast and rearranged through the leaf's view of
params.py in one pass), and that leaf goes to its devices before the next is read: host memory holds one leaf
beyond what the devices hold.

Writing goes shard by shard (`safetensors.numpy.save_file`): a shard's tensors are copied out of the params,
written, and dropped before the next shard, so an export holds the params plus one shard.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from .. import params as params_lib
from ..config import MistralConfig
from .files import (
    HF_CONFIG,
    HF_INDEX,
    HF_WEIGHTS,
    NATIVE_CONFIG,
    NATIVE_WEIGHTS,
    CheckpointError,
    atomic_dir,
    check_tree,
    copy_tokenizer,
    np_dtype,
    read_json,
    reason,
    short,
    write_json,
)

FLOAT_CODES = ("F64", "F32", "F16", "BF16")
# Tensors some checkpoints carry that are not weights (recomputed from the config): skipped, not an error.
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)
# transformers refuses safetensors files without this metadata.
METADATA = {"format": "pt"}


class Source:
    """The tensors of a checkpoint directory's safetensors: one file, or shards listed by an index. Opening
    reads and checks every header; `get` reads one tensor."""

    def __init__(self, path: str, fmt: str):
        path = os.fspath(path)
        self.index_path: str | None = None
        self.files: dict[str, Any] = {}  # file path -> safe_open handle
        self.where: dict[str, str] = {}  # tensor name -> file path
        if fmt == "native":
            self._open_file(os.path.join(path, NATIVE_WEIGHTS))
        elif os.path.exists(os.path.join(path, HF_INDEX)):
            self._open_index(os.path.join(path, HF_INDEX))
        else:
            self._open_file(os.path.join(path, HF_WEIGHTS))

    def _open_file(self, path: str, names: list[str] | None = None) -> Any:
        try:
            # pread, not a mapping: pages of a mapped file stay resident until it is closed, which would hold
            # a second copy of the weights by the end of the load.
            f = safetensors.safe_open(path, framework="numpy", backend="pread")
        except FileNotFoundError:
            raise FileNotFoundError(f"safetensors file not found: {path}") from None
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({reason(e)})") from None
        self.files[path] = f
        for name in f.keys() if names is None else names:
            self.where[name] = path
        return f

    def _open_index(self, path: str) -> None:
        self.index_path = path
        index = read_json(path, "index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: corrupt index (no 'weight_map' of tensor name -> shard file)")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            # Shards are files of this directory: a path in the index would read any file the user can.
            if not (
                isinstance(shard, str)
                and shard == os.path.basename(shard)
                and "\\" not in shard
                and "\0" not in shard
                and shard.endswith(".safetensors")
            ):
                raise CheckpointError(
                    f"{path}: weight_map entry {short(name)} -> {short(shard)} is not a "
                    "'*.safetensors' file name in the checkpoint directory"
                )
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            shard_path = os.path.join(os.path.dirname(path), shard)
            if not os.path.isfile(shard_path):
                more = f" and {len(names) - 1} other tensors" if len(names) > 1 else ""
                raise FileNotFoundError(
                    f"{path}: shard {short(shard)} is missing (expected at {shard_path}); it holds "
                    f"tensor {short(names[0])}{more}"
                )
            f = self._open_file(shard_path, names)
            lacking = sorted(set(names) - set(f.keys()))
            if lacking:
                raise CheckpointError(
                    f"{path}: the index maps tensor {short(lacking[0])} to shard {shard!r}, "
                    f"but {shard_path} does not contain it"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> tuple[str, tuple[int, ...], str]:
        """(file, shape, safetensors dtype code) from the header alone."""
        sl = self.files[self.where[name]].get_slice(name)
        return self.where[name], tuple(sl.get_shape()), sl.get_dtype()

    def get(self, name: str) -> np.ndarray:
        try:
            return self.files[self.where[name]].get_tensor(name)
        except (safetensors.SafetensorError, OSError) as e:  # e.g. the file changed or shrank after opening
            raise CheckpointError(f"{self.where[name]}: cannot read tensor {name!r} ({reason(e)})") from None

    def dtype(self) -> str:
        """The float dtype name all tensors share (float32 when they differ)."""
        codes = {self.info(n)[2] for n in self.keys()}
        names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
        return names.get(codes.pop(), "float32") if len(codes) == 1 else "float32"

    def close(self) -> None:
        self.files.clear()  # the handles close with their last reference

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        if self.index_path:
            return f"the weight_map of {self.index_path}"
        return next(iter(self.files), "?")


def _names(w: params_lib.Weight, fmt: str, config: MistralConfig) -> list[str]:
    pattern = w.stored_name(fmt)
    return [pattern.format(l=i) for i in range(config.n_layers)] if w.layered else [pattern]


def validate(source: Source, fmt: str, config: MistralConfig) -> None:
    """Every check from the headers alone, before any weight is read."""
    wanted: dict[str, tuple[int, ...]] = {}
    for w in params_lib.weights(config):
        for name in _names(w, fmt, config):
            wanted[name] = w.stored_shape(config)
    missing = [n for n in wanted if n not in source]
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[1:4]}...)" if len(missing) > 1 else ""
        hint = ""
        if len(missing) == len(wanted):
            hint = " - none of the expected names is there: a different architecture or naming?"
        elif source.index_path:
            # The index cannot say where an unlisted tensor belongs; its layer's neighbours can.
            m = re.match(r".*?layers\.\d+\.", missing[0])
            layer = m.group(0) if m else missing[0]
            shards = sorted({os.path.basename(source.where[n]) for n in source.keys() if n.startswith(layer)})
            if shards:
                hint = f" (the other tensors of {layer.rstrip('.')!r} are in {', '.join(shards)})"
        raise CheckpointError(f"missing tensor {missing[0]!r}{more}: expected in {source.describe()}{hint}")
    unexpected = [n for n in source.keys() if n not in wanted and not n.endswith(HARMLESS_SUFFIXES)]
    if unexpected:
        head = params_lib.BY_PATH["output/kernel"].stored_name(fmt)
        why = (
            " (config has tie_embeddings=True, so no separate output head)"
            if config.tie_embeddings and unexpected[0] == head
            else ""
        )
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"unexpected tensor {short(unexpected[0])} in {source.where[unexpected[0]]}{why}{more}; "
            f"the config describes {len(wanted)} tensors"
        )
    for name, shape in wanted.items():
        path, got, code = source.info(name)
        if got != shape:
            raise CheckpointError(
                f"tensor {name!r} in {path} has shape {list(got)}, expected {list(shape)} "
                f"for the config (dim={config.dim}, n_layers={config.n_layers}, "
                f"n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}, "
                f"head_dim={config.head_dim}, hidden_dim={config.hidden_dim}, "
                f"vocab_size={config.vocab_size})"
            )
        if code not in FLOAT_CODES:
            raise CheckpointError(
                f"tensor {name!r} in {path} has dtype {code}; expected a float dtype ({', '.join(FLOAT_CODES)})"
            )


def open_checked(path: str, fmt: str, config: MistralConfig) -> Source:
    """The checkpoint's Source, every header checked against `config` (CheckpointError otherwise)."""
    source = Source(path, fmt)
    try:
        validate(source, fmt, config)
    except BaseException:
        source.close()
        raise
    return source


def _fill(dst: np.ndarray, source: Source, name: str, view, config: MistralConfig, check_finite: bool) -> None:
    """Copies tensor `name` into `dst` (one layer of our leaf) through its checkpoint-layout view."""
    target, stored = view(dst, config)
    # numpy reshapes to a copy where no view exists: assigning into that copy would be lost
    if not np.may_share_memory(target, dst):
        raise AssertionError(f"layout of {name!r} is not a view of the destination")
    tensor = source.get(name)
    if check_finite:
        bad = tensor.size - np.count_nonzero(np.isfinite(tensor))
        if bad:
            raise CheckpointError(
                f"tensor {name!r} in {source.where[name]} has {bad} non-finite values (NaN/inf) "
                f"of {tensor.size}; load with check_finite=False (--no-check) to accept them"
            )
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        target[...] = tensor.reshape(stored)  # cast + rearrange in one pass
    if check_finite and dst.dtype.itemsize < tensor.dtype.itemsize:
        bad = target.size - np.count_nonzero(np.isfinite(target))
        if bad:
            raise CheckpointError(
                f"tensor {name!r} in {source.where[name]}: {bad} values overflow {dst.dtype} "
                "(finite as stored, infinite after the cast); load it in a wider dtype"
            )


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized C-order array starting on a 64-byte boundary, which a CPU device adopts without a copy."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    at = -buf.ctypes.data % 64
    return buf[at : at + nbytes].view(dtype).reshape(shape)


def inputs_last(ndim: int, start: int, n_in: int) -> list[int]:
    """The axis order of an array whose axes [start, start + n_in) are a projection's inputs, with those moved
    last (a stacked leaf [L, in..., out...] -> [L, out..., in...], the checkpoints' order); n_in 0: identity."""
    axes = list(range(ndim))
    return axes[:start] + axes[start + n_in :] + axes[start : start + n_in]


def host_leaves(
    source: Source,
    fmt: str,
    config: MistralConfig,
    dtype: np.dtype,
    check_finite: bool = True,
    stored_order: bool = False,
) -> Iterator[tuple[params_lib.Weight, np.ndarray]]:
    """(weight, host array of its full shape in `dtype`), one leaf at a time, filled tensor by tensor.
    `check_finite`: CheckpointError for a tensor holding NaN or inf (or overflowing `dtype`), naming it.
    `stored_order`: each array is a view of a 64-byte aligned buffer laid out with the projection's input axes
    last (inputs_last), so that filling it from the checkpoint's [out, in] tensors copies rows, not a
    transposition."""
    for w in params_lib.weights(config):
        if stored_order:
            shape = w.full_shape(config)
            order = inputs_last(len(shape), int(w.layered), w.n_in)
            host = aligned_empty(tuple(shape[i] for i in order), dtype).transpose(np.argsort(order))
        else:
            host = np.empty(w.full_shape(config), dtype)
        view = w.stored_view(fmt)
        names = _names(w, fmt, config)
        if w.layered:
            for i, name in enumerate(names):
                _fill(host[i], source, name, view, config, check_finite)
        else:
            _fill(host, source, names[0], view, config, check_finite)
        yield w, host
        del host


# ---- writing ---------------------------------------------------------------------------------------------------


def _export_order(config: MistralConfig) -> list[tuple[params_lib.Weight, int | None]]:
    """(weight, layer) in the usual checkpoint order: embedding, layer by layer, final norm, head."""
    ws = params_lib.weights(config)
    first = next(i for i, w in enumerate(ws) if w.layered)  # params.WEIGHTS lists them in that order
    per_layer = [w for w in ws if w.layered]
    return (
        [(w, None) for w in ws[:first]]
        + [(w, i) for i in range(config.n_layers) for w in per_layer]
        + [(w, None) for w in ws[first:] if not w.layered]
    )


def _tensor(
    params: dict, w: params_lib.Weight, layer: int | None, fmt: str, config: MistralConfig, dtype: np.dtype
) -> np.ndarray:
    """One stored tensor: one layer of one leaf, leaving the device alone, in the checkpoint's layout."""
    x = params_lib.tree_get(params, w.path)
    host = np.asarray(x if layer is None else x[layer])
    view, _ = w.stored_view(fmt)(host, config)
    out = np.empty(view.shape, dtype)  # C order, so that flattening to the stored shape is free
    out[...] = view
    return out.reshape(w.stored_shape(config))


def write_tensors(
    directory: str,
    params: dict,
    config: MistralConfig,
    fmt: str,
    dtype: np.dtype,
    max_shard_bytes: float | None,
    prefix: str = "model",
) -> list[str]:
    """Writes the params as safetensors in `fmt`: `{prefix}.safetensors` when they fit in `max_shard_bytes`
    (None: no limit), else transformers' `{prefix}-0000i-of-0000N.safetensors` shards and
    `{prefix}.safetensors.index.json`. A tensor larger than the limit gets a shard of its own. Returns the file
    names written (index last)."""
    order = _export_order(config)
    sizes = [math.prod(w.stored_shape(config)) * dtype.itemsize for w, _ in order]
    shards: list[list[int]] = [[]]
    size = 0
    for i, nbytes in enumerate(sizes):
        if shards[-1] and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes

    def name(i):
        w, layer = order[i]
        pattern = w.stored_name(fmt)
        return pattern if layer is None else pattern.format(l=layer)

    files = (
        [f"{prefix}.safetensors"]
        if len(shards) == 1
        else [f"{prefix}-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for fname, shard in zip(files, shards):
        tensors = {name(i): _tensor(params, *order[i], fmt, config, dtype) for i in shard}
        safetensors.numpy.save_file(tensors, os.path.join(directory, fname), metadata=METADATA)
        weight_map.update({t: fname for t in tensors})
        del tensors  # one shard at a time
    if len(shards) == 1:
        return files
    index = f"{prefix}.safetensors.index.json"
    write_json(os.path.join(directory, index), {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
    return files + [index]


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.name


def export_hf(
    path: str,
    params: dict,
    config: MistralConfig,
    dtype: str = "bfloat16",
    max_shard_bytes: float = 5e9,
    *,
    tokenizer: str | None = None,
    overwrite: bool = True,
) -> None:
    """Writes a transformers checkpoint (config.json + model.safetensors, or shards + index) in `dtype`."""
    check_tree(params, config)
    dt = np_dtype(dtype)
    with atomic_dir(path, overwrite) as tmp:
        write_tensors(tmp, params, config, "hf", dt, max_shard_bytes)
        # transformers 5 reads `dtype`, older versions `torch_dtype`.
        name = _dtype_name(dt)
        write_json(os.path.join(tmp, HF_CONFIG), {**config.to_hf(), "torch_dtype": name, "dtype": name})
        copy_tokenizer(tmp, tokenizer)


def export_native(
    path: str,
    params: dict,
    config: MistralConfig,
    dtype: str = "bfloat16",
    *,
    tokenizer: str | None = None,
    overwrite: bool = True,
) -> None:
    """Writes a Mistral-native checkpoint (params.json + consolidated.safetensors), as mistral-inference reads."""
    check_tree(params, config)
    with atomic_dir(path, overwrite) as tmp:
        write_tensors(tmp, params, config, "native", np_dtype(dtype), None, prefix="consolidated")
        write_json(os.path.join(tmp, NATIVE_CONFIG), config.to_params_json())
        copy_tokenizer(tmp, tokenizer)
