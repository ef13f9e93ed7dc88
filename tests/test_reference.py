"""Checks the float64 numpy oracle (tests/reference.py) against transformers' MistralForCausalLM."""

import numpy as np
import pytest
from hf_models import hf_logits, make_hf_model
from reference import forward_hf, forward_native, hf_to_native

# (config overrides, sequence length). Windows are several times shorter than the sequences.
CASES = {
    "w4_hd16": (dict(sliding_window=4), 40),
    "w7_hd24_3layers": (dict(sliding_window=7, head_dim=24, num_hidden_layers=3, vocab_size=103), 64),
    "w16_mqa_theta500": (dict(sliding_window=16, num_key_value_heads=1, rope_theta=500.0, vocab_size=97), 48),
    "w12_mha_eps": (dict(sliding_window=12, num_key_value_heads=4, rms_norm_eps=1e-3, intermediate_size=80), 50),
    "nowindow_hd24": (dict(sliding_window=None, head_dim=24, vocab_size=131), 40),
    "w5_tied": (dict(sliding_window=5, tie_word_embeddings=True, vocab_size=89), 44),
}


def _tokens(seed, vocab, T, B=2):
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T))


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request):
    overrides, T = CASES[request.param]
    seed = sorted(CASES).index(request.param)
    model, cfg, w = make_hf_model(seed, **overrides)
    toks = _tokens(seed, cfg["vocab_size"], T)
    return model, cfg, w, toks, forward_hf(w, cfg, toks)


def test_config_dict_is_config_json(case):
    _, cfg, w, _, _ = case
    assert "rope_theta" in cfg["rope_parameters"] and cfg["head_dim"]
    assert w["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])


def test_forward_hf_matches_transformers(case):
    model, cfg, w, toks, ref = case
    assert ref.dtype == np.float64 and ref.shape == toks.shape + (cfg["vocab_size"],)
    assert np.abs(ref).max() > 1.0  # large weights -> logits far from flat
    np.testing.assert_allclose(ref, hf_logits(model, toks), atol=1e-4, rtol=0)


def test_forward_native_matches_forward_hf(case):
    _, cfg, w, toks, ref = case
    nw, params = hf_to_native(w, cfg)
    assert set(params) >= {
        "dim",
        "n_layers",
        "head_dim",
        "hidden_dim",
        "n_heads",
        "n_kv_heads",
        "norm_eps",
        "vocab_size",
        "sliding_window",
        "rope_theta",
    }
    assert all(not k.startswith(("model.", "lm_head")) for k in nw)
    assert ("output.weight" in nw) == (not cfg["tie_word_embeddings"])
    np.testing.assert_allclose(forward_native(nw, params, toks), ref, atol=1e-9, rtol=0)


def test_wq_wk_permutation_is_needed(case):
    """Native weights without the row permutation must give different logits (rotary really differs)."""
    _, cfg, w, toks, ref = case
    nw, params = hf_to_native(w, cfg)
    for layer in range(params["n_layers"]):
        for n in ("wq", "wk"):
            nw[f"layers.{layer}.attention.{n}.weight"] = w[f"model.layers.{layer}.self_attn.{n[1]}_proj.weight"]
    assert np.abs(forward_native(nw, params, toks) - ref).max() > 1e-2


def test_hf_to_native_inverts_hf_conversion_permute(case):
    """HF's convert_mistral_weights_to_hf applies permute() to native wq/wk; hf_to_native must undo it."""
    _, cfg, w, _, _ = case
    nw, params = hf_to_native(w, cfg)

    def permute(t, n_heads):  # as in transformers' convert_mistral_weights_to_hf.py
        return t.reshape(n_heads, t.shape[0] // n_heads // 2, 2, t.shape[1]).transpose(0, 2, 1, 3).reshape(t.shape)

    for layer in range(params["n_layers"]):
        for n, heads in (("q", params["n_heads"]), ("k", params["n_kv_heads"])):
            np.testing.assert_array_equal(
                permute(nw[f"layers.{layer}.attention.w{n}.weight"], heads),
                w[f"model.layers.{layer}.self_attn.{n}_proj.weight"],
            )


def test_wider_window_rule_is_detected(case):
    """A rule letting W+1 keys through (i - j <= W) or only W-1 keys must give clearly different logits."""
    model, cfg, w, toks, ref = case
    W = cfg["sliding_window"]
    if W is None:
        # no window must differ from any window shorter than the sequence
        assert np.abs(forward_hf(w, {**cfg, "sliding_window": toks.shape[1] - 1}, toks) - ref).max() > 1e-2
        return
    hf = hf_logits(model, toks)
    for wrong in (W + 1, W - 1):
        diff = np.abs(forward_hf(w, {**cfg, "sliding_window": wrong}, toks) - hf)
        assert diff[:, : W - 1].max() < 1e-4  # positions < W-1 see all keys under either rule
        assert diff.max() > 1e-2


def test_window_counts_own_key():
    """With T == W every query sees its whole prefix, so the window is a no-op; at T == W + 1 it is not."""
    _, cfg, w = make_hf_model(11, sliding_window=6)
    toks = _tokens(11, cfg["vocab_size"], 6)
    nowin = {**cfg, "sliding_window": None}
    np.testing.assert_array_equal(forward_hf(w, cfg, toks), forward_hf(w, nowin, toks))
    toks = _tokens(11, cfg["vocab_size"], 7)
    d = np.abs(forward_hf(w, cfg, toks) - forward_hf(w, nowin, toks))
    assert d[:, :6].max() == 0 and d[:, 6].max() > 1e-2


def test_positions_offset():
    """Explicit absolute positions [B, T] (offset start, as after a prefix): rotary uses them, window is relative."""
    model, cfg, w = make_hf_model(12, sliding_window=6, head_dim=24)
    toks = _tokens(12, cfg["vocab_size"], 40)
    pos = np.arange(40)[None] + np.array([[37], [3]])
    ref = forward_hf(w, cfg, toks, positions=pos)
    np.testing.assert_allclose(ref, hf_logits(model, toks, positions=pos), atol=1e-4, rtol=0)
    nw, params = hf_to_native(w, cfg)
    np.testing.assert_allclose(forward_native(nw, params, toks, positions=pos), ref, atol=1e-9, rtol=0)
    # rotary is relative: a common shift changes nothing; a non-uniform position map does
    np.testing.assert_allclose(ref, forward_hf(w, cfg, toks), atol=1e-9, rtol=0)
    stretched = forward_hf(w, cfg, toks, positions=2 * np.arange(40))
    assert np.abs(stretched - ref).max() > 1e-2
    np.testing.assert_allclose(
        forward_native(nw, params, toks, positions=2 * np.arange(40)), stretched, atol=1e-9, rtol=0
    )


def test_rope_theta_from_either_key():
    _, cfg, w = make_hf_model(13, rope_theta=321.0)
    toks = _tokens(13, cfg["vocab_size"], 20)
    legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_theta": 321.0}
    np.testing.assert_array_equal(forward_hf(w, cfg, toks), forward_hf(w, legacy, toks))
