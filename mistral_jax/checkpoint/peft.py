"""LoRA adapters in the PEFT format, so that `peft` users load them over the transformers base model:

  adapter_config.json        LoraConfig fields (r, lora_alpha, target_modules, ...)
  adapter_model.safetensors  base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight [r, in]
                             base_model.model.model.layers.{l}.self_attn.q_proj.lora_B.weight [out, r]

Ours are A [L, in..., r] and B [L, r, out...] (lora.init_lora), x @ A @ B; PEFT's are torch Linear weights
(y = x A^T B^T), so each is transposed after flattening the head axes. Flattening (N, H) row-major gives
index n * H + h, the transformers layout of q/k/v/o_proj, and our q/k heads rotate halves as transformers'
do: no rotary permutation is needed. Module names come from the transformers names in params.WEIGHTS.

`save_adapter` writes that format and `load_adapter` reads it back, from us or from `peft` itself: plain
LoRA (scale lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora) on every layer's q/k/v/o/gate/up/down
projections. Variants that change the math or the base weights (DoRA, biases, other modules, some layers
only, per-module ranks, PiSSA-style inits, ...) are refused by name (UnsupportedAdapter).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from .. import params as params_lib
from ..config import MistralConfig
from ..lora import TARGETS, LoraConfig, merge_lora
from .files import CheckpointError, read_json, reason, short, write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _module(w: params_lib.Weight) -> str:
    """transformers module of a layer weight, "{l}" for the layer: model.layers.{l}.self_attn.q_proj."""
    return w.hf.removesuffix(".weight")


def adapter_tensors(adapters: dict, spec: LoraConfig) -> dict[str, np.ndarray]:
    """Our adapter tree (lora.init_lora's, any leaf type) -> {PEFT tensor name: float32 [r, in] / [out, r]}."""
    out = {}
    r = spec.rank
    for w in spec.weights():
        _, group, name = w.path.split("/")
        a = np.asarray(adapters["layers"][group][name + "_a"], np.float32)  # [L, in..., r]
        b = np.asarray(adapters["layers"][group][name + "_b"], np.float32)  # [L, r, out...]
        for layer in range(a.shape[0]):
            prefix = "base_model.model." + _module(w).format(l=layer)
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[layer].reshape(-1, r).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[layer].reshape(r, -1).T)
    return out


def adapter_config(spec: LoraConfig, base_model: str | None = None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(_module(w).rsplit(".", 1)[1] for w in spec.weights()),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # scale alpha / r, as ours
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(
    path: str, adapters: dict, spec: LoraConfig, config: MistralConfig, base_model: str | None = None
) -> None:
    """Writes `path`/adapter_config.json and adapter_model.safetensors (float32)."""
    tensors = adapter_tensors(adapters, spec)
    expected = config.n_layers * len(spec.targets) * 2
    if len(tensors) != expected:
        raise ValueError(
            f"LoRA tree holds {len(tensors)} PEFT tensors, expected {expected} "
            f"({config.n_layers} layers x {len(spec.targets)} targets x A, B)"
        )
    os.makedirs(path, exist_ok=True)
    safetensors.numpy.save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(os.path.join(path, ADAPTER_CONFIG), adapter_config(spec, base_model))


# ---- reading --------------------------------------------------------------------------------------------------


class UnsupportedAdapter(CheckpointError):
    """A well-formed PEFT adapter that uses a feature we do not implement; the message names it."""


# transformers module name (last component) -> our target name: q_proj -> "q", gate_proj -> "gate", ...
MODULE_TARGETS = {_module(params_lib.BY_PATH["layers/" + path]).rsplit(".", 1)[1]: t for t, path in TARGETS.items()}
# A LoRA tensor of a PEFT file: base_model.model.<module>.lora_A.weight (older files: lora_A.<adapter>.weight).
_LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[\w-]+)?\.weight")
# PEFT init methods that rewrite the base weights, so that the adapter is relative to a different base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _unsupported_settings(cfg: dict) -> list[str]:
    """The adapter_config.json settings we cannot honour, each with the feature's name."""
    bad = []

    def set_(key):
        return cfg.get(key) not in (None, False, "", [], {}, "none")

    for key, what in (
        ("use_dora", "DoRA (weight-decomposed LoRA)"),
        ("lora_bias", "LoRA bias on lora_B"),
        ("modules_to_save", "fully trained modules (modules_to_save)"),
        ("layers_to_transform", "adapters on some layers only (layers_to_transform)"),
        ("rank_pattern", "per-module ranks (rank_pattern)"),
        ("alpha_pattern", "per-module alphas (alpha_pattern)"),
        ("target_parameters", "adapters on parameters (target_parameters)"),
        ("trainable_token_indices", "trainable token embeddings (trainable_token_indices)"),
        ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
        ("use_qalora", "QA-LoRA (use_qalora)"),
        ("megatron_config", "Megatron parallel layers"),
        ("fan_in_fan_out", "Conv1D weights (fan_in_fan_out)"),
    ):
        if set_(key):
            bad.append(f"{what}: {key}={short(cfg[key], 60)}")
    if cfg.get("bias") not in (None, "none"):
        bad.append(f"trained biases: bias={short(cfg['bias'], 40)} (only 'none' is supported)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        bad.append(
            f"init_lora_weights={short(init, 40)} changes the base weights; convert the adapter with "
            "peft's path_initial_model_for_weight_conversion first"
        )
    return bad


def _check_target_modules(target_modules: Any, where: str) -> None:
    """Names outside q/k/v/o/gate/up/down_proj are refused; a regex string is checked through the tensors."""
    if target_modules is None or isinstance(target_modules, str):
        return
    if not isinstance(target_modules, (list, tuple)) or not all(isinstance(m, str) for m in target_modules):
        raise CheckpointError(f"{where}: target_modules must be a list of module names or a string")
    other = sorted(m for m in target_modules if m.rsplit(".", 1)[-1] not in MODULE_TARGETS)
    if other:
        raise UnsupportedAdapter(
            f"{where}: LoRA on module {short(other[0])} is not supported; adapters apply to {', '.join(MODULE_TARGETS)}"
        )


def read_adapter_config(path: str) -> dict:
    """adapter_config.json of an adapter directory, checked: plain LoRA of our targets, else a named error."""
    where = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    cfg = read_json(where, "adapter config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: corrupt adapter config (not a JSON object)")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"{where}: peft_type {short(cfg.get('peft_type'), 40)} is not supported (only LORA)")
    bad = _unsupported_settings(cfg)
    if bad:
        raise UnsupportedAdapter(
            f"{where}: unsupported adapter feature: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        )
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {short(v, 40)}")
    if not isinstance(cfg["r"], int):
        raise CheckpointError(f"{where}: r must be an integer, got {short(cfg['r'], 40)}")
    _check_target_modules(cfg.get("target_modules"), where)
    return cfg


def _module_index(config: MistralConfig) -> dict[str, tuple[str, int]]:
    """transformers module name of every adaptable projection -> (our target, layer)."""
    out = {}
    for t in MODULE_TARGETS.values():
        w = params_lib.BY_PATH["layers/" + TARGETS[t]]
        for layer in range(config.n_layers):
            out[_module(w).format(l=layer)] = (t, layer)
    return out


def _why_not_lora(name: str) -> str:
    """What a tensor that is not a LoRA A/B weight of a supported module is, for the error."""
    if "lora_magnitude_vector" in name:
        return "a DoRA magnitude vector (DoRA is not supported)"
    if "lora_embedding" in name:
        return "a LoRA on the embeddings (not supported)"
    if name.endswith(".bias"):
        return "a bias (trained biases are not supported)"
    if "modules_to_save" in name or ".lora_" not in name:
        return "a full module weight (modules_to_save / save_embedding_layers are not supported)"
    return "not a LoRA A/B weight of a supported module"


def _open(path: str):
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise FileNotFoundError(
            f"{path}: no {ADAPTER_WEIGHTS}"
            + (
                " (adapter_model.bin is a pickle, never read: re-save it with save_pretrained(safe_serialization=True))"
                if pickled
                else ""
            )
        )
    try:
        return weights, safetensors.safe_open(weights, framework="numpy")
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({reason(e)})") from None


def load_adapter(path: str, config: MistralConfig, *, check_finite: bool = True) -> tuple[LoraConfig, dict]:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) for the base model of
    `config` -> (LoraConfig, adapters): the tree of lora.init_lora (numpy float32 A [L, in..., r],
    B [L, r, out...]) for lora.attach / lora.merge_lora / training. CheckpointError (UnsupportedAdapter for
    features we lack) naming the file, tensor or setting otherwise."""
    path = os.fspath(path)
    cfg = read_adapter_config(path)
    rank = cfg["r"]
    weights, f = _open(path)
    index = _module_index(config)
    found: dict[tuple[str, int, str], str] = {}  # (target, layer, "A"/"B") -> tensor name
    # LoRA tensors first: an unsupported module says more than the full weights saved beside it.
    for name in sorted(f.keys(), key=lambda n: _LORA_TENSOR.fullmatch(n) is None):
        m = _LORA_TENSOR.fullmatch(name)
        module = m and m.group("module")
        if module and module not in index and "model." + module in index:
            module = "model." + module  # an adapter made on MistralModel rather than MistralForCausalLM
        if module not in index:
            if m:
                layer = re.search(r"layers\.(\d+)\.", module)
                why = (
                    f"layer {layer.group(1)}, but the base model has {config.n_layers} layers"
                    if layer and int(layer.group(1)) >= config.n_layers and module.rsplit(".", 1)[-1] in MODULE_TARGETS
                    else f"LoRA on module {short(module)}: adapters apply to {', '.join(MODULE_TARGETS)} of every layer"
                )
                raise UnsupportedAdapter(f"{weights}: tensor {short(name)}: {why}")
            raise UnsupportedAdapter(f"{weights}: tensor {short(name)} is {_why_not_lora(name)}")
        key = (*index[module], m.group("part"))
        if key in found:
            raise CheckpointError(
                f"{weights}: tensors {short(found[key])} and {short(name)} are both lora_{key[2]} "
                f"of {module} (several adapters in one file?)"
            )
        found[key] = name
    targets = tuple(t for t in TARGETS if any(k[0] == t for k in found))
    if not targets:
        raise CheckpointError(f"{weights}: no LoRA tensors (base_model.model.<module>.lora_A.weight)")
    for t in targets:
        for layer in range(config.n_layers):
            for part in "AB":
                if (t, layer, part) not in found:
                    module = next(k for k, v in index.items() if v == (t, layer))
                    raise UnsupportedAdapter(
                        f"{weights}: no lora_{part} for {module} (adapters on some layers or "
                        "modules only are not supported)"
                    )
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); ours is alpha / r
    spec = LoraConfig(rank=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), targets=targets)
    layers: dict = {}
    for w in spec.weights():
        shape = w.shape(config)
        shape_in, shape_out = shape[: w.n_in], shape[w.n_in :]
        n_in, n_out = math.prod(shape_in), math.prod(shape_out)
        t = next(k for k, v in TARGETS.items() if "layers/" + v == w.path)
        a = np.empty((config.n_layers, *shape_in, rank), np.float32)
        b = np.empty((config.n_layers, rank, *shape_out), np.float32)
        for layer in range(config.n_layers):
            for part, dst, want in (("A", a, (rank, n_in)), ("B", b, (n_out, rank))):
                name = found[(t, layer, part)]
                tensor = _tensor(f, name, weights, want, check_finite)
                dst[layer] = tensor.T.reshape(dst.shape[1:])
        _, group, leaf = w.path.split("/")
        layers.setdefault(group, {})[leaf + "_a"] = a
        layers[group][leaf + "_b"] = b
    return spec, {"layers": layers}


def _tensor(f, name: str, where: str, want: tuple[int, int], check_finite: bool) -> np.ndarray:
    sl = f.get_slice(name)
    shape, code = tuple(sl.get_shape()), sl.get_dtype()
    if shape != want:
        raise CheckpointError(
            f"{where}: tensor {short(name)} has shape {list(shape)}, expected {list(want)} "
            "(lora_A [r, in_features], lora_B [out_features, r]) for r in the adapter config "
            "and the base model's config"
        )
    if code not in ("F64", "F32", "F16", "BF16"):
        raise CheckpointError(f"{where}: tensor {short(name)} has dtype {code}; expected a float dtype")
    try:
        tensor = f.get_tensor(name)
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{where}: cannot read tensor {short(name)} ({reason(e)})") from None
    tensor = tensor.astype(np.float32)
    if check_finite and not np.isfinite(tensor).all():
        bad = tensor.size - np.count_nonzero(np.isfinite(tensor))
        raise CheckpointError(f"{where}: tensor {short(name)} has {bad} non-finite values (NaN/inf) of {tensor.size}")
    return tensor


def merge_adapter(params: dict, path: str, config: MistralConfig, *, check_finite: bool = True) -> dict:
    """`params` (the stacked tree of load_params or load_host_params, before tuning.for_inference) with the
    PEFT adapter in `path` folded into its weights (W + scale A B, in the params' dtype). Each merged leaf
    keeps its sharding (jax.Array) or stays on the host (numpy)."""
    import jax

    if not isinstance(params.get("layers"), dict):
        raise TypeError("merge_adapter takes the stacked param tree (merge before tuning.for_inference)")
    spec, adapters = load_adapter(path, config, check_finite=check_finite)
    merged = merge_lora(params, adapters, spec)
    layers = {g: dict(m) for g, m in merged["layers"].items()}
    for w in spec.weights():
        _, group, leaf = w.path.split("/")
        base = params["layers"][group][leaf]
        new = layers[group][leaf]
        layers[group][leaf] = jax.device_put(new, base.sharding) if isinstance(base, jax.Array) else np.asarray(new)
    return {**merged, "layers": layers}
