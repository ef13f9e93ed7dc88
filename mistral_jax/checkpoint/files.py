"""Checkpoint directories: which format a directory holds, its config, and crash-safe writing.

Formats (detect_format):
  "hf"      config.json + model.safetensors or model.safetensors.index.json (+ shards)
  "native"  params.json + consolidated.safetensors (mistral-inference)
  "orbax"   mistral_jax.json (MistralConfig.to_dict()) + params/ (an orbax PyTree checkpoint); ours, with
            mistral_jax.checksums.json (integrity.py) when written after v0.1
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

from .. import params as params_lib
from ..config import DTYPES, MistralConfig

ORBAX_CONFIG = "mistral_jax.json"
ORBAX_PARAMS = "params"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
NATIVE_CONFIG = "params.json"
NATIVE_WEIGHTS = "consolidated.safetensors"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.model.v1",
    "tokenizer.model.v2",
    "tokenizer.model.v3",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or our layout; the message names the file and tensor.

    Messages never quote a file's bytes (a checkpoint may be untrusted, or a name may point at a secret):
    they say where (file, line, tensor) and what was expected."""


def short(value: object, limit: int = 200) -> str:
    """repr of a name taken from a checkpoint file, cut to `limit` characters."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def reason(e: BaseException) -> str:
    """A library's error message up to its first quoted fragment: parsers quote the bytes they reject."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    for cut in ("`", "'", '"', " at line"):
        msg = msg.split(cut, 1)[0]
    return msg.rstrip(" :,") or type(e).__name__


def read_json(path: str, what: str) -> Any:
    """The JSON value in `path`; CheckpointError naming the file and the position (never the text) if the file
    is not UTF-8 JSON."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: corrupt {what} (not UTF-8 text: byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt {what} (not JSON: line {e.lineno}, column {e.colno})") from None


def detect_format(path: str) -> str:
    """'hf' | 'native' | 'orbax' for a checkpoint directory; ValueError saying what was found and expected."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: a checkpoint is a directory, got a file")
    found = sorted(os.listdir(path))
    has = set(found)
    if ORBAX_CONFIG in has and os.path.isdir(os.path.join(path, ORBAX_PARAMS)):
        return "orbax"
    if HF_CONFIG in has and ({HF_WEIGHTS, HF_INDEX} & has):
        return "hf"
    if NATIVE_CONFIG in has and NATIVE_WEIGHTS in has:
        return "native"
    torch_files = [f for f in found if f.endswith((".bin", ".pth", ".pt"))]
    if torch_files and not any(f.endswith(".safetensors") for f in found):
        raise ValueError(
            f"{path}: only PyTorch pickle weights found ({', '.join(torch_files)}); mistral_jax reads safetensors "
            "only. Convert them to safetensors first, e.g. transformers' `MistralForCausalLM.from_pretrained(dir)"
            ".save_pretrained(out_dir)` (writes model.safetensors), or download the repository's *.safetensors "
            "files."
        )
    raise ValueError(
        f"{path}: unrecognized checkpoint layout; found {found or 'an empty directory'}. Expected one of: "
        f"Hugging Face ({HF_CONFIG} + {HF_WEIGHTS} or {HF_INDEX}), "
        f"Mistral native ({NATIVE_CONFIG} + {NATIVE_WEIGHTS}), "
        f"mistral_jax ({ORBAX_CONFIG} + {ORBAX_PARAMS}/)."
    )


def load_config(path: str, **overrides) -> MistralConfig:
    """The MistralConfig of a checkpoint directory (or of a config file given directly)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        fname = {"hf": HF_CONFIG, "native": NATIVE_CONFIG, "orbax": ORBAX_CONFIG}[detect_format(path)]
        path = os.path.join(path, fname)
    read_json(path, "config file")  # its own message for a file that is not JSON
    if overrides:
        return MistralConfig.from_file(path, **overrides)
    try:
        return MistralConfig.from_file(path)
    except (TypeError, ValueError) as e:  # a value of the wrong type or range: say which file
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(msg if msg.startswith(path) else f"{path}: {msg}") from None


def np_dtype(dtype) -> np.dtype:
    """The numpy dtype of one of config.DTYPES (a name or a dtype); ValueError otherwise."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def check_tree(params: dict, config: MistralConfig) -> None:
    """CheckpointError naming the first leaf of `params` missing, unexpected or mis-shaped for `config`."""
    want = params_lib.leaf_shapes(config)
    got = params_lib.flatten(params)
    for leaf in want:
        if leaf not in got:
            raise CheckpointError(f"params: missing leaf {leaf!r} (expected shape {want[leaf]})")
    for leaf, x in got.items():
        if leaf not in want:
            raise CheckpointError(f"params: unexpected leaf {leaf!r}")
        if tuple(x.shape) != want[leaf]:
            raise CheckpointError(f"params: leaf {leaf!r} has shape {tuple(x.shape)}, expected {want[leaf]}")


# ---- crash-safe writing ---------------------------------------------------------------------------------------


def _replace_dirs(src: str, dst: str) -> None:
    """Moves the complete directory `src` to `dst`, replacing `dst` if it exists.

    With Linux renameat2(RENAME_EXCHANGE) the swap is atomic: `dst` always names a complete checkpoint. Without
    it there is a moment between two renames where the old one only exists as `.{name}.old`."""
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 2) == 0  # AT_FDCWD, EXCHANGE
    except (OSError, AttributeError):
        ok = False
    if ok:
        shutil.rmtree(src)  # now holds the previous checkpoint
        return
    old = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old)


def check_replaceable(path: str, overwrite: bool) -> None:
    """FileExistsError unless `path` is absent, empty, or a checkpoint that `overwrite` allows replacing."""
    if not os.path.exists(path):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    if not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    if os.listdir(path):
        try:
            detect_format(path)
        except ValueError:
            raise FileExistsError(f"refusing to replace {path}: it exists and is not a checkpoint directory") from None


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool) -> Iterator[str]:
    """Yields a temp sibling of `path` to fill; it becomes `path` only if the block completes.

    A crash or exception leaves any previous checkpoint at `path` untouched and no `path` for a fresh save (the
    temp `.{name}.partial` is removed on exceptions, and by the next save after a hard crash)."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    check_replaceable(path, overwrite)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dirs(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def copy_tokenizer(dst: str, tokenizer: str | None) -> None:
    """`tokenizer`: a tokenizer file (e.g. tokenizer.model), or a checkpoint directory whose tokenizer files
    (TOKENIZER_FILES) are copied along."""
    if tokenizer is None:
        return
    tokenizer = os.fspath(tokenizer)
    if os.path.isdir(tokenizer):
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer, f)):
                shutil.copy2(os.path.join(tokenizer, f), os.path.join(dst, f))
    elif os.path.isfile(tokenizer):
        # Saved under the name the loaders look for, whatever the source file is called (tokenizer.model.v3...).
        shutil.copy2(tokenizer, os.path.join(dst, "tokenizer.model"))
    else:
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
