"""model.py and lora.py against transformers and independent computations: the residual stream and attention
probabilities a researcher looks at, and adapters attached against adapters merged in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from hf_models import make_hf_model

from mistral_jax import lora, model
from mistral_jax import params as params_lib
from mistral_jax.config import MistralConfig


def _ours(weights, c):
    """Our param tree from a transformers state dict, through the param spec's views."""

    def leaf(w):
        out = np.zeros(w.full_shape(c), np.float32)
        for i in range(c.n_layers if w.layered else 1):
            view, shape = w.view(out[i] if w.layered else out, c)
            view[...] = weights[w.hf.format(l=i)].reshape(shape)
        return jnp.asarray(out)

    return params_lib.build(c, leaf)


def test_hidden_states_and_attention_weights_equal_transformers_past_the_window():
    hf, cfg, weights = make_hf_model(3, sliding_window=6, num_hidden_layers=3)
    c = MistralConfig.from_hf(cfg)
    p = _ours(weights, c)
    tokens = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 20))
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tokens), output_hidden_states=True, output_attentions=True)
    logits, hidden = jax.jit(lambda p, t: model.forward(p, t, config=c, hidden_states=True))(p, jnp.asarray(tokens))
    assert hidden.shape == (c.n_layers + 1, 2, 20, c.dim)
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=1e-4)
    for i, h in enumerate(ref.hidden_states):
        np.testing.assert_allclose(hidden[i], h.numpy(), atol=1e-4, rtol=1e-4, err_msg=f"hidden state {i}")
    for layer in range(c.n_layers):
        probs = model.attention_weights(p, hidden[layer], layer, config=c)
        np.testing.assert_allclose(probs, ref.attentions[layer].numpy(), atol=1e-5, err_msg=f"layer {layer}")
        assert float(probs[0, 0, 19, :13].max()) == 0.0  # the window: 6 keys, the query's own included


def test_attached_adapters_equal_the_weights_merged_in_numpy():
    _, cfg, weights = make_hf_model(4)
    c = MistralConfig.from_hf(cfg)
    p = _ours(weights, c)
    spec = lora.LoraConfig(rank=3, alpha=6.0, targets=("q", "o", "down"))
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) * 0.05),
        lora.init_lora(c, spec, jax.random.key(0)),
    )
    merged = jax.tree.map(lambda x: np.array(x, copy=True), p)
    for group, name in (("attention", "wq"), ("attention", "wo"), ("feed_forward", "w2")):
        a, b = np.asarray(adapters["layers"][group][name + "_a"]), np.asarray(adapters["layers"][group][name + "_b"])
        w = merged["layers"][group][name]
        for i in range(c.n_layers):  # W + (alpha / r) A B with A [in..., r], B [r, out...], by flattening
            delta = a[i].reshape(-1, spec.rank) @ b[i].reshape(spec.rank, -1)
            w[i] = w[i] + 2.0 * delta.reshape(w[i].shape)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg["vocab_size"], (2, 16)))
    want = model.logits(merged, tokens, config=c)
    np.testing.assert_allclose(model.logits(lora.attach(p, adapters, spec), tokens, config=c), want, atol=1e-4)
    np.testing.assert_allclose(model.logits(lora.merge_lora(p, adapters, spec), tokens, config=c), want, atol=1e-4)
