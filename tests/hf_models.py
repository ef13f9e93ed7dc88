"""Small random Hugging Face Mistral models for tests (shared helper).

make_hf_model(seed, **overrides) -> (torch_model, hf_config_dict, weights_np)
  * torch_model: MistralForCausalLM in float32, eval mode, eager attention.
  * hf_config_dict: model.config.to_dict() (what config.json holds; rope theta under
    rope_parameters["rope_theta"], "head_dim" always set).
  * weights_np: {HF state-dict name: float32 numpy array}.
Weights are re-initialised with large values (linears N(0, 0.2), embeddings N(0, 1),
norms 1 +- 0.3) so that windowing / rotary mistakes change the logits visibly; HF's
default init (std 0.02) makes attention almost uniform and hides such bugs.
Note: MistralConfig defaults sliding_window to 4096, pass sliding_window=None for none.
"""

import copy

import numpy as np
import torch
from transformers import MistralConfig, MistralForCausalLM

DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=101,
    sliding_window=8,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def make_hf_model(seed, linear_std=0.2, embed_std=1.0, norm_spread=0.3, **config_overrides):
    kwargs = {**DEFAULTS, **config_overrides}
    config = MistralConfig(**kwargs)
    config._attn_implementation = "eager"  # eager path builds the sliding-window mask explicitly
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head shares embed_tokens: visited once
            if "norm" in name:
                p.copy_(1.0 + norm_spread * (2 * torch.rand(p.shape, generator=gen) - 1))
            elif "embed_tokens" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(linear_std * torch.randn(p.shape, generator=gen))
    weights = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return model, model.config.to_dict(), weights


def hf_logits(model, tokens, positions=None, dtype=torch.float32):
    """Run the torch model on int tokens [B, T]; returns float64 numpy logits [B, T, V]."""
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)  # leave the caller's model untouched
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    pos = None if positions is None else torch.as_tensor(np.asarray(positions), dtype=torch.long)
    if pos is not None and pos.ndim == 1:
        pos = pos[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    return out.double().numpy()


# PEFT names of the seven projections LoRA can target.
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft(model, out, seed=0, **lora_kw):
    """An adapter made by peft itself, A and B random (B non-zero, as after training), saved as peft saves."""
    from peft import LoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**{**kw, **lora_kw}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model
