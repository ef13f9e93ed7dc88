"""Independent float64 numpy forward pass of Mistral: a test oracle.

Deliberately imports nothing from mistral_jax. Two entry points:
  forward_hf(weights, cfg, tokens)         Hugging Face names/layout, rotary on halves (rotate_half)
  forward_native(weights, params, tokens)  Mistral native names/layout, rotary on interleaved pairs
Sliding window: query at absolute position i attends key j iff j <= i and i - j < W (W keys incl. its own);
W = None -> plain causal. The rule uses the given positions (same as indices for contiguous positions, which is
all transformers supports: it builds its mask from sequence indices and treats position jumps as packing).
"""

import numpy as np


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rope_halves(x, pos, theta):  # x [B,T,H,D]; pairs (x_k, x_{k+D/2}), as HF rotate_half
    d = x.shape[-1]
    ang = pos[:, :, None, None] * theta ** (-np.arange(0, d, 2) / d)  # [B,T,1,D/2]
    cos, sin, a, b = np.cos(ang), np.sin(ang), x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _rope_interleaved(x, pos, theta):  # pairs (x_2k, x_2k+1) as complex numbers, as mistral-inference
    d = x.shape[-1]
    ang = pos[:, :, None, None] * theta ** (-np.arange(0, d, 2) / d)
    xc = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)
    return np.stack([xc.real, xc.imag], axis=-1).reshape(x.shape)


def _forward(w, tokens, positions, *, n_layers, n_heads, n_kv, head_dim, eps, window, theta, rope, names):
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    pos = np.broadcast_to(np.arange(T) if positions is None else np.asarray(positions), (B, T)).astype(np.float64)
    f = lambda k: np.asarray(w[k], dtype=np.float64)  # noqa: E731
    h = f(names["embed"])[tokens]
    diff = pos[:, :, None] - pos[:, None, :]  # [B, Tq, Tk] = i - j
    allowed = (diff >= 0) & ((diff < window) if window is not None else True)
    for layer in range(n_layers):
        g = lambda k, layer=layer: f(names[k].format(layer))  # noqa: E731
        x = _rms_norm(h, g("attn_norm"), eps)
        q = rope((x @ g("wq").T).reshape(B, T, n_heads, head_dim), pos, theta)
        k = rope((x @ g("wk").T).reshape(B, T, n_kv, head_dim), pos, theta)
        v = (x @ g("wv").T).reshape(B, T, n_kv, head_dim)
        k, v = np.repeat(k, n_heads // n_kv, axis=2), np.repeat(v, n_heads // n_kv, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        s = np.where(allowed[:, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v).reshape(B, T, n_heads * head_dim)
        h = h + o @ g("wo").T
        x = _rms_norm(h, g("ffn_norm"), eps)
        h = h + (_silu(x @ g("w1").T) * (x @ g("w3").T)) @ g("w2").T
    head = names["head"] if names["head"] in w else names["embed"]
    return _rms_norm(h, f(names["norm"]), eps) @ f(head).T


HF_NAMES = dict(
    embed="model.embed_tokens.weight",
    norm="model.norm.weight",
    head="lm_head.weight",
    attn_norm="model.layers.{}.input_layernorm.weight",
    ffn_norm="model.layers.{}.post_attention_layernorm.weight",
    **{
        n: "model.layers.{}.self_attn.%s_proj.weight" % p
        for n, p in [("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")]
    },
    **{n: "model.layers.{}.mlp.%s_proj.weight" % p for n, p in [("w1", "gate"), ("w3", "up"), ("w2", "down")]},
)
NATIVE_NAMES = dict(
    embed="tok_embeddings.weight",
    norm="norm.weight",
    head="output.weight",
    attn_norm="layers.{}.attention_norm.weight",
    ffn_norm="layers.{}.ffn_norm.weight",
    **{n: "layers.{}.attention.%s.weight" % n for n in ("wq", "wk", "wv", "wo")},
    **{n: "layers.{}.feed_forward.%s.weight" % n for n in ("w1", "w2", "w3")},
)


def _hf_theta(cfg):
    return float(cfg["rope_theta"] if cfg.get("rope_theta") is not None else cfg["rope_parameters"]["rope_theta"])


def forward_hf(weights, cfg, tokens, positions=None):
    w = dict(weights)
    if cfg.get("tie_word_embeddings"):
        w.pop("lm_head.weight", None)  # falls back to the embedding
    return _forward(
        w,
        tokens,
        positions,
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        eps=cfg["rms_norm_eps"],
        window=cfg.get("sliding_window"),
        theta=_hf_theta(cfg),
        rope=_rope_halves,
        names=HF_NAMES,
    )


def forward_native(weights, params, tokens, positions=None):
    return _forward(
        weights,
        tokens,
        positions,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv=params["n_kv_heads"],
        head_dim=params["head_dim"],
        eps=params["norm_eps"],
        window=params.get("sliding_window"),
        theta=float(params.get("rope_theta") or 10000.0),
        rope=_rope_interleaved,
        names=NATIVE_NAMES,
    )


def _unpermute(w, n_heads):  # HF rows [head, half, k] -> native rows [head, k, re/im]
    w = np.asarray(w)
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def hf_to_native(weights, cfg):
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    params = dict(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // nh,
        hidden_dim=cfg["intermediate_size"],
        n_heads=nh,
        n_kv_heads=nkv,
        norm_eps=cfg["rms_norm_eps"],
        vocab_size=cfg["vocab_size"],
        sliding_window=cfg.get("sliding_window"),
        rope_theta=_hf_theta(cfg),
    )
    out = {}
    for key in ("embed", "norm", "head"):
        if HF_NAMES[key] in weights and not (key == "head" and cfg.get("tie_word_embeddings")):
            out[NATIVE_NAMES[key]] = np.asarray(weights[HF_NAMES[key]])
    for layer in range(params["n_layers"]):
        for key in ("attn_norm", "ffn_norm", "wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            t = np.asarray(weights[HF_NAMES[key].format(layer)])
            t = _unpermute(t, nh) if key == "wq" else _unpermute(t, nkv) if key == "wk" else t
            out[NATIVE_NAMES[key].format(layer)] = t
    return out, params
