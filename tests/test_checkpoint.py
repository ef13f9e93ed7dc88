"""Checkpoint formats: HF / native import, orbax save/restore (and v0.1 checkpoints), HF / native / PEFT export,
errors, memory.

The expected params are built here from the torch weights with the mapping written out independently of
mistral_jax.checkpoint (linear weights transposed, heads split), and the native layout comes from the numpy
oracle (tests/reference.py::hf_to_native), so the rotary permutation is checked against code that was not
written with ours.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
from hf_models import hf_logits, make_hf_model
from reference import forward_native, hf_to_native
from transformers import MistralForCausalLM

from mistral_jax import checkpoint as ck
from mistral_jax import model as model_lib
from mistral_jax import params as params_lib
from mistral_jax.config import MistralConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def expected_params(w: dict, cfg: dict) -> dict:
    """Our param tree from HF state-dict arrays, straight from the contract (float32)."""
    D, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    N, K, H = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    f = lambda name: np.asarray(w[name], np.float32)  # noqa: E731
    per = lambda fmt, fn: np.stack([fn(f(fmt.format(i))) for i in range(L)])  # noqa: E731
    p = "model.layers.{}."
    out = {
        "tok_embeddings": {"embedding": f("model.embed_tokens.weight")},
        "layers": {
            "attention_norm": {"scale": per(p + "input_layernorm.weight", lambda x: x)},
            "attention": {
                "wq": per(p + "self_attn.q_proj.weight", lambda x: x.T.reshape(D, N, H)),
                "wk": per(p + "self_attn.k_proj.weight", lambda x: x.T.reshape(D, K, H)),
                "wv": per(p + "self_attn.v_proj.weight", lambda x: x.T.reshape(D, K, H)),
                "wo": per(p + "self_attn.o_proj.weight", lambda x: x.T.reshape(N, H, D)),
            },
            "ffn_norm": {"scale": per(p + "post_attention_layernorm.weight", lambda x: x)},
            "feed_forward": {
                "w1": per(p + "mlp.gate_proj.weight", lambda x: x.T),
                "w2": per(p + "mlp.down_proj.weight", lambda x: x.T),
                "w3": per(p + "mlp.up_proj.weight", lambda x: x.T),
            },
        },
        "norm": {"scale": f("model.norm.weight")},
    }
    if not cfg.get("tie_word_embeddings"):
        out["output"] = {"kernel": f("lm_head.weight").T}
    return out


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = _get(want, path)
        assert g.shape == w.shape, path
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))


def _get(tree, path):
    for k in path:
        tree = tree[k.key if hasattr(k, "key") else k.idx]
    return tree


def _tokens(vocab, T=40, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, T))


@pytest.fixture(scope="module")
def hf_model():
    """A windowed random model (window 8, non-default theta) with torch weights and config."""
    return make_hf_model(3, rope_theta=5e5)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model):
    model, _, _ = hf_model
    d = str(tmp_path_factory.mktemp("hf") / "single")
    model.save_pretrained(d)
    return d


# ---------------------------------------------------------------------------------------------------------------
# Corrupt safetensors files
# ---------------------------------------------------------------------------------------------------------------
def test_corrupt_safetensors_files_name_the_file(tmp_path, hf_dir):
    raw = open(os.path.join(hf_dir, "model.safetensors"), "rb").read()
    n = int.from_bytes(raw[:8], "little")
    for name, data in [("truncated", raw[:-10]), ("short", raw[:20]), ("garbage", raw[:8] + b"{" * n + raw[8 + n :])]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_bytes(open(os.path.join(hf_dir, "config.json"), "rb").read())
        (d / "model.safetensors").write_bytes(data)
        with pytest.raises(ck.CheckpointError, match=rf"{name}/model\.safetensors: not a readable safetensors file"):
            ck.load_params(str(d))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face import
# ---------------------------------------------------------------------------------------------------------------
def test_detect_format_and_config(hf_dir, hf_model):
    _, cfg, _ = hf_model
    assert ck.detect_format(hf_dir) == "hf"
    c = ck.load_config(hf_dir)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size) == (
        64,
        2,
        4,
        2,
        16,
        96,
        101,
    )
    assert c.sliding_window == 8 and c.rope_theta == 5e5
    assert ck.load_config(hf_dir, sliding_window=None).sliding_window is None


@pytest.mark.parametrize("src_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_import_matches_torch_weights(tmp_path, hf_model, src_dtype, sharded):
    model, cfg, _ = hf_model
    m = copy.deepcopy(model).to(TORCH_DTYPES[src_dtype])  # the fixture's model stays float32
    d = str(tmp_path / "hf")
    m.save_pretrained(d, max_shard_size="20KB" if sharded else "5GB")
    weights = {k: v.float().numpy() for k, v in m.state_dict().items()}
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json")) == sharded
    if sharded:
        assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 3
    want = expected_params(weights, cfg)  # low-precision values are exact in float32
    params = ck.load_params(d)
    assert all(isinstance(x, jax.Array) and x.dtype == np.float32 for x in jax.tree.leaves(params))
    assert_trees_equal(params, want)
    # Loading into another dtype rounds like a numpy cast of the float32 values.
    p16 = ck.load_params(d, dtype="bfloat16")
    assert_trees_equal(p16, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), want))


def test_hf_tied_embeddings(tmp_path):
    model, cfg, w = make_hf_model(5, tie_word_embeddings=True)
    d = str(tmp_path / "tied")
    model.save_pretrained(d)
    assert "lm_head.weight" not in safetensors.numpy.load_file(os.path.join(d, "model.safetensors"))
    config = ck.load_config(d)
    assert config.tie_embeddings
    params = ck.load_params(d)
    assert "output" not in params
    assert_trees_equal(params, expected_params(w, cfg))
    ck.export_hf(str(tmp_path / "out"), params, config, dtype="float32")
    back = MistralForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    toks = _tokens(cfg["vocab_size"])
    np.testing.assert_allclose(hf_logits(back, toks), hf_logits(model, toks), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Mistral-native import / export (rotary permutation)
# ---------------------------------------------------------------------------------------------------------------
def _write_native(d, native_w, native_params):
    os.makedirs(d)
    safetensors.numpy.save_file(native_w, os.path.join(d, "consolidated.safetensors"))
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump(native_params, f)


def test_native_import_equals_hf_import(tmp_path, hf_dir, hf_model):
    _, cfg, w = hf_model
    native_w, native_params = hf_to_native(w, cfg)
    d = str(tmp_path / "native")
    _write_native(d, native_w, native_params)
    assert ck.detect_format(d) == "native"
    c_native, c_hf = ck.load_config(d), ck.load_config(hf_dir)
    for field in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "hidden_dim",
        "vocab_size",
        "sliding_window",
        "rope_theta",
        "norm_eps",
    ):
        assert getattr(c_native, field) == getattr(c_hf, field), field
    assert_trees_equal(ck.load_params(d), ck.load_params(hf_dir))


def test_native_export_matches_oracle_layout(tmp_path, hf_dir, hf_model):
    model, cfg, w = hf_model
    native_w, _ = hf_to_native(w, cfg)
    params, config = ck.load_params(hf_dir), ck.load_config(hf_dir)
    out = str(tmp_path / "native_out")
    ck.export_native(out, params, config, dtype="float32")
    assert ck.detect_format(out) == "native"
    got = safetensors.numpy.load_file(os.path.join(out, "consolidated.safetensors"))
    assert set(got) == set(native_w)
    for k, v in native_w.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # The exported files run in the oracle's interleaved-rotary forward like the torch model.
    params_json = json.load(open(os.path.join(out, "params.json")))
    toks = _tokens(cfg["vocab_size"])
    np.testing.assert_allclose(forward_native(got, params_json, toks), hf_logits(model, toks), atol=1e-4, rtol=0)


def test_leaf_shapes_match_the_model():
    for config in (
        MistralConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48),
        MistralConfig(
            vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=40, tie_embeddings=True
        ),
    ):
        got = {
            jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(params_lib.param_shapes(config))
        }
        assert got == params_lib.leaf_shapes(config)
        # and one stored tensor per layer of each leaf, of the size of that layer
        for w in params_lib.weights(config):
            assert np.prod(w.stored_shape(config)) == np.prod(w.shape(config)), w.path


def test_model_runs_native_and_hf_checkpoints_like_torch(tmp_path, hf_dir, hf_model):
    model, cfg, w = hf_model
    native_w, native_params = hf_to_native(w, cfg)
    d = str(tmp_path / "native")
    _write_native(d, native_w, native_params)
    toks = _tokens(cfg["vocab_size"], T=40)  # 5x the window
    want = hf_logits(model, toks)
    for path in (hf_dir, d):
        config = ck.load_config(path)
        got = np.asarray(model_lib.logits(ck.load_params(path), toks, config=config))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=path)


# ---------------------------------------------------------------------------------------------------------------
# Orbax (our format)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_bit_exact(tmp_path, hf_dir, dtype):
    config = ck.load_config(hf_dir)
    params = ck.load_params(hf_dir, dtype=dtype)
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"not really sentencepiece")
    out = str(tmp_path / "ckpt")
    ck.save(out, params, config, tokenizer=str(tok))
    assert ck.detect_format(out) == "orbax"
    assert sorted(os.listdir(out)) == ["mistral_jax.checksums.json", "mistral_jax.json", "params", "tokenizer.model"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "tokenizer.model"]  # no temp dirs left behind
    assert ck.load_config(out) == config
    back = ck.load_params(out, dtype=dtype)
    assert all(x.dtype == np.dtype(NP_DTYPES[dtype]) for x in jax.tree.leaves(back))
    assert_trees_equal(back, params)
    # Restoring into another dtype casts after the checks (while reading with check_finite=False).
    assert_trees_equal(ck.load_params(out, dtype="float32"), jax.tree.map(lambda x: np.asarray(x, np.float32), params))


def test_convert_hf_to_orbax_and_back(tmp_path, hf_dir, hf_model):
    model, cfg, _ = hf_model
    (tmp_path / "src").mkdir()
    for f in os.listdir(hf_dir):
        os.link(os.path.join(hf_dir, f), tmp_path / "src" / f)
    (tmp_path / "src" / "tokenizer.model").write_bytes(b"tok")
    done = ck.convert(str(tmp_path / "src"), str(tmp_path / "ox"), to="orbax")
    assert done.dtype == "float32" and done.source_format == "hf" and done.config == ck.load_config(hf_dir)
    assert (tmp_path / "ox" / "tokenizer.model").read_bytes() == b"tok"
    assert_trees_equal(ck.load_params(str(tmp_path / "ox")), ck.load_params(hf_dir))
    assert ck.convert(str(tmp_path / "ox"), str(tmp_path / "hf2"), to="hf").dtype == "float32"  # kept
    assert (tmp_path / "hf2" / "tokenizer.model").exists()
    back = MistralForCausalLM.from_pretrained(str(tmp_path / "hf2"), attn_implementation="eager")
    toks = _tokens(cfg["vocab_size"])
    np.testing.assert_allclose(hf_logits(back, toks), hf_logits(model, toks), atol=1e-5, rtol=0)
    with pytest.raises(FileExistsError, match="exists"):
        ck.convert(str(tmp_path / "src"), str(tmp_path / "ox"), to="orbax")


def test_orbax_save_is_crash_safe(tmp_path, hf_dir, monkeypatch):
    config = ck.load_config(hf_dir)
    params = ck.load_params(hf_dir)
    out = str(tmp_path / "ckpt")
    ck.save(out, params, config)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    # Fails after orbax has written the new params, before the save completes.
    monkeypatch.setattr(ck.files, "write_json", crash)
    doubled = jax.tree.map(lambda x: x * 2, params)
    with pytest.raises(RuntimeError, match="disk full"):
        ck.save(out, doubled, config)
    with pytest.raises(RuntimeError, match="disk full"):
        ck.save(str(tmp_path / "fresh"), doubled, config)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no 'fresh', no partial dirs
    assert_trees_equal(ck.load_params(out), params)  # the previous checkpoint, intact
    # A later successful save replaces it.
    ck.save(out, doubled, config)
    assert_trees_equal(ck.load_params(out), doubled)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ck.save(out, params, config, overwrite=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a checkpoint directory"):
        ck.save(str(tmp_path / "notes"), params, config)


def test_orbax_save_killed_midway_leaves_previous(tmp_path, hf_dir):
    """A hard crash (process exits inside the save) never exposes a half checkpoint."""
    out = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from mistral_jax import checkpoint as ck
        config, params = ck.load_config({hf_dir!r}), ck.load_params({hf_dir!r})
        ck.save({str(out)!r}, params, config)
        ck.files.write_json = lambda *a: os._exit(3)   # dies after the orbax write, mid-save
        ck.save({str(out)!r}, params, config.replace(norm_eps=1e-3))
    """)
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    assert r.returncode == 3, r.stderr[-2000:]
    assert ck.load_config(str(out)).norm_eps == 1e-5
    assert_trees_equal(ck.load_params(str(out)), ck.load_params(hf_dir))
    assert ".ckpt.partial" in os.listdir(tmp_path)  # left by the crash; the next save clears it
    ck.save(str(out), ck.load_params(hf_dir), ck.load_config(hf_dir))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_sharded_loading_on_a_mesh(tmp_path, hf_dir):
    """load_params with shardings (safetensors and orbax) on 4 CPU devices gives sharded, equal arrays."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from mistral_jax import checkpoint as ck
        from mistral_jax import params as params_lib
        assert jax.device_count() == 4
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
        config = ck.load_config({hf_dir!r})
        def spec(leaf, shape):
            if leaf.endswith(("wq", "wk", "wv")):
                return P(None, "data", "model", None)
            if leaf.endswith("wo"):
                return P(None, "model", None, "data")
            if len(shape) == 3:
                return P(None, "data", "model")
            return P()
        shardings = {{}}
        for leaf, shape in params_lib.leaf_shapes(config).items():
            params_lib.tree_set(shardings, leaf, NamedSharding(mesh, spec(leaf, shape)))
        ref = ck.load_params({hf_dir!r})
        a = ck.load_params({hf_dir!r}, shardings=shardings)
        ck.save({str(tmp_path / "ox")!r}, a, config)
        b = ck.load_params({str(tmp_path / "ox")!r}, shardings=shardings, dtype="bfloat16")
        for x, y, r, s in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(ref),
                              jax.tree.leaves(shardings)):
            assert x.sharding == s and y.sharding == s, (x.sharding, s)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(r))
            np.testing.assert_array_equal(np.asarray(y), np.asarray(r).astype(y.dtype))
        wq = a["layers"]["attention"]["wq"]
        assert wq.addressable_shards[0].data.shape == (2, 32, 2, 16)
        print("ok")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# HF export
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [8, None], ids=["window8", "nowindow"])
def test_export_hf_matches_torch(tmp_path, window):
    model, cfg, w = make_hf_model(7, sliding_window=window, rope_theta=2e4)
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    params, config = ck.load_params(src), ck.load_config(src)
    toks = _tokens(cfg["vocab_size"], T=40)
    want = hf_logits(model, toks)
    for name, kw in [("single", {}), ("sharded", {"max_shard_bytes": 40_000})]:
        out = str(tmp_path / name)
        ck.export_hf(out, params, config, dtype="float32", **kw)
        files = sorted(os.listdir(out))
        if name == "single":
            assert files == ["config.json", "model.safetensors"]
        else:
            assert "model.safetensors.index.json" in files and "model-00001-of-" in files[1]
            index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
            assert set(index["weight_map"]) == set(w)
            assert index["metadata"]["total_size"] == sum(v.nbytes for v in w.values())
            shards = sorted(set(index["weight_map"].values()))
            assert shards == [f for f in files if f.endswith(".safetensors")] and len(shards) > 2
            # In order (embedding first, head last), each shard within the limit unless one tensor is larger.
            assert index["weight_map"]["model.embed_tokens.weight"] == shards[0]
            assert index["weight_map"]["lm_head.weight"] == shards[-1]
            for f in shards:
                size = sum(w[k].nbytes for k, s in index["weight_map"].items() if s == f)
                n = sum(1 for s in index["weight_map"].values() if s == f)
                assert size <= 40_000 or n == 1, (f, size, n)
        back = MistralForCausalLM.from_pretrained(out, attn_implementation="eager")
        assert back.config.sliding_window == window
        np.testing.assert_allclose(hf_logits(back, toks), want, atol=1e-5, rtol=0, err_msg=name)
        for k, v in back.state_dict().items():  # and the weights themselves, bit for bit
            np.testing.assert_array_equal(v.numpy(), w[k], err_msg=k)


def test_export_failure_leaves_nothing(tmp_path, hf_dir, monkeypatch):
    """An export that fails midway (a shard's write) leaves no destination and no partial directory, and a
    previous export at the destination intact."""
    params, config = ck.load_params(hf_dir), ck.load_config(hf_dir)
    real, calls = safetensors.numpy.save_file, []

    def second_fails(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", second_fails)
    with pytest.raises(OSError, match="disk full"):
        ck.export_hf(str(tmp_path / "out"), params, config, "float32", max_shard_bytes=40_000)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    ck.export_hf(str(tmp_path / "out"), params, config, "float32")
    monkeypatch.setattr(safetensors.numpy, "save_file", second_fails)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        ck.export_hf(
            str(tmp_path / "out"), jax.tree.map(lambda x: x * 2, params), config, "float32", max_shard_bytes=40_000
        )
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"]
    assert_trees_equal(ck.load_params(str(tmp_path / "out")), params)


def test_export_hf_bfloat16(tmp_path, hf_dir):
    params, config = ck.load_params(hf_dir), ck.load_config(hf_dir)
    out = str(tmp_path / "bf16")
    ck.export_hf(out, params, config)  # bfloat16 by default
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    with safetensors.safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    back = MistralForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16
    # Round trip through bf16 equals rounding the f32 params once.
    assert_trees_equal(
        ck.load_params(out, dtype="bfloat16"), jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    )


# ---------------------------------------------------------------------------------------------------------------
# Errors name the file and tensor
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def sharded_dir(tmp_path, hf_model):
    d = str(tmp_path / "sharded")
    hf_model[0].save_pretrained(d, max_shard_size="20KB")
    return d


def test_error_missing_shard(sharded_dir):
    index = json.load(open(os.path.join(sharded_dir, "model.safetensors.index.json")))
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    os.remove(os.path.join(sharded_dir, shard))
    with pytest.raises(FileNotFoundError) as e:
        ck.load_params(sharded_dir)
    msg = str(e.value)
    assert shard in msg and "missing" in msg and "model.safetensors.index.json" in msg
    assert any(f"'{name}'" in msg for name, s in index["weight_map"].items() if s == shard)


def _rewrite(path, edit):
    """Rewrites a safetensors file with edit(dict of arrays) applied."""
    tensors = {k: np.array(v) for k, v in safetensors.numpy.load_file(path).items()}
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_error_wrong_shape(tmp_path, hf_model):
    d = str(tmp_path / "hf")
    hf_model[0].save_pretrained(d)
    f = os.path.join(d, "model.safetensors")
    _rewrite(f, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}))
    with pytest.raises(
        ck.CheckpointError,
        match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' in .*model\.safetensors has "
        r"shape \[16, 64\], expected \[32, 64\]",
    ):
        ck.load_params(d)


def test_error_unexpected_and_missing_tensor(tmp_path, hf_model):
    d = str(tmp_path / "hf")
    hf_model[0].save_pretrained(d)
    f = os.path.join(d, "model.safetensors")
    _rewrite(f, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    ck.load_params(d)  # known harmless extra: ignored
    _rewrite(f, lambda t: t.update({"model.layers.0.mlp.bias": np.ones(3, np.float32)}))
    with pytest.raises(
        ck.CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.bias' in .*model\.safetensors"
    ):
        ck.load_params(d)
    _rewrite(
        f, lambda t: [t.pop(k) for k in ("model.layers.0.mlp.bias", "model.layers.1.post_attention_layernorm.weight")]
    )
    with pytest.raises(
        ck.CheckpointError,
        match=r"missing tensor 'model\.layers\.1\.post_attention_layernorm"
        r"\.weight'.*model\.safetensors",
    ):
        ck.load_params(d)
    # A config with more layers than the file: names the first missing tensor and where it was looked for.
    with pytest.raises(
        ck.CheckpointError,
        match=r"missing tensor 'model\.layers\.2\.input_layernorm\.weight' "
        r"\(and 9 more.*expected in .*model\.safetensors",
    ):
        ck.load_params(d, config=ck.load_config(d).replace(n_layers=3))


def test_error_int_dtype(tmp_path, hf_model):
    d = str(tmp_path / "hf")
    hf_model[0].save_pretrained(d)
    f = os.path.join(d, "model.safetensors")
    _rewrite(f, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
    with pytest.raises(ck.CheckpointError, match=r"tensor 'model\.norm\.weight' in .* has dtype I32"):
        ck.load_params(d)


def test_error_unknown_layout(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        ck.detect_format(str(d))
    msg = str(e.value)
    assert str(d) in msg and "weights.npz" in msg and "config.json" in msg
    assert "model.safetensors" in msg and "consolidated.safetensors" in msg and "mistral_jax.json" in msg
    with pytest.raises(ValueError, match="unrecognized checkpoint layout"):
        ck.load_params(str(d))
    with pytest.raises(FileNotFoundError, match="not found"):
        ck.detect_format(str(tmp_path / "nope"))

    t = tmp_path / "torch_only"
    t.mkdir()
    (t / "config.json").write_text("{}")
    (t / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*[Cc]onvert them to safetensors"):
        ck.detect_format(str(t))


def test_error_orbax_config_mismatch(tmp_path, hf_dir):
    params, config = ck.load_params(hf_dir), ck.load_config(hf_dir)
    out = str(tmp_path / "ox")
    ck.save(out, params, config)
    with pytest.raises(
        ck.CheckpointError,
        match=r"array 'layers/feed_forward/w1' has shape \(2, 64, 96\), "
        r"expected \(2, 64, 128\)",
    ):
        ck.load_params(out, config=config.replace(hidden_dim=128))
    with pytest.raises(ck.CheckpointError, match=r"unexpected array 'output/kernel'"):
        ck.load_params(out, config=config.replace(tie_embeddings=True))
    with pytest.raises(ck.CheckpointError, match=r"params: leaf 'layers/attention/wq' has shape"):
        ck.save(out, params, config.replace(n_heads=8, n_kv_heads=2))


# ---------------------------------------------------------------------------------------------------------------
# Memory: converting streams, it does not hold two copies
# ---------------------------------------------------------------------------------------------------------------
def test_convert_peak_memory_is_bounded(tmp_path):
    # ~156 MB of bf16 weights; the child's peak RSS above a baseline child (same imports, tiny convert).
    cmd = [
        sys.executable,
        os.path.join(ROOT, "bench", "convert_memory.py"),
        "--json",
        "--workdir",
        str(tmp_path),
        "--dim",
        "1024",
        "--layers",
        "4",
        "--ffn",
        "2816",
        "--heads",
        "8",
        "--kv-heads",
        "2",
        "--vocab",
        "16000",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 100e6 < res["weights_bytes"] < 200e6
    assert res["extra_rss"] < 2 * res["weights_bytes"], res


def test_error_tensor_missing_from_index(sharded_dir):
    path = os.path.join(sharded_dir, "model.safetensors.index.json")
    index = json.load(open(path))
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    json.dump(index, open(path, "w"))
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_params(sharded_dir)
    msg = str(e.value)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in msg and "model.safetensors.index.json" in msg
    assert "the other tensors of 'model.layers.1' are in model-000" in msg  # points at where its layer lives


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints written by v0.1.0
# ---------------------------------------------------------------------------------------------------------------
def test_v0_1_orbax_checkpoint_loads_and_runs_like_transformers():
    """tests/fixtures/orbax-v0.1.0 was written by v0.1.0 (its mistral_jax.json has the numerics and layout keys
    of then); -hf is the same weights exported as a transformers directory. The orbax one, loaded by today's
    code, gives transformers' logits."""
    ox, hf = os.path.join(FIXTURES, "orbax-v0.1.0"), os.path.join(FIXTURES, "orbax-v0.1.0-hf")
    assert ck.detect_format(ox) == "orbax" and ck.detect_format(hf) == "hf"
    assert "param_dtype" in json.load(open(os.path.join(ox, "mistral_jax.json")))
    config = ck.load_config(ox)
    assert config == ck.load_config(hf)
    params = ck.load_params(ox, config)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    assert_trees_equal(params, ck.load_params(hf))
    model = MistralForCausalLM.from_pretrained(hf, attn_implementation="eager").float().eval()
    toks = _tokens(config.vocab_size, T=48)  # 3x the window
    got = np.asarray(model_lib.logits(params, toks, config=config))
    np.testing.assert_allclose(got, hf_logits(model, toks), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# PEFT adapters
# ---------------------------------------------------------------------------------------------------------------
def test_peft_adapters_give_the_merged_model_logits(tmp_path, hf_dir, hf_model):
    """Adapters (non-zero B, as after training) saved in the PEFT format: peft over the transformers model gives
    the logits of our model with the adapters attached, and of the merged weights."""
    from peft import PeftModel

    from mistral_jax import lora

    model, cfg, _ = hf_model
    config, params = ck.load_config(hf_dir), ck.load_params(hf_dir)
    spec = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    adapters = lora.init_lora(config, spec, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    out = str(tmp_path / "adapter")
    ck.save_adapter(out, adapters, spec, config, base_model=hf_dir)
    acfg = json.load(open(os.path.join(out, ck.ADAPTER_CONFIG)))
    assert acfg["r"] == 4 and acfg["lora_alpha"] == 8.0 and acfg["base_model_name_or_path"] == hf_dir
    assert acfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tensors = safetensors.numpy.load_file(os.path.join(out, ck.ADAPTER_WEIGHTS))
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    toks = _tokens(cfg["vocab_size"], T=24)
    ours = np.asarray(model_lib.logits(lora.attach(params, adapters, spec), toks, config=config))
    merged = np.asarray(model_lib.logits(lora.merge_lora(params, adapters, spec), toks, config=config))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    theirs = hf_logits(peft_model, toks)
    assert np.abs(theirs - hf_logits(model, toks)).max() > 1e-2  # the adapters move the model
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged, theirs, atol=1e-4, rtol=0)
