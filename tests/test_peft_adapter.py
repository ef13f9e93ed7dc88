"""PEFT adapters in: a LoRA adapter trained with `peft` on transformers' Mistral loads as our adapters
(checkpoint.load_adapter), gives transformers + peft's logits attached and merged, and their greedy tokens;
features we do not implement are refused by name."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from hf_models import ALL_TARGETS as ALL
from hf_models import hf_logits, make_hf_model, make_peft

from mistral_jax import checkpoint as ck
from mistral_jax import lora
from mistral_jax import model as model_lib
from mistral_jax.config import Numerics
from mistral_jax.generator import Generator, SamplingParams


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(5, sliding_window=8)[0]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, hf_model):
    d = str(tmp_path_factory.mktemp("base"))
    hf_model.save_pretrained(d)
    return d


def tokens(vocab, b=2, t=24, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, (b, t)).astype(np.int32)


@pytest.mark.parametrize("targets,rslora", [(ALL, False), (["q_proj", "v_proj", "down_proj"], True)])
def test_peft_adapter_gives_peft_logits(tmp_path, hf_model, base_dir, targets, rslora):
    out = str(tmp_path / "adapter")
    peft_model = make_peft(hf_model, out, target_modules=targets, use_rslora=rslora)
    config = ck.load_config(base_dir)
    params = ck.load_params(base_dir)
    spec, adapters = ck.load_adapter(out, config)
    assert spec.rank == 4 and spec.targets == tuple(t for t in lora.TARGETS if f"{t}_proj" in targets)
    assert spec.scale == pytest.approx(8 / 2 if rslora else 8 / 4)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), adapters) == jax.tree.map(
        lambda x: (x.shape, x.dtype), lora.lora_shapes(config, spec)
    )
    toks = tokens(config.vocab_size)
    theirs = hf_logits(peft_model, toks)
    assert np.abs(theirs - hf_logits(hf_model, toks)).max() > 1e-1  # the adapter moves the model
    ours = np.asarray(model_lib.logits(lora.attach(params, adapters, spec), toks, config=config))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    merged = np.asarray(model_lib.logits(lora.merge_lora(params, adapters, spec), toks, config=config))
    np.testing.assert_allclose(merged, theirs, atol=1e-4, rtol=0)
    merged = np.asarray(model_lib.logits(ck.merge_adapter(params, out, config), toks, config=config))
    np.testing.assert_allclose(merged, theirs, atol=1e-4, rtol=0)


def test_peft_adapter_round_trips_through_our_writer(tmp_path, hf_model, base_dir):
    out, again = str(tmp_path / "adapter"), str(tmp_path / "again")
    make_peft(hf_model, out)
    config = ck.load_config(base_dir)
    spec, adapters = ck.load_adapter(out, config)
    ck.save_adapter(again, adapters, spec, config)
    theirs = safetensors.numpy.load_file(os.path.join(out, ck.ADAPTER_WEIGHTS))
    ours = safetensors.numpy.load_file(os.path.join(again, ck.ADAPTER_WEIGHTS))
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_converted_with_adapter_gives_peft_logits(tmp_path, hf_model, base_dir):
    """checkpoint.convert(..., adapter=DIR): the merged transformers export runs like transformers + peft; in
    bfloat16 each adapted weight is bfloat16(W + scale B A), W as stored in bfloat16."""
    from transformers import MistralForCausalLM

    out, dst, dst16 = str(tmp_path / "adapter"), str(tmp_path / "merged"), str(tmp_path / "merged16")
    peft_model = make_peft(hf_model, out)
    conv = ck.convert(base_dir, dst, to="hf", adapter=out)
    toks = tokens(conv.config.vocab_size)
    merged = MistralForCausalLM.from_pretrained(dst, attn_implementation="eager").float().eval()
    np.testing.assert_allclose(hf_logits(merged, toks), hf_logits(peft_model, toks), atol=1e-4, rtol=0)

    assert ck.convert(base_dir, dst16, to="hf", dtype="bfloat16", adapter=out).dtype == "bfloat16"
    got = safetensors.numpy.load_file(os.path.join(dst16, "model.safetensors"))
    lora_w = safetensors.numpy.load_file(os.path.join(out, ck.ADAPTER_WEIGHTS))
    name = "model.layers.1.self_attn.k_proj"
    w = hf_model.state_dict()[name + ".weight"].to(torch.bfloat16).float().numpy()
    a, b = (lora_w[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
    want = (w + 2.0 * b @ a).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_allclose(got[name + ".weight"].astype(np.float32), want, rtol=2**-7, atol=0)


def test_greedy_tokens_equal_peft_generate(tmp_path, hf_model, base_dir):
    out = str(tmp_path / "adapter")
    peft_model = make_peft(hf_model, out, seed=3)
    config = ck.load_config(base_dir)
    params = ck.load_params(base_dir)
    prompts = [list(range(5, 17)), list(range(30, 35)), [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 40, 41]]
    n_new = 20  # with the prompts, past the window of 8
    peft_model.generation_config.eos_token_id = None  # fixed length on both sides
    want = []
    for p in prompts:
        with torch.no_grad():
            ids = peft_model.generate(
                input_ids=torch.tensor([p]),
                attention_mask=torch.ones_like(torch.tensor([p])),
                max_new_tokens=n_new,
                do_sample=False,
                pad_token_id=0,
            )
        want.append(ids[0, len(p) :].tolist())
    # The merged weights, as Mistral.load(base, adapter=DIR) serves them (attached adapters: the logits test).
    merged = ck.merge_adapter(params, out, config)
    got = Generator(merged, config, Numerics(), batch_size=2).generate(
        prompts, SamplingParams(max_new_tokens=n_new, stop_token_ids=())
    )
    assert [c.ids for c in got] == want


def _edit_config(src, dst, **changes):
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as fh, open(os.path.join(dst, f), "wb") as out:
            out.write(fh.read())
    with open(os.path.join(dst, ck.ADAPTER_CONFIG)) as fh:
        cfg = json.load(fh)
    cfg.update(changes)
    with open(os.path.join(dst, ck.ADAPTER_CONFIG), "w") as fh:
        json.dump(cfg, fh)
    return dst


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(bias="all"), "trained biases: bias='all'"),
        (dict(lora_bias=True), "LoRA bias"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["q_proj", "lm_head"]), "module 'lm_head' is not supported"),
        (dict(init_lora_weights="pissa"), "changes the base weights"),
        (dict(peft_type="IA3"), "peft_type 'IA3'"),
        (dict(r=0), "r must be a positive number"),
    ],
)
def test_unsupported_settings_are_named(tmp_path, hf_model, base_dir, changes, match):
    out = str(tmp_path / "adapter")
    make_peft(hf_model, out, target_modules=["q_proj", "v_proj"])
    bad = _edit_config(out, str(tmp_path / "bad"), **changes)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load_adapter(bad, ck.load_config(base_dir))


def test_unsupported_tensors_are_named(tmp_path, hf_model, base_dir):
    config = ck.load_config(base_dir)
    out = str(tmp_path / "dora")
    make_peft(hf_model, out, target_modules=["q_proj"], use_dora=True)
    _edit_config(out, str(tmp_path / "dora2"), use_dora=False)
    with pytest.raises(ck.UnsupportedAdapter, match="DoRA magnitude vector"):
        ck.load_adapter(str(tmp_path / "dora2"), config)
    out = str(tmp_path / "lm_head")
    make_peft(hf_model, out, target_modules=["q_proj", "lm_head"])
    _edit_config(out, str(tmp_path / "lm_head2"), target_modules=["q_proj"])
    with pytest.raises(ck.UnsupportedAdapter, match="LoRA on module 'lm_head'"):
        ck.load_adapter(str(tmp_path / "lm_head2"), config)
    out = str(tmp_path / "some_layers")
    make_peft(hf_model, out, target_modules=["q_proj"], layers_to_transform=[1])
    _edit_config(out, str(tmp_path / "some2"), layers_to_transform=None)
    with pytest.raises(ck.UnsupportedAdapter, match=r"no lora_A for model\.layers\.0\.self_attn\.q_proj"):
        ck.load_adapter(str(tmp_path / "some2"), config)
    # An adapter for a different model: shapes named.
    small = make_hf_model(1, hidden_size=32, head_dim=8)[0]
    out = str(tmp_path / "other")
    make_peft(small, out, target_modules=["q_proj"])
    with pytest.raises(ck.CheckpointError, match=r"has shape \[4, 32\], expected \[4, 64\]"):
        ck.load_adapter(out, config)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        ck.load_adapter(base_dir, config)
