"""A small streaming safetensors reader and writer (numpy only, no torch).

Format: an 8-byte little-endian header length n, n bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` (offsets relative to the
end of the header), then the raw little-endian tensor bytes.

Why our own: a 7B checkpoint is 14.5 GB in bf16, and conversion must not hold two copies of it. The reader maps
each tensor on demand (`np.memmap` of exactly that tensor's bytes), so a tensor is a zero-copy view whose pages
leave the process' resident set as soon as the caller drops it; the writer writes one tensor at a time from a
callback, so it never holds more than one tensor's bytes besides its source.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

INDEX_SUFFIX = ".safetensors.index.json"
# Same cap as the reference implementation: a header larger than this is corruption, not a model.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype codes <-> numpy dtypes (all little-endian on disk).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def dtype_code(dtype) -> str:
    """safetensors code of a numpy dtype ('BF16' for ml_dtypes.bfloat16, ...)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")  # written little-endian whatever the source order
    for code, d in DTYPES.items():
        if d == dt:
            return code
    raise ValueError(f"safetensors: no safetensors dtype for numpy dtype {dt}")


class SafetensorsError(ValueError):
    """A malformed safetensors file or index; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    path: str           # the file holding it
    code: str           # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int          # absolute byte offsets in the file
    end: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.code]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
class SafetensorsFile:
    """One .safetensors file: the header is parsed and checked on open; tensors are mapped on `get`."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise SafetensorsError(
                        f"{self.path}: corrupt or truncated safetensors header (header length {n}, file size {size})")
                raw = f.read(n)
        except FileNotFoundError:
            raise FileNotFoundError(f"safetensors file not found: {self.path}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not JSON: {e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (__metadata__ is not an object)")
        self.metadata: dict[str, str] = meta
        base, data_len = 8 + n, size - 8 - n
        self.tensors: dict[str, TensorInfo] = {}
        for name, e in header.items():
            try:
                code, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}: {e!r}") \
                    from None
            if code not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unknown dtype {code!r} "
                                       f"(known: {', '.join(DTYPES)})")
            want = math.prod(shape) * DTYPES[code].itemsize
            if not (0 <= begin <= end) or end - begin != want:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has data_offsets {[begin, end]} inconsistent "
                                       f"with dtype {code} shape {list(shape)} ({want} bytes)")
            if end > data_len:
                raise SafetensorsError(f"{self.path}: truncated file: tensor {name!r} needs data bytes up to {end} "
                                       f"but the file holds {data_len}")
            self.tensors[name] = TensorInfo(name, self.path, code, shape, base + begin, base + end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of one tensor. Its own mapping: dropping it releases its pages."""
        return _map(self.tensors[name])


def _map(t: TensorInfo) -> np.ndarray:
    count = math.prod(t.shape)
    if count == 0:
        empty = np.empty(t.shape, t.dtype)
        empty.flags.writeable = False  # read-only like the mapped ones
        return empty
    # np.memmap aligns the offset down to the page size itself.
    return np.memmap(t.path, dtype=t.dtype, mode="r", offset=t.start, shape=(count,)).reshape(t.shape)


class SafetensorsReader:
    """A single .safetensors file or a sharded set described by a `*.safetensors.index.json`.

    Every shard's header is read and checked on open (missing shards, tensors the index promises but the shard
    lacks), so errors surface before any data is read.
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = _single_entry(path)
        self.path = path
        self.files: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        if path.endswith(".json"):
            self.index_path: str | None = path
            self._open_index(path)
        else:
            self.index_path = None
            f = SafetensorsFile(path)
            self.files[f.path] = f
            self.tensors = dict(f.tensors)
            self.metadata: dict[str, Any] = dict(f.metadata)

    def _open_index(self, path: str) -> None:
        try:
            with open(path) as fh:
                index = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"safetensors index not found: {path}") from None
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{path}: corrupt index (not JSON: {e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SafetensorsError(f"{path}: corrupt index (no 'weight_map' of tensor name -> shard file)")
        self.metadata = dict(index.get("metadata") or {})
        folder = os.path.dirname(path)
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                more = f" and {len(names) - 1} other tensors" if len(names) > 1 else ""
                raise FileNotFoundError(f"{path}: shard {shard!r} is missing (expected at {shard_path}); it holds "
                                        f"tensor {names[0]!r}{more}")
            f = SafetensorsFile(shard_path)
            self.files[f.path] = f
            for name in names:
                if name not in f.tensors:
                    raise SafetensorsError(f"{path}: the index maps tensor {name!r} to shard {shard!r}, "
                                           f"but {shard_path} does not contain it")
                self.tensors[name] = f.tensors[name]

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not found in {self.path}") from None

    def get(self, name: str) -> np.ndarray:
        return _map(self.info(name))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _single_entry(folder: str) -> str:
    entries = sorted(os.listdir(folder))
    indexes = [e for e in entries if e.endswith(INDEX_SUFFIX)]
    files = [e for e in entries if e.endswith(".safetensors")]
    if len(indexes) == 1:
        return os.path.join(folder, indexes[0])
    if not indexes and len(files) == 1:
        return os.path.join(folder, files[0])
    raise SafetensorsError(f"{folder}: expected one *.safetensors file or one *{INDEX_SUFFIX}, found "
                           f"{indexes + files or 'none'}")


def load_file(path: str) -> dict[str, np.ndarray]:
    """All tensors of a file or sharded set, as zero-copy views (convenience for small files and tests)."""
    r = SafetensorsReader(path)
    return {k: r.get(k) for k in r.keys()}


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype up front (the header needs them) and produced only when written."""
    shape: tuple[int, ...]
    dtype: Any
    fn: Callable[[], Any]


TensorSource = Any  # np.ndarray / anything with shape+dtype that np.asarray accepts / LazyTensor


def _spec(name: str, src: TensorSource) -> tuple[str, tuple[int, ...], str]:
    return name, tuple(int(s) for s in src.shape), dtype_code(src.dtype)


def _materialize(name: str, src: TensorSource, shape, code: str) -> np.ndarray:
    arr = np.asarray(src.fn() if isinstance(src, LazyTensor) else src)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"safetensors writer: tensor {name!r} produced shape {arr.shape}, declared {tuple(shape)}")
    dt = DTYPES[code]
    if arr.dtype != dt:
        arr = arr.astype(dt)
    return np.ascontiguousarray(arr)


def _header_bytes(specs, metadata) -> tuple[bytes, list[int]]:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, sizes = 0, []
    for name, shape, code in specs:
        nbytes = math.prod(shape) * DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned, as the reference writer does
    return len(raw).to_bytes(8, "little") + raw, sizes


def _write_file(path: str, items: list[tuple[str, TensorSource]], metadata) -> None:
    """Writes `items` to `path` through a temp sibling renamed at the end, so `path` is never a half file."""
    specs = [_spec(n, s) for n, s in items]
    names = [n for n, _, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"safetensors writer: duplicate tensor names for {path}")
    head, _ = _header_bytes(specs, metadata)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for (name, src), (_, shape, code) in zip(items, specs):
                arr = _materialize(name, src, shape, code)
                if arr.size:
                    f.write(arr.reshape(-1).view(np.uint8).data)
                del arr  # one tensor at a time
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def save_file(path: str, tensors: Mapping[str, TensorSource] | Iterable[tuple[str, TensorSource]],
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes one .safetensors file. Values may be arrays or `LazyTensor`s (produced one at a time)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    _write_file(os.fspath(path), items, metadata)


def save_sharded(directory: str, tensors: Mapping[str, TensorSource] | Iterable[tuple[str, TensorSource]], *,
                 max_shard_bytes: float = 5e9, metadata: Mapping[str, str] | None = None,
                 prefix: str = "model") -> list[str]:
    """Writes `{prefix}.safetensors` when everything fits in `max_shard_bytes`, else the transformers layout
    `{prefix}-00001-of-0000N.safetensors` + `{prefix}.safetensors.index.json` (metadata.total_size, weight_map).

    Tensors keep their order; a shard is closed when the next tensor would push it past `max_shard_bytes` (a
    tensor larger than that gets a shard of its own). Returns the file names written (index last).
    """
    if metadata is None:
        metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    shards: list[list[tuple[str, TensorSource]]] = [[]]
    size = 0
    total = 0
    for name, src in items:
        nbytes = math.prod(src.shape) * np.dtype(src.dtype).itemsize
        total += nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, src))
        size += nbytes
    os.makedirs(directory, exist_ok=True)
    if len(shards) == 1:
        _write_file(os.path.join(directory, f"{prefix}.safetensors"), shards[0], metadata)
        return [f"{prefix}.safetensors"]
    n = len(shards)
    names = [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        _write_file(os.path.join(directory, fname), shard, metadata)
        weight_map.update({t: fname for t, _ in shard})
    index_name = f"{prefix}{INDEX_SUFFIX}"
    index_path = os.path.join(directory, index_name)
    tmp = f"{index_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.replace(tmp, index_path)
    return names + [index_name]
