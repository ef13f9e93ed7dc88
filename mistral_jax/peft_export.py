"""LoRA adapters in the PEFT format, so that `peft` users load them over the transformers base model:

  adapter_config.json        LoraConfig fields (r, lora_alpha, target_modules, ...)
  adapter_model.safetensors  base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight [r, in]
                             base_model.model.model.layers.{l}.self_attn.q_proj.lora_B.weight [out, r]

Ours are A [L, in..., r] and B [L, r, out...] (model.py), x @ A @ B; PEFT's are torch Linear weights
(y = x A^T B^T), so each is transposed after flattening the head axes. Flattening (N, H) row-major gives
index n * H + h, the transformers layout of q/k/v/o_proj (checkpoint.py's export does the same), and our
q/k heads already rotate halves as transformers does: no rotary permutation is needed.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .config import MistralConfig
from .model import LORA_TARGETS, LoraSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Our leaf name -> the transformers module under model.layers.{l}.
HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}


def adapter_tensors(lora, spec: LoraSpec) -> dict[str, np.ndarray]:
    """Our adapter tree (init_lora's layout, any leaf type) -> {PEFT tensor name: float32 [r, in] / [out, r]}."""
    out = {}
    for mods in lora["layers"].values():
        for key in sorted(mods):
            if not key.endswith("_a"):
                continue
            name = key[:-2]
            a = np.asarray(mods[name + "_a"], np.float32)  # [L, in..., r]
            b = np.asarray(mods[name + "_b"], np.float32)  # [L, r, out...]
            r = spec.rank
            for layer in range(a.shape[0]):
                prefix = f"base_model.model.model.layers.{layer}.{HF_MODULES[name]}"
                out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[layer].reshape(-1, r).T)
                out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[layer].reshape(r, -1).T)
    return out


def adapter_config(spec: LoraSpec, base_model: str | None = None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(HF_MODULES[LORA_TARGETS[t]].split(".")[-1] for t in spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # scale alpha / r, as ours
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(path: str, lora, spec: LoraSpec, config: MistralConfig, base_model: str | None = None) -> None:
    """Writes `path`/adapter_config.json and adapter_model.safetensors (float32)."""
    from safetensors.numpy import save_file

    tensors = adapter_tensors(lora, spec)
    expected = config.n_layers * len(spec.targets) * 2
    if len(tensors) != expected:
        raise ValueError(f"LoRA tree holds {len(tensors)} PEFT tensors, expected {expected} "
                         f"({config.n_layers} layers x {len(spec.targets)} targets x A, B)")
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(spec, base_model), f, indent=2)
        f.write("\n")
