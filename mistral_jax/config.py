"""Configuration by what it describes: `MistralConfig` is the architecture (what `config.json` / `params.json`
hold), `Numerics` the dtypes, rematerialization and attention kernel; presets; and the one dataclass loader
(`from_mapping`, `from_yaml`) that run configs use.

Field names follow Mistral's `params.json` (dim, n_layers, n_heads, ...), so the model code and the native
checkpoint read alike; `to_hf`/`from_hf` translate to transformers' `config.json` (MistralConfig).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # W keys per query, its own included (attention.py); None means plain causal attention.
    sliding_window: int | None = 4096
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"MistralConfig: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            bad(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            bad(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")

    def replace(self, **kw) -> MistralConfig:
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, f, v, h = self.dim, self.hidden_dim, self.vocab_size, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d

    # ---- transformers config.json -------------------------------------------------------------------
    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "attention_dropout": 0.0,
            "torch_dtype": dtype,
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides) -> MistralConfig:
        # transformers 5 writes the rotary base under rope_parameters; the published repos have rope_theta.
        theta = d.get("rope_theta")
        if theta is None:
            theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported (Mistral uses 'silu')")
        n_heads = d["num_attention_heads"]
        kw = dict(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            hidden_dim=d["intermediate_size"],
            norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            sliding_window=d.get("sliding_window"),
            max_seq_len=d.get("max_position_embeddings", 32768),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
        kw.update(overrides)
        return cls(**kw)

    # ---- Mistral params.json ------------------------------------------------------------------------
    def to_params_json(self) -> dict[str, Any]:
        out = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
        }
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        return out

    @classmethod
    def from_params_json(cls, d: dict[str, Any], **overrides) -> MistralConfig:
        kw = dict(
            vocab_size=d["vocab_size"],
            dim=d["dim"],
            n_layers=d["n_layers"],
            n_heads=d["n_heads"],
            n_kv_heads=d.get("n_kv_heads") or d["n_heads"],
            head_dim=d.get("head_dim") or d["dim"] // d["n_heads"],
            hidden_dim=d["hidden_dim"],
            norm_eps=float(d.get("norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            sliding_window=d.get("sliding_window"),
            max_seq_len=d.get("max_seq_len", 32768 if d.get("sliding_window") is None else 8192),
            tie_embeddings=bool(d.get("tied_embeddings", False)),
        )
        kw.update(overrides)
        return cls(**kw)

    # ---- our own json (all fields) --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> MistralConfig:
        # Checkpoints of v0.1 also stored numerics and layout flags here; the weights they describe are the same.
        d = {k: v for k, v in d.items() if k not in _LEGACY_KEYS}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"MistralConfig: unknown keys {sorted(unknown)}")
        return cls(**{**d, **overrides})

    @classmethod
    def from_file(cls, path: str, **overrides) -> MistralConfig:
        """Reads transformers' config.json, Mistral's params.json or our own mistral_jax.json."""
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            if os.path.basename(path) == "mistral_jax.json":
                return cls.from_dict(d, **overrides)
            if "hidden_size" in d:
                return cls.from_hf(d, **overrides)
            if "n_layers" in d:
                return cls.from_params_json(d, **overrides)
        except KeyError as e:
            raise ValueError(f"{path}: missing key {e}") from None
        raise ValueError(f"{path}: neither a transformers config.json nor a Mistral params.json")


_LEGACY_KEYS = frozenset(
    {
        "param_dtype",
        "dtype",
        "remat",
        "attention_impl",
        "attention_block",
        "scan_layers",
        "out_major_weights",
        "fused_projections",
    }
)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How the model computes: params stored in `param_dtype`, matmuls in `dtype` (norms, rotary angles and
    softmax always in float32), `remat` for training memory, and the attention kernel (attention.py)."""

    param_dtype: str = "float32"
    dtype: str = "float32"
    # "none" | "full" | "dots" (save matmul outputs, recompute the rest).
    remat: str = "none"
    # "xla" (blockwise, any backend) | "cudnn" (GPU) | "splash" (TPU) | "auto" (splash on TPU, cuDNN on GPU
    # where it takes the dtype, else blockwise: attention.resolve_impl).
    attention_impl: str = "xla"
    # Query block of the windowed blockwise attention; keys visited per block = block + window rounded up.
    attention_block: int = 256

    def __post_init__(self):
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"Numerics: {name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"Numerics: remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Numerics: attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if not isinstance(self.attention_block, int) or self.attention_block <= 0:
            raise ValueError(f"Numerics: attention_block must be a positive int, got {self.attention_block!r}")

    def replace(self, **kw) -> Numerics:
        return dataclasses.replace(self, **kw)

    @classmethod
    def of(cls, dtype: str) -> Numerics:
        """Params stored and computed in `dtype` (inference)."""
        return cls(param_dtype=dtype, dtype=dtype)


def _7b(**kw) -> MistralConfig:
    return MistralConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, **kw
    )


PRESETS: dict[str, MistralConfig] = {
    "mistral-7b-v0.1": _7b(sliding_window=4096, rope_theta=10000.0, max_seq_len=8192),
    "mistral-7b-v0.2": _7b(sliding_window=None, rope_theta=1e6, max_seq_len=32768),
    "mistral-7b-v0.3": _7b(sliding_window=None, rope_theta=1e6, max_seq_len=32768).replace(vocab_size=32768),
    # The 125M-parameter shape of the benchmarks (docs/benchmarks.md).
    "mistral-125m": MistralConfig(
        vocab_size=32000,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        head_dim=64,
        hidden_dim=2048,
        sliding_window=256,
        max_seq_len=4096,
    ),
    # Tiny shapes for tests and the demo: small window so that windowing shows in short sequences.
    "tiny": MistralConfig(
        vocab_size=32000,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=128,
        sliding_window=16,
        max_seq_len=512,
    ),
    "tiny-nowindow": MistralConfig(
        vocab_size=32000,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=128,
        sliding_window=None,
        max_seq_len=512,
        rope_theta=1e6,
    ),
}


def get_preset(name: str, **overrides) -> MistralConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# ---- dataclasses from YAML / JSON mappings --------------------------------------------------------------------


def _coerce(value, hint, where: str):
    """`value` checked against (and converted to) the type `hint` of a field; errors name `where`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: got {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_mapping(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item, *_) = typing.get_args(hint) or (Any,)
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_mapping(cls, data: dict, where: str = "config", **overrides):
    """An instance of dataclass `cls` from a mapping (nested dataclasses from nested mappings), each value
    checked against its field's type; unknown keys are refused with their names."""
    data = {**data, **overrides}
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}: {k}") for k, v in data.items()})


def read_yaml(path: str) -> dict:
    """A YAML mapping from a file; numbers like 1e-4 are floats (YAML 1.1 would read them as strings)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=Loader)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def from_yaml(cls, path: str, **overrides):
    """An instance of dataclass `cls` from a YAML file (see from_mapping); errors name the file."""
    return from_mapping(cls, read_yaml(path), path, **overrides)
