"""Model configuration: one frozen dataclass, presets, and the two on-disk config formats.

Field names follow Mistral's `params.json` (dim, n_layers, n_heads, ...), so the model code and the native
checkpoint read alike; `to_hf`/`from_hf` translate to transformers' `config.json` (MistralConfig).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


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
    # W keys per query, its own included (REFERENCE.md section 2); None means plain causal attention.
    sliding_window: int | None = 4096
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    # Numerics: params are stored in `param_dtype`, matmuls run in `dtype`; norms and softmax always in f32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # "none" | "full" | "dots" (save matmul outputs, recompute the rest) for training memory.
    remat: str = "none"
    # "xla" (blockwise, any backend) | "cudnn" (GPU prefill) | "splash" (TPU); see attention.py.
    attention_impl: str = "xla"
    # Query block for the windowed blockwise attention; keys visited per block = block + window rounded up.
    attention_block: int = 256
    # True: layers stacked and run by nn.scan (one layer compiled; training and accelerators). False: layers
    # unrolled over per-layer params (model.unstack_params); inference uses it on the CPU, where XLA copies
    # each layer's weights out of a stacked array before every matmul (three passes over the weights).
    scan_layers: bool = True
    # False: projection weights stored [in..., out...] (wq [D, N, H]; the checkpoints' and training's layout).
    # True: [out..., in...] (wq [N, H, D]; model.out_major_weights), for inference on the CPU, where XLA's
    # products of a few rows (decode) by a weight run faster with the weight's input axis minor (docs/benchmarks.md).
    out_major_weights: bool = False
    # True (with out-major, per-layer params; model.fuse_projections): wq, wk, wv held as one weight wqkv
    # [(N + 2K) * H, D] and w1, w3 as one w13 [2F, D], one product each instead of three and two. The CPU
    # inference layout: XLA:CPU builds each product's kernel on a program's first run, which a job pays for
    # every program it loads (docs/benchmarks.md).
    fused_projections: bool = False

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"MistralConfig: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "max_seq_len", "attention_block"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            bad(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            bad(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                bad(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in ("none", "full", "dots"):
            bad(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if self.attention_impl not in ("xla", "cudnn", "splash"):
            bad(f"attention_impl must be 'xla', 'cudnn' or 'splash', got {self.attention_impl!r}")
        if self.fused_projections and (self.scan_layers or not self.out_major_weights):
            bad("fused_projections needs per-layer, out-major params (scan_layers=False, out_major_weights=True)")

    def replace(self, **kw) -> "MistralConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, f, v, h = self.dim, self.hidden_dim, self.vocab_size, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d

    # ---- transformers config.json -------------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
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
            "torch_dtype": self.param_dtype,
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides) -> "MistralConfig":
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
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim, "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
        }
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        return out

    @classmethod
    def from_params_json(cls, d: dict[str, Any], **overrides) -> "MistralConfig":
        kw = dict(
            vocab_size=d["vocab_size"], dim=d["dim"], n_layers=d["n_layers"], n_heads=d["n_heads"],
            n_kv_heads=d.get("n_kv_heads") or d["n_heads"], head_dim=d.get("head_dim") or d["dim"] // d["n_heads"],
            hidden_dim=d["hidden_dim"], norm_eps=float(d.get("norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 10000.0)), sliding_window=d.get("sliding_window"),
            max_seq_len=d.get("max_seq_len", 32768 if d.get("sliding_window") is None else 8192),
            tie_embeddings=bool(d.get("tied_embeddings", False)),
        )
        kw.update(overrides)
        return cls(**kw)

    # ---- our own json (all fields) --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "MistralConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"MistralConfig: unknown keys {sorted(unknown)}")
        return cls(**{**d, **overrides})

    @classmethod
    def from_file(cls, path: str, **overrides) -> "MistralConfig":
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


def _7b(**kw) -> MistralConfig:
    return MistralConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         hidden_dim=14336, **kw)


PRESETS: dict[str, MistralConfig] = {
    "mistral-7b-v0.1": _7b(sliding_window=4096, rope_theta=10000.0, max_seq_len=8192),
    "mistral-7b-v0.2": _7b(sliding_window=None, rope_theta=1e6, max_seq_len=32768),
    "mistral-7b-v0.3": _7b(sliding_window=None, rope_theta=1e6, max_seq_len=32768).replace(vocab_size=32768),
    # The 125M-parameter shape of the benchmarks (docs/benchmarks.md).
    "mistral-125m": MistralConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64,
                                  hidden_dim=2048, sliding_window=256, max_seq_len=4096),
    # Tiny shapes for tests and the demo: small window so that windowing shows in short sequences.
    "tiny": MistralConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                          hidden_dim=128, sliding_window=16, max_seq_len=512, attention_block=16),
    "tiny-nowindow": MistralConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                   hidden_dim=128, sliding_window=None, max_seq_len=512, rope_theta=1e6),
}


def get_preset(name: str, **overrides) -> MistralConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
