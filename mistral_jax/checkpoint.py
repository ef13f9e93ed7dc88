"""Checkpoints: load Hugging Face / Mistral-native safetensors, save and restore our orbax format, export both.

Formats (detect_format):
  "hf"      config.json + model.safetensors or model.safetensors.index.json (+ shards)
  "native"  params.json + consolidated.safetensors (mistral-inference)
  "orbax"   mistral_jax.json (MistralConfig.to_dict()) + params/ (an orbax PyTree checkpoint); ours

Our param tree is a plain nested dict with the layers stacked on a leading axis L (see `leaf_shapes`). The
tables below pair each of our leaves with its checkpoint name in both formats; `_LAYOUTS` says how one layer of
the leaf is viewed in the checkpoint's layout, and the same view serves import (assign into it) and export
(read from it), so the two directions cannot disagree.

Streaming: safetensors tensors are memory-mapped one at a time and copied (with the dtype cast) straight into
the preallocated host buffer of one leaf, which goes to the device before the next leaf is read. Peak host
memory is about one copy of the weights on CPU (where the "device" is host memory) and one leaf otherwise.
`prefetch` reads them ahead in a background thread instead (a bounded number of bytes ahead of the loader).

This module imports jax only where it is used (loading to devices, orbax), so that a tool can start reading
the weights (prefetch) while jax itself is still being imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator

import ml_dtypes
import numpy as np

from mistral_jax import safetensors_io as st
from mistral_jax.config import DTYPES, MistralConfig

if TYPE_CHECKING:
    import jax

Params = dict

# ---- name tables: our leaf path -> checkpoint tensor name ("{l}" = layer index) ------------------------------
HF_NAMES: dict[str, str] = {
    "tok_embeddings/embedding":    "model.embed_tokens.weight",
    "layers/attention_norm/scale": "model.layers.{l}.input_layernorm.weight",
    "layers/attention/wq":         "model.layers.{l}.self_attn.q_proj.weight",
    "layers/attention/wk":         "model.layers.{l}.self_attn.k_proj.weight",
    "layers/attention/wv":         "model.layers.{l}.self_attn.v_proj.weight",
    "layers/attention/wo":         "model.layers.{l}.self_attn.o_proj.weight",
    "layers/ffn_norm/scale":       "model.layers.{l}.post_attention_layernorm.weight",
    "layers/feed_forward/w1":      "model.layers.{l}.mlp.gate_proj.weight",
    "layers/feed_forward/w2":      "model.layers.{l}.mlp.down_proj.weight",
    "layers/feed_forward/w3":      "model.layers.{l}.mlp.up_proj.weight",
    "norm/scale":                  "model.norm.weight",
    "output/kernel":               "lm_head.weight",
}
NATIVE_NAMES: dict[str, str] = {
    "tok_embeddings/embedding":    "tok_embeddings.weight",
    "layers/attention_norm/scale": "layers.{l}.attention_norm.weight",
    "layers/attention/wq":         "layers.{l}.attention.wq.weight",
    "layers/attention/wk":         "layers.{l}.attention.wk.weight",
    "layers/attention/wv":         "layers.{l}.attention.wv.weight",
    "layers/attention/wo":         "layers.{l}.attention.wo.weight",
    "layers/ffn_norm/scale":       "layers.{l}.ffn_norm.weight",
    "layers/feed_forward/w1":      "layers.{l}.feed_forward.w1.weight",
    "layers/feed_forward/w2":      "layers.{l}.feed_forward.w2.weight",
    "layers/feed_forward/w3":      "layers.{l}.feed_forward.w3.weight",
    "norm/scale":                  "norm.weight",
    "output/kernel":               "output.weight",
}
NAMES = {"hf": HF_NAMES, "native": NATIVE_NAMES}
# Tensors some checkpoints carry that are not weights (recomputed from the config): skipped, not an error.
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)
ORBAX_CONFIG = "mistral_jax.json"
ORBAX_PARAMS = "params"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v2", "tokenizer.model.v3",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or our layout; the message names the file and tensor."""


def leaf_shapes(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    """Our leaf path -> shape: the contract with model.py (stacked layers lead with L)."""
    c = config
    V, D, L, N, K, H, F = c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim
    shapes = {
        "tok_embeddings/embedding":    (V, D),
        "layers/attention_norm/scale": (L, D),
        "layers/attention/wq":         (L, D, N, H),
        "layers/attention/wk":         (L, D, K, H),
        "layers/attention/wv":         (L, D, K, H),
        "layers/attention/wo":         (L, N, H, D),
        "layers/ffn_norm/scale":       (L, D),
        "layers/feed_forward/w1":      (L, D, F),
        "layers/feed_forward/w2":      (L, F, D),
        "layers/feed_forward/w3":      (L, D, F),
        "norm/scale":                  (D,),
        "output/kernel":               (D, V),
    }
    if c.tie_embeddings:
        del shapes["output/kernel"]
    return shapes


def stored_shape(leaf: str, config: MistralConfig) -> tuple[int, ...]:
    """Shape of one layer of `leaf` in a checkpoint file (linear weights [out, in]); same in both formats."""
    c = config
    V, D, F, NH, KH = c.vocab_size, c.dim, c.hidden_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {
        "tok_embeddings/embedding":    (V, D),
        "layers/attention_norm/scale": (D,),
        "layers/attention/wq":         (NH, D),
        "layers/attention/wk":         (KH, D),
        "layers/attention/wv":         (KH, D),
        "layers/attention/wo":         (D, NH),
        "layers/ffn_norm/scale":       (D,),
        "layers/feed_forward/w1":      (F, D),
        "layers/feed_forward/w2":      (D, F),
        "layers/feed_forward/w3":      (F, D),
        "norm/scale":                  (D,),
        "output/kernel":               (V, D),
    }[leaf]


# Projection weights: name -> number of leading input axes in our [in..., out...] layout.
WEIGHT_INPUTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w3": 1, "w2": 1, "kernel": 1}


def out_major_perm(name: str, ndim: int, lead: int = 0) -> tuple[int, ...] | None:
    """Axis order that takes projection weight `name` ([lead..., in..., out...], `ndim` axes in all) to its
    out-major layout [lead..., out..., in...] (model.out_major_weights); None for a leaf that is not a projection
    weight (embedding, norm scales), which keeps its layout."""
    if name not in WEIGHT_INPUTS:
        return None
    n_in = WEIGHT_INPUTS[name]
    rest = list(range(lead, ndim))
    return (*range(lead), *rest[n_in:], *rest[:n_in])


# ---- layouts: one layer of our leaf, viewed in the checkpoint's layout ----------------------------------------
# Each function maps (our array for one layer, config) -> (a view of it, the shape to reshape the stored tensor
# to so that it lines up element for element with that view). Views only: import assigns the memory-mapped
# tensor into the view (cast and rearrangement in one pass, no temporary), export copies the view out.
def _same(x, c):  # embeddings and norm scales are stored as we keep them
    return x, x.shape


def _linear(x, c):  # checkpoints store Linear weights [out, in]; we store [in, out]
    return x.T, x.T.shape


def _heads_out(n_heads: Callable[[MistralConfig], int]):
    def view(x, c):  # ours [D, n, H] -> stored [n*H, D]: q/k/v projections, heads in half-rotary order
        n = n_heads(c)
        return x.reshape(c.dim, n * c.head_dim).T, (n * c.head_dim, c.dim)
    return view


def _heads_out_interleaved(n_heads: Callable[[MistralConfig], int]):
    # Mistral native rotates interleaved pairs (x0, x1), (x2, x3)...; we (like transformers) rotate halves
    # (x_i, x_{i+H/2}). Native row n*H + 2i + p is our column (n, p*H/2 + i): with ours split as [D, n, p, i]
    # and the native tensor split as [n, i, p, D] the permutation is a transpose, still a view.
    def view(x, c):
        n, h2 = n_heads(c), c.head_dim // 2
        return x.reshape(c.dim, n, 2, h2).transpose(1, 3, 2, 0), (n, h2, 2, c.dim)
    return view


def _heads_in(x, c):  # ours [N, H, D] -> stored [D, N*H]: o_proj / wo (values are not rotated)
    return x.reshape(c.n_heads * c.head_dim, c.dim).T, (c.dim, c.n_heads * c.head_dim)


def _q(c):
    return c.n_heads


def _kv(c):
    return c.n_kv_heads


_HF_LAYOUT = {
    "tok_embeddings/embedding":    _same,
    "layers/attention_norm/scale": _same,
    "layers/attention/wq":         _heads_out(_q),
    "layers/attention/wk":         _heads_out(_kv),
    "layers/attention/wv":         _heads_out(_kv),
    "layers/attention/wo":         _heads_in,
    "layers/ffn_norm/scale":       _same,
    "layers/feed_forward/w1":      _linear,
    "layers/feed_forward/w2":      _linear,
    "layers/feed_forward/w3":      _linear,
    "norm/scale":                  _same,
    "output/kernel":               _linear,
}
_LAYOUTS = {
    "hf": _HF_LAYOUT,
    # Same as HF except the rotary pair order of the rows of wq and wk.
    "native": {**_HF_LAYOUT, "layers/attention/wq": _heads_out_interleaved(_q),
               "layers/attention/wk": _heads_out_interleaved(_kv)},
}


def _layer_names(fmt: str, leaf: str, config: MistralConfig) -> list[str]:
    pattern = NAMES[fmt][leaf]
    if leaf.startswith("layers/"):
        return [pattern.format(l=l) for l in range(config.n_layers)]
    return [pattern]


def _tree_get(tree: dict, leaf: str):
    for k in leaf.split("/"):
        tree = tree[k]
    return tree


def _tree_set(tree: dict, leaf: str, value) -> None:
    *parents, last = leaf.split("/")
    for k in parents:
        tree = tree.setdefault(k, {})
    tree[last] = value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def _check_dtype(dtype) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# ---------------------------------------------------------------------------------------------------------------
# Format detection and config
# ---------------------------------------------------------------------------------------------------------------
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
    if "config.json" in has and ({"model.safetensors", "model.safetensors.index.json"} & has):
        return "hf"
    if "params.json" in has and "consolidated.safetensors" in has:
        return "native"
    torch_files = [f for f in found if f.endswith((".bin", ".pth", ".pt"))]
    if torch_files and not any(f.endswith(".safetensors") for f in found):
        raise ValueError(
            f"{path}: only PyTorch pickle weights found ({', '.join(torch_files)}); mistral_jax reads safetensors "
            "only. Convert them to safetensors first, e.g. transformers' `MistralForCausalLM.from_pretrained(dir)"
            ".save_pretrained(out_dir)` (writes model.safetensors), or download the repository's *.safetensors "
            "files.")
    raise ValueError(
        f"{path}: unrecognized checkpoint layout; found {found or 'an empty directory'}. Expected one of: "
        "Hugging Face (config.json + model.safetensors or model.safetensors.index.json), "
        "Mistral native (params.json + consolidated.safetensors), "
        f"mistral_jax (mistral_jax.json + {ORBAX_PARAMS}/).")


def load_config(path: str, **overrides) -> MistralConfig:
    """The MistralConfig of a checkpoint directory (or of a config file given directly)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return MistralConfig.from_file(path, **overrides)
    fname = {"hf": "config.json", "native": "params.json", "orbax": ORBAX_CONFIG}[detect_format(path)]
    return MistralConfig.from_file(os.path.join(path, fname), **overrides)


def _open_safetensors(path: str, fmt: str) -> st.SafetensorsReader:
    if fmt == "native":
        return st.SafetensorsReader(os.path.join(path, "consolidated.safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    return st.SafetensorsReader(index if os.path.exists(index) else os.path.join(path, "model.safetensors"))


def _where(reader: st.SafetensorsReader) -> str:
    if reader.index_path:
        return f"the weight_map of {reader.index_path}"
    return reader.path


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def _validate_source(reader: st.SafetensorsReader, fmt: str, config: MistralConfig) -> None:
    """All checks from the headers alone, before any weight is read."""
    wanted: dict[str, tuple[int, ...]] = {}
    for leaf in leaf_shapes(config):
        shape = stored_shape(leaf, config)
        for name in _layer_names(fmt, leaf, config):
            wanted[name] = shape
    missing = [n for n in wanted if n not in reader]
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[1:4]}...)" if len(missing) > 1 else ""
        hint = ""
        if len(missing) == len(wanted):
            hint = " - none of the expected names is there: a different architecture or naming?"
        elif reader.index_path:
            # The index cannot say where an unlisted tensor belongs; its layer's neighbours can.
            m = re.match(r".*?layers\.\d+\.", missing[0])
            layer = m.group(0) if m else missing[0]
            shards = sorted({os.path.basename(reader.info(n).path) for n in reader.keys() if n.startswith(layer)})
            if shards:
                hint = f" (the other tensors of {layer.rstrip('.')!r} are in {', '.join(shards)})"
        raise CheckpointError(f"missing tensor {missing[0]!r}{more}: expected in {_where(reader)}{hint}")
    unexpected = [n for n in reader.keys() if n not in wanted and not n.endswith(HARMLESS_SUFFIXES)]
    if unexpected:
        t = reader.info(unexpected[0])
        why = " (config has tie_embeddings=True, so no separate output head)" \
            if config.tie_embeddings and unexpected[0] == NAMES[fmt]["output/kernel"] else ""
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in {t.path}{why}{more}; "
                              f"the config describes {len(wanted)} tensors")
    for name, shape in wanted.items():
        t = reader.info(name)
        if t.shape != shape:
            raise CheckpointError(f"tensor {name!r} in {t.path} has shape {list(t.shape)}, expected {list(shape)} "
                                  f"for the config (dim={config.dim}, n_layers={config.n_layers}, "
                                  f"n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}, "
                                  f"head_dim={config.head_dim}, hidden_dim={config.hidden_dim}, "
                                  f"vocab_size={config.vocab_size})")
        if t.code not in st.FLOAT_CODES:
            raise CheckpointError(f"tensor {name!r} in {t.path} has dtype {t.code}; expected a float dtype "
                                  f"({', '.join(st.FLOAT_CODES)})")


def _host_leaves(reader, fmt: str, config: MistralConfig, dtype: np.dtype,
                 unrolled: bool = False, out_major: bool = False
                 ) -> Iterator[tuple[str, int | None, np.ndarray, tuple[int, ...] | None]]:
    """Yields (leaf, layer, host array, perm) one array at a time, each filled tensor by tensor from `reader`
    (its `get(name)`: a SafetensorsReader's mapped files, or a Prefetch): a whole leaf (layer None: the layers
    stacked [L, ...]) or, when `unrolled`, one layer of a per-layer leaf. `out_major`: projection weights come
    out [out..., in...] (model.out_major_weights), the checkpoint's own [out, in] order, so they are copied
    straight, never transposed; `perm` is the axis order that took our in-major layout to the array's (None:
    unmoved)."""
    def buffer(leaf, shape, lead):
        """(array in the layout we return, a view of it in our in-major layout, which _LAYOUTS maps from, perm)."""
        perm = out_major_perm(leaf.rsplit("/", 1)[-1], len(shape), lead) if out_major else None
        if perm is None:
            host = aligned_empty(shape, dtype)
            return host, host, None
        host = aligned_empty([shape[i] for i in perm], dtype)
        return host, np.transpose(host, np.argsort(perm)), perm

    for leaf, shape in leaf_shapes(config).items():
        layout = _LAYOUTS[fmt][leaf]
        stacked = leaf.startswith("layers/")
        names = _layer_names(fmt, leaf, config)
        if stacked and unrolled:
            for i, name in enumerate(names):
                host, view, perm = buffer(leaf, shape[1:], 0)
                host = _fill(view, reader, name, layout, config, host)
                yield leaf, i, host, perm
                del host, view
            continue
        host, view, perm = buffer(leaf, shape, 1 if stacked else 0)
        if stacked:
            for i, name in enumerate(names):
                _fill(view[i], reader, name, layout, config)
        else:
            host = _fill(view, reader, names[0], layout, config, host)
        yield leaf, None, host, perm
        del host, view


# XLA:CPU takes a host buffer aligned to this many bytes as it is (jax.device_put aliases it, no copy); any other
# buffer is copied into a fresh one. np.empty gave 16-byte aligned buffers, so every weight was copied twice on
# the CPU (about ten times slower than the aliasing, on the development VM), its memory held twice meanwhile.
_CPU_ALIGNMENT = 64


def aligned_empty(shape, dtype, alignment: int = _CPU_ALIGNMENT) -> np.ndarray:
    """np.empty(shape, dtype) whose data starts at a multiple of `alignment` bytes."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` in an aligned_empty buffer: jax.device_put then takes it without a copy."""
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _fill(dst: np.ndarray, reader, name: str, layout, config: MistralConfig, host: np.ndarray | None = None):
    """Copies checkpoint tensor `name` into `dst` (one layer of our leaf, in-major) through its layout view.
    Returns the array that holds the values: `host` (the buffer `dst` views), or, when given and the tensor
    came read ahead (Prefetch) in the very order and dtype of `host`, that tensor itself, uncopied."""
    src = reader.get(name)  # a fresh mapping (its pages leave RSS when it is dropped), or a prefetched array
    view, ckpt_shape = layout(dst, config)
    # numpy reshapes to a copy where no view exists: assigning into that copy would be lost
    if not np.may_share_memory(view, dst):
        raise AssertionError(f"layout of {name!r} is not a view of the destination")
    if host is not None and _adoptable(src, view, host):
        return src.reshape(host.shape)
    _assign(view, src.reshape(ckpt_shape))  # cast + rearrange in one pass
    return host


def _adoptable(src: np.ndarray, view: np.ndarray, host: np.ndarray) -> bool:
    """Whether `src` can stand for `host`: an array in memory (not a file mapping), writable and aligned for
    jax.device_put to take as it is, of host's dtype, and the layout `view` walks host's memory in plain C
    order, so that src's bytes are host's bytes."""
    return (type(src) is np.ndarray and src.flags.writeable and src.flags.c_contiguous
            and src.ctypes.data % _CPU_ALIGNMENT == 0 and src.dtype == host.dtype and src.size == host.size
            and view.flags.c_contiguous and view.size == host.size and view.ctypes.data == host.ctypes.data)


def _assign(dst: np.ndarray, src: np.ndarray, tile: int = 256) -> None:
    """dst[...] = src (with the dtype cast). A 2-D transpose is copied in tiles: numpy's element loop walks one
    side against the cache and runs at about half the speed (measured on a 5632x2048 bf16 matrix)."""
    same_order = dst.flags.c_contiguous and src.flags.c_contiguous
    if same_order or dst.ndim != 2 or dst.size < 4 * tile * tile:
        dst[...] = src
        return
    for i in range(0, dst.shape[0], tile):
        for j in range(0, dst.shape[1], tile):
            dst[i:i + tile, j:j + tile] = src[i:i + tile, j:j + tile]


def _read_tensor(t: st.TensorInfo) -> np.ndarray:
    """Tensor `t` read from its file into a fresh aligned buffer (a kernel copy from the page cache: no mapping,
    no page faults on the file's side)."""
    raw = aligned_empty((t.nbytes,), np.uint8)
    mem = memoryview(raw)
    with open(t.path, "rb", buffering=0) as f:
        f.seek(t.start)
        done = 0
        while done < t.nbytes:
            n = f.readinto(mem[done:])
            if not n:
                raise st.SafetensorsError(f"{t.path}: truncated while reading tensor {t.name!r}")
            done += n
    return raw.view(t.dtype).reshape(t.shape)


class Prefetch:
    """Reads the tensors of a safetensors checkpoint into memory in a background thread, in the order load_params
    takes them, at most `budget` bytes ahead of it; load_params(prefetched=...) then takes each tensor from here.
    Where the tensor is already in the dtype and order of its leaf (a transformers checkpoint loaded out-major
    per layer, as api.load_model does on the CPU), that buffer becomes the weight itself, so the read is the
    only copy. Started before jax is imported (infer.generate), the reading overlaps that import.

    A tensor asked for before the thread reached it is mapped from its file as without a prefetch (and skipped
    by the thread); a read error is raised by `get` of that tensor. Holds at most `budget` bytes not yet taken."""

    def __init__(self, path: str, budget: int = 2 << 30):
        self.path = os.fspath(path)
        fmt = detect_format(self.path)
        if fmt == "orbax":
            raise ValueError(f"{self.path}: Prefetch reads safetensors checkpoints")
        config = load_config(self.path)
        self.reader = _open_safetensors(self.path, fmt)
        names = [n for leaf in leaf_shapes(config) for n in _layer_names(fmt, leaf, config)]
        self._queue = [n for n in names if n in self.reader]
        self._budget = budget
        self._ready: dict[str, np.ndarray | BaseException] = {}
        self._held = 0  # bytes read and not yet taken
        self._reading: str | None = None
        self._skip: set[str] = set()
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="mistral-jax-prefetch").start()

    def _run(self) -> None:
        for name in self._queue:
            t = self.reader.info(name)
            with self._cond:
                while not self._closed and self._held and self._held + t.nbytes > self._budget:
                    self._cond.wait()
                if self._closed:
                    return
                if name in self._skip:
                    continue
                self._reading = name
            try:
                arr: np.ndarray | BaseException = _read_tensor(t)
            except BaseException as e:  # handed to whoever asks for this tensor
                arr = e
            with self._cond:
                self._reading = None
                self._cond.notify_all()
                if self._closed:  # closed while reading: nobody will take it
                    return
                self._ready[name] = arr
                self._held += t.nbytes if isinstance(arr, np.ndarray) else 0

    def get(self, name: str) -> np.ndarray:
        with self._cond:
            while self._reading == name:
                self._cond.wait()
            if name in self._ready:
                arr = self._ready.pop(name)
                if isinstance(arr, BaseException):
                    raise arr
                self._held -= arr.nbytes
                self._cond.notify_all()
                return arr
            self._skip.add(name)
        return self.reader.get(name)

    def close(self) -> None:
        """Stops the reading and drops what was read and not taken."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._held = 0
            self._cond.notify_all()


def prefetch(path: str, budget: int = 2 << 30) -> Prefetch | None:
    """A started Prefetch of checkpoint directory `path`, or None where there is nothing to read ahead: an orbax
    checkpoint, or a directory that is not a valid checkpoint (load_params then reports the problem)."""
    try:
        return Prefetch(path, budget)
    except (OSError, ValueError):  # an orbax checkpoint (ValueError) included
        return None


def _put(host: np.ndarray, sharding) -> jax.Array:
    import jax

    if sharding is None:
        out = jax.device_put(host)
    else:
        out = jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    # Wait, so that the host buffer can go before the next leaf is read (transfers are async on accelerators).
    return out.block_until_ready()


def load_params(path: str, config: MistralConfig | None = None, dtype: str = "float32",
                shardings: Any = None, unrolled: bool = False, out_major: bool = False,
                prefetched: Prefetch | None = None) -> Params:
    """Loads any supported checkpoint directory into our param tree of jax.Arrays of `dtype`.

    `shardings`: optional pytree of jax.sharding.Sharding matching the param tree (stacked layers, in-major).
    From safetensors each array is read into one host buffer (one at a time) and its devices take their slices
    of it; from orbax each process reads only the slices its devices hold. Either way no host holds the full
    model at once (beyond CPU "devices", whose memory is the host's).

    The inference layouts (api.load_model): `unrolled` gives the layers as a tuple of per-layer trees
    (model.unstack_params), `out_major` the projection weights [out..., in...] (model.out_major_weights); the
    config to use with them says scan_layers=False / out_major_weights=True. From safetensors they are read
    straight into that layout (the checkpoint's [out, in] tensors are copied, not transposed twice).
    `prefetched`: a Prefetch of this directory started earlier, whose tensors are taken from it.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    config = config or load_config(path)
    np_dtype = _check_dtype(dtype)
    if fmt == "orbax":
        params = _restore_orbax(path, config, np_dtype, shardings)
        if unrolled or out_major:
            from . import model
            if unrolled:
                params, config = model.unstack_params(params, config)
            if out_major:
                params, config = model.out_major_weights(params, config)
        return params
    if prefetched is not None and os.path.abspath(prefetched.path) != os.path.abspath(path):
        raise ValueError(f"load_params: prefetched is of {prefetched.path}, not {path}")
    reader = prefetched.reader if prefetched is not None else _open_safetensors(path, fmt)
    try:
        _validate_source(reader, fmt, config)
        return _load_safetensors(prefetched or reader, fmt, config, np_dtype, shardings, unrolled, out_major)
    finally:  # also when the checkpoint fails validation: the prefetch stops and drops what it read
        if prefetched is not None:
            prefetched.close()


def _load_safetensors(source, fmt: str, config: MistralConfig, np_dtype: np.dtype, shardings, unrolled: bool,
                      out_major: bool) -> Params:
    """The safetensors part of load_params; `source.get(name)` gives each tensor (a reader or a Prefetch)."""
    params: Params = {}
    layers: list[Params] = [{} for _ in range(config.n_layers)] if unrolled else []
    for leaf, layer, host, perm in _host_leaves(source, fmt, config, np_dtype, unrolled, out_major):
        sh = None if shardings is None else _tree_get(shardings, leaf)
        if sh is not None and (unrolled or out_major):  # the given sharding is for the stacked, in-major leaf
            from . import model
            sh = model.moved_sharding(sh, perm, drop_lead=layer is not None)
        arr = _put(host, sh)
        if layer is None:
            _tree_set(params, leaf, arr)
        else:
            _tree_set(layers[layer], leaf.split("/", 1)[1], arr)
        del host
    if unrolled:
        params["layers"] = tuple(layers)
    return params


def load_host_params(path: str, config: MistralConfig | None = None, dtype: str | None = None) -> Params:
    """Like load_params for hf/native directories, but leaves numpy arrays on the host (conversion, tests).
    dtype None keeps the checkpoint's float dtype when all its tensors share one (float32 otherwise)."""
    fmt = detect_format(path)
    if fmt == "orbax":
        raise ValueError(f"{path}: load_host_params reads safetensors checkpoints; use load_params for orbax")
    config = config or load_config(path)
    reader = _open_safetensors(path, fmt)
    _validate_source(reader, fmt, config)
    np_dtype = _check_dtype(dtype or _source_dtype(reader))
    params: Params = {}
    for leaf, _, host, _ in _host_leaves(reader, fmt, config, np_dtype):
        _tree_set(params, leaf, host)
    return params


def _source_dtype(reader: st.SafetensorsReader) -> str:
    codes = {t.code for t in reader.tensors.values()}
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(codes.pop(), "float32") \
        if len(codes) == 1 else "float32"


# ---------------------------------------------------------------------------------------------------------------
# Orbax (our format)
# ---------------------------------------------------------------------------------------------------------------
def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import and only needed here
    return ocp


def _check_tree(params: Params, config: MistralConfig) -> None:
    want = leaf_shapes(config)
    got = _flatten(params)
    for leaf in want:
        if leaf not in got:
            raise CheckpointError(f"params: missing leaf {leaf!r} (expected shape {want[leaf]})")
    for leaf, x in got.items():
        if leaf not in want:
            raise CheckpointError(f"params: unexpected leaf {leaf!r}")
        if tuple(x.shape) != want[leaf]:
            raise CheckpointError(f"params: leaf {leaf!r} has shape {tuple(x.shape)}, expected {want[leaf]}")


def _replace_dirs(src: str, dst: str) -> None:
    """Moves the complete directory `src` to `dst`, replacing `dst` if it exists.

    With Linux renameat2(RENAME_EXCHANGE) the swap is atomic: `dst` always names a complete checkpoint. Without
    it there is a moment between two renames where the old one only exists as `.{name}.old`.
    """
    if os.path.exists(dst):
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
    else:
        os.rename(src, dst)


@contextlib.contextmanager
def _atomic_dir(path: str, overwrite: bool) -> Iterator[str]:
    """Yields a temp sibling of `path` to fill; it becomes `path` only if the block completes.

    A crash or exception leaves any previous checkpoint at `path` untouched and no `path` for a fresh save (the
    temp `.{name}.partial` is removed on exceptions, and by the next save after a hard crash).
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
        if not os.path.isdir(path):
            raise FileExistsError(f"{path} exists and is not a directory")
        if os.listdir(path):
            try:
                detect_format(path)
            except ValueError:
                raise FileExistsError(f"refusing to replace {path}: it exists and is not a checkpoint directory") \
                    from None
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


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _copy_tokenizer(dst: str, tokenizer: str | None) -> None:
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


def save(path: str, params: Params, config: MistralConfig, *, tokenizer: str | None = None,
         overwrite: bool = True) -> None:
    """Saves params (jax or numpy leaves, any sharding) as our orbax checkpoint: mistral_jax.json + params/.

    Crash-safe: everything is written into `.{name}.partial` next to `path` and moved into place at the end.
    Single-process only (the directory swap is done by this process).
    """
    _check_tree(params, config)
    with _atomic_dir(path, overwrite) as tmp:
        with _checkpointer() as ckptr:
            ckptr.save(os.path.join(tmp, ORBAX_PARAMS), args=_ocp().args.PyTreeSave(params))
        _write_json(os.path.join(tmp, ORBAX_CONFIG), config.to_dict())
        _copy_tokenizer(tmp, tokenizer)


def _checkpointer():
    """A synchronous orbax PyTree checkpointer set up so that saving adds no host copy of the weights.

    Measured on a 1.3 GB model (bench/convert_memory.py): orbax' defaults deep-copy numpy leaves before writing
    (+1x) and hold every zstd-compressed chunk until the commit (+0.8x). The save is synchronous, so the copy
    guards nothing here; compression gains little on trained bf16/f32 weights, so it is off.
    """
    import jax

    ocp = _ocp()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))


def _restore_orbax(path: str, config: MistralConfig, dtype: np.dtype, shardings) -> Params:
    import jax

    ocp = _ocp()
    pdir = os.path.join(os.path.abspath(path), ORBAX_PARAMS)
    want = leaf_shapes(config)
    with _checkpointer() as ckptr:
        meta = _flatten(dict(ckptr.metadata(pdir).item_metadata.tree))
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
        params: Params = {}
        for leaf, shape in want.items():
            s = default if shardings is None else _tree_get(shardings, leaf)
            target: Params = {}
            _tree_set(target, leaf, jax.ShapeDtypeStruct(shape, dtype, sharding=s))
            # One leaf per restore: orbax reads everything one restore asks for into host memory before the
            # device copies, so on an accelerator a whole-tree restore would stage the full model on the host;
            # leaf by leaf the staging is one leaf. The target's dtype and sharding: tensorstore casts while
            # reading, and each process reads only the slices its devices hold.
            args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(
                target), partial_restore=True)
            _tree_set(params, leaf, _tree_get(ckptr.restore(pdir, args=args), leaf))
        return params


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------
def _export_tensors(params: Params, config: MistralConfig, fmt: str, dtype: np.dtype) -> list[tuple[str, Any]]:
    """(name, LazyTensor) in the usual checkpoint order (embedding, layer by layer, norm, head); each produces
    one layer of one leaf only when the writer gets to it."""
    def tensor(leaf: str, layer: int | None):
        def fn():
            x = _tree_get(params, leaf)
            host = np.asarray(x if layer is None else x[layer])  # one layer leaves the device at a time
            view, _ = _LAYOUTS[fmt][leaf](host, config)
            out = np.empty(view.shape, dtype)  # C order, so that flattening to the stored shape is free
            _assign(out, view)
            return out.reshape(stored_shape(leaf, config))
        name = NAMES[fmt][leaf] if layer is None else NAMES[fmt][leaf].format(l=layer)
        return name, st.LazyTensor(stored_shape(leaf, config), dtype, fn)

    leaves = list(leaf_shapes(config))
    per_layer = [leaf for leaf in leaves if leaf.startswith("layers/")]
    items = [tensor("tok_embeddings/embedding", None)]
    items += [tensor(leaf, l) for l in range(config.n_layers) for leaf in per_layer]
    items += [tensor(leaf, None) for leaf in ("norm/scale", "output/kernel") if leaf in leaves]
    return items


def export_hf(path: str, params: Params, config: MistralConfig, dtype: str = "bfloat16",
              max_shard_bytes: float = 5e9, *, tokenizer: str | None = None, overwrite: bool = True) -> None:
    """Writes a transformers checkpoint (config.json + model.safetensors, or shards + index), streaming one
    layer of one tensor at a time."""
    _check_tree(params, config)
    np_dtype = _check_dtype(dtype)
    name = "bfloat16" if np_dtype == np.dtype(ml_dtypes.bfloat16) else np_dtype.name
    with _atomic_dir(path, overwrite) as tmp:
        st.save_sharded(tmp, _export_tensors(params, config, "hf", np_dtype), max_shard_bytes=max_shard_bytes,
                        metadata={"format": "pt"})
        # transformers 5 reads `dtype`, older versions `torch_dtype`.
        _write_json(os.path.join(tmp, "config.json"), {**config.to_hf(), "torch_dtype": name, "dtype": name})
        _copy_tokenizer(tmp, tokenizer)


def export_native(path: str, params: Params, config: MistralConfig, dtype: str = "bfloat16", *,
                  tokenizer: str | None = None, overwrite: bool = True) -> None:
    """Writes a Mistral-native checkpoint (params.json + consolidated.safetensors), as mistral-inference reads."""
    _check_tree(params, config)
    np_dtype = _check_dtype(dtype)
    with _atomic_dir(path, overwrite) as tmp:
        st.save_file(os.path.join(tmp, "consolidated.safetensors"),
                     _export_tensors(params, config, "native", np_dtype), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "params.json"), config.to_params_json())
        _copy_tokenizer(tmp, tokenizer)


def convert(src: str, dst: str, to: str = "orbax", dtype: str | None = None, *, max_shard_bytes: float = 5e9,
            overwrite: bool = False) -> MistralConfig:
    """Converts a checkpoint directory to `to` in {"orbax", "hf", "native"}; tokenizer files come along.

    dtype None keeps the source's dtype. Host memory: one copy of the weights in `dtype` plus one tensor.
    Returns the config written (param_dtype set to the saved dtype).
    """
    if to not in ("orbax", "hf", "native"):
        raise ValueError(f"convert: to must be 'orbax', 'hf' or 'native', got {to!r}")
    fmt = detect_format(src)
    config = load_config(src)
    if fmt == "orbax":
        params = load_params(src, config, dtype=dtype or config.param_dtype)
    else:
        params = load_host_params(src, config, dtype)
    dtype_name = _flatten(params)["norm/scale"].dtype.name
    config = config.replace(param_dtype=dtype_name)
    if to == "orbax":
        save(dst, params, config, tokenizer=src, overwrite=overwrite)
    elif to == "hf":
        export_hf(dst, params, config, dtype_name, max_shard_bytes, tokenizer=src, overwrite=overwrite)
    else:
        export_native(dst, params, config, dtype_name, tokenizer=src, overwrite=overwrite)
    return config
