"""Checkpoints: read transformers / Mistral-native safetensors and our orbax format, write all three.

  params = checkpoint.load_params(path, config, "bfloat16", shardings=mm.param_shardings)
  checkpoint.save(path, params, config, tokenizer=src)      # ours (orbax), crash-safe, any number of processes
  checkpoint.export_hf(path, params, config, "bfloat16")    # what MistralForCausalLM.from_pretrained loads
  checkpoint.convert(src, dst, to="hf")
  spec, adapters = checkpoint.load_adapter(adapter_dir, config)   # a PEFT LoRA adapter (lora.attach / training)
  params = checkpoint.merge_adapter(params, adapter_dir, config)  # ... or folded into the weights

Every name, shape and layout comes from the param spec (params.WEIGHTS); the param tree is the stacked,
in-major tree of params.py whatever the source. The formats live in their own modules: files (detection,
config, crash-safe directories), safetensors (hf and native), orbax (ours), integrity (NaN/inf counts and
checksums), peft (LoRA adapters).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from .. import params as params_lib
from ..config import MistralConfig
from . import files, integrity, orbax, safetensors
from .files import ORBAX_CONFIG, ORBAX_PARAMS, TOKENIZER_FILES, CheckpointError, detect_format, load_config, np_dtype
from .orbax import save
from .peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    UnsupportedAdapter,
    adapter_config,
    adapter_tensors,
    load_adapter,
    merge_adapter,
    read_adapter_config,
    save_adapter,
)
from .safetensors import export_hf, export_native

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "ORBAX_CONFIG",
    "ORBAX_PARAMS",
    "TOKENIZER_FILES",
    "CheckpointError",
    "Conversion",
    "UnsupportedAdapter",
    "adapter_config",
    "adapter_tensors",
    "convert",
    "detect_format",
    "export_hf",
    "export_native",
    "files",
    "integrity",
    "load_adapter",
    "load_config",
    "load_host_params",
    "load_params",
    "merge_adapter",
    "orbax",
    "read_adapter_config",
    "safetensors",
    "save",
    "save_adapter",
]

Params = dict[str, Any]


def _put(host: np.ndarray, sharding) -> jax.Array:
    """One host leaf onto its devices (each process builds only the shards its devices hold)."""
    if sharding is None:
        out = jax.device_put(host)
    else:
        out = jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    # Wait, so that the host buffer can go before the next leaf is read (transfers are asynchronous).
    return out.block_until_ready()


def load_params(
    path: str,
    config: MistralConfig | None = None,
    dtype: str = "float32",
    shardings: Any = None,
    *,
    check_finite: bool = True,
) -> Params:
    """Any supported checkpoint directory as our param tree (stacked layers, [in..., out...] projections) of
    jax.Arrays of `dtype`.

    `shardings`: optional tree of jax.sharding.Sharding like the params (ModelMesh.param_shardings). From
    safetensors each leaf is read into one host buffer (one at a time) and its devices take their slices of
    it; from orbax each process reads only the slices its devices hold. Either way no host holds the full
    model at once (beyond CPU devices, whose memory is the host's).

    `check_finite` (default): CheckpointError naming the file and tensor that holds NaN or inf, or that does
    not match the checksum our orbax format saves with each array (corruption); a pass over the weights as
    they load. False skips it (e.g. to inspect a diverged run's weights)."""
    path = os.fspath(path)
    fmt = detect_format(path)
    config = config or load_config(path)
    dt = np_dtype(dtype)
    if fmt == "orbax":
        return orbax.restore(path, config, dt, shardings, check_finite=check_finite)
    params: Params = {}
    with safetensors.open_checked(path, fmt, config) as source:
        for w, host in safetensors.host_leaves(source, fmt, config, dt, check_finite):
            sharding = None if shardings is None else params_lib.tree_get(shardings, w.path)
            params_lib.tree_set(params, w.path, _put(host, sharding))
            del host
    return params


def load_host_params(
    path: str, config: MistralConfig | None = None, dtype: str | None = None, *, check_finite: bool = True
) -> Params:
    """Like load_params for hf/native directories, but leaves numpy arrays on the host (conversion, tests).
    dtype None keeps the checkpoint's float dtype when all its tensors share one (float32 otherwise)."""
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "orbax":
        raise ValueError(f"{path}: load_host_params reads safetensors checkpoints; use load_params for orbax")
    config = config or load_config(path)
    params: Params = {}
    with safetensors.open_checked(path, fmt, config) as source:
        dt = np_dtype(dtype or source.dtype())
        for w, host in safetensors.host_leaves(source, fmt, config, dt, check_finite):
            params_lib.tree_set(params, w.path, host)
    return params


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What `convert` wrote: the model's config, the weights' dtype, and the source's format."""

    config: MistralConfig
    dtype: str
    source_format: str


def convert(
    src: str,
    dst: str,
    to: str = "orbax",
    dtype: str | None = None,
    *,
    max_shard_bytes: float = 5e9,
    overwrite: bool = False,
    check_finite: bool = True,
    adapter: str | None = None,
) -> Conversion:
    """Converts a checkpoint directory to `to` in {"orbax", "hf", "native"}; tokenizer files come along.

    dtype None keeps the source's dtype. `check_finite`: as in load_params. `adapter`: a PEFT LoRA adapter
    directory folded into the weights (merge_adapter). Host memory: one copy of the weights in `dtype` plus
    one tensor (plus one shard when writing safetensors)."""
    if to not in ("orbax", "hf", "native"):
        raise ValueError(f"convert: to must be 'orbax', 'hf' or 'native', got {to!r}")
    if adapter is not None:
        read_adapter_config(adapter)  # a wrong adapter directory is named before the base is read
    fmt = detect_format(src)
    config = load_config(src)
    if fmt == "orbax":
        params = load_params(src, config, dtype=dtype or orbax.stored_dtype(src), check_finite=check_finite)
    else:
        params = load_host_params(src, config, dtype, check_finite=check_finite)
    if adapter is not None:
        params = merge_adapter(params, adapter, config, check_finite=check_finite)
    name = np.dtype(params["norm"]["scale"].dtype).name
    if to == "orbax":
        save(dst, params, config, tokenizer=src, overwrite=overwrite)
    elif to == "hf":
        export_hf(dst, params, config, name, max_shard_bytes, tokenizer=src, overwrite=overwrite)
    else:
        export_native(dst, params, config, name, tokenizer=src, overwrite=overwrite)
    return Conversion(config, name, fmt)
