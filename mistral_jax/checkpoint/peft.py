"""LoRA adapters in the PEFT format, so that `peft` users load them over the transformers base model:

  adapter_config.json        LoraConfig fields (r, lora_alpha, target_modules, ...)
  adapter_model.safetensors  base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight [r, in]
                             base_model.model.model.layers.{l}.self_attn.q_proj.lora_B.weight [out, r]

Ours are A [L, in..., r] and B [L, r, out...] (lora.init_lora), x @ A @ B; PEFT's are torch Linear weights
(y = x A^T B^T), so each is transposed after flattening the head axes. Flattening (N, H) row-major gives
index n * H + h, the transformers layout of q/k/v/o_proj, and our q/k heads rotate halves as transformers'
do: no rotary permutation is needed. Module names come from the transformers names in params.WEIGHTS.
"""

from __future__ import annotations

import os

import numpy as np
import safetensors.numpy

from .. import params as params_lib
from ..config import MistralConfig
from ..lora import LoraConfig
from .files import write_json

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


def save_adapter(path: str, adapters: dict, spec: LoraConfig, config: MistralConfig,
                 base_model: str | None = None) -> None:
    """Writes `path`/adapter_config.json and adapter_model.safetensors (float32)."""
    tensors = adapter_tensors(adapters, spec)
    expected = config.n_layers * len(spec.targets) * 2
    if len(tensors) != expected:
        raise ValueError(f"LoRA tree holds {len(tensors)} PEFT tensors, expected {expected} "
                         f"({config.n_layers} layers x {len(spec.targets)} targets x A, B)")
    os.makedirs(path, exist_ok=True)
    safetensors.numpy.save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(os.path.join(path, ADAPTER_CONFIG), adapter_config(spec, base_model))
