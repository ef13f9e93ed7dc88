"""Checkpoints that are hostile, corrupt or damaged (issue 20): every one is refused with a CheckpointError (or
a one-line `error:` from infer.convert) that names the file and tensor, never opens a file outside the
checkpoint, and never quotes a file's bytes back. Also infer.demo's --workdir, which deletes only what it made.

Each test is the reproduction the issue describes; the checkpoints are tiny random models written here.
"""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from infer import convert as convert_cli
from infer import demo
from mistral_jax import checkpoint as ck
from mistral_jax import params as params_lib
from mistral_jax.checkpoint import integrity
from mistral_jax.config import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "SECRET-CONTENT-0451"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def model():
    config = get_preset("tiny", vocab_size=256)
    params = jax.jit(params_lib.init_params, static_argnums=0)(config, jax.random.key(0))
    return config, jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    """{'hf', 'sharded', 'orbax'}: the same tiny model in each layout, written once; tests copy them."""
    config, params = model
    d = tmp_path_factory.mktemp("saved")
    out = {"hf": str(d / "hf"), "sharded": str(d / "sharded"), "orbax": str(d / "orbax")}
    ck.export_hf(out["hf"], params, config, "float32")
    ck.export_hf(out["sharded"], params, config, "float32", max_shard_bytes=20_000)
    ck.save(out["orbax"], params, config)
    return out


def _copy(saved, kind, tmp_path, name=None):
    dst = str(tmp_path / (name or kind))
    shutil.copytree(saved[kind], dst)
    return dst


def _no_echo(e):
    assert SECRET not in str(e), str(e)


# ---------------------------------------------------------------------------------------------------------------
# 1. Index shard names are confined to the checkpoint directory
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", ["../secret.safetensors", "../../etc/passwd", "ABSOLUTE", "sub/shard.safetensors", "..", "config.json", ""]
)
def test_index_shard_names_are_confined(tmp_path, saved, monkeypatch, bad):
    d = _copy(saved, "sharded", tmp_path)
    outside = tmp_path / "secret.safetensors"  # a file the index must not be able to reach
    outside.write_text(SECRET)
    os.makedirs(os.path.join(d, "sub"))
    shutil.copy(glob.glob(os.path.join(d, "model-00001-*.safetensors"))[0], os.path.join(d, "sub", "shard.safetensors"))
    bad = str(outside) if bad == "ABSOLUTE" else bad
    index = json.load(open(os.path.join(d, INDEX)))
    victim = sorted(index["weight_map"])[3]
    index["weight_map"][victim] = bad
    json.dump(index, open(os.path.join(d, INDEX), "w"))
    opened = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    for load in (ck.load_params, ck.load_host_params):
        with pytest.raises(ck.CheckpointError) as e:
            load(d)
        msg = str(e.value)
        assert os.path.join(d, INDEX) in msg and repr(victim) in msg and repr(bad) in msg, msg
        _no_echo(e.value)
    assert opened == []  # refused before any shard was opened


def test_index_shards_may_be_symlinks(tmp_path, saved, model):
    """The Hugging Face cache keeps shards as symlinks into ../../blobs: the names are confined, not the files."""
    d = _copy(saved, "sharded", tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in glob.glob(os.path.join(d, "model-*.safetensors")):
        shutil.move(f, blobs / os.path.basename(f))
        os.symlink(os.path.relpath(blobs / os.path.basename(f), d), f)
    got = params_lib.flatten(ck.load_host_params(d))
    for leaf, x in params_lib.flatten(model[1]).items():
        np.testing.assert_array_equal(got[leaf], x)


# ---------------------------------------------------------------------------------------------------------------
# Error messages never quote a file's bytes
# ---------------------------------------------------------------------------------------------------------------
def _st_file(path, header: bytes):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\0" * 16)


CORRUPTIONS = {
    "index not JSON": (
        "sharded",
        lambda d: open(os.path.join(d, INDEX), "w").write(f'{{"weight_map": {SECRET}}}'),
        INDEX,
    ),
    "index bad escape": ("sharded", lambda d: open(os.path.join(d, INDEX), "w").write(f'{{"a": "\\{SECRET}"}}'), INDEX),
    "index not UTF-8": (
        "sharded",
        lambda d: open(os.path.join(d, INDEX), "wb").write(b"\xff\xfe" + SECRET.encode()),
        INDEX,
    ),
    "config not JSON": (
        "hf",
        lambda d: open(os.path.join(d, "config.json"), "w").write(f"{{{SECRET}: 1}}"),
        "config.json",
    ),
    "config bad escape": (
        "hf",
        lambda d: open(os.path.join(d, "config.json"), "w").write(f'{{"a": "\\{SECRET}"}}'),
        "config.json",
    ),
    "config binary": (
        "hf",
        lambda d: open(os.path.join(d, "config.json"), "wb").write(b"\x89PNG" + SECRET.encode()),
        "config.json",
    ),
    "safetensors header": (
        "hf",
        lambda d: _st_file(
            os.path.join(d, "model.safetensors"),
            json.dumps({"t": {"dtype": SECRET, "shape": [1], "data_offsets": [0, 4]}}).encode(),
        ),
        "model.safetensors",
    ),
    "safetensors text": (
        "hf",
        lambda d: open(os.path.join(d, "model.safetensors"), "w").write(SECRET * 100),
        "model.safetensors",
    ),
    "orbax config": (
        "orbax",
        lambda d: open(os.path.join(d, "mistral_jax.json"), "w").write(SECRET),
        "mistral_jax.json",
    ),
    "orbax _METADATA": ("orbax", lambda d: open(os.path.join(d, "params", "_METADATA"), "w").write(SECRET), "params"),
    "orbax checksums": (
        "orbax",
        lambda d: open(os.path.join(d, integrity.CHECKSUMS), "w").write(SECRET),
        integrity.CHECKSUMS,
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_errors_name_the_file_and_never_echo_it(tmp_path, saved, case):
    kind, corrupt, fname = CORRUPTIONS[case]
    d = _copy(saved, kind, tmp_path)
    corrupt(d)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_config(d)
        ck.load_params(d)
    assert fname in str(e.value), str(e.value)
    _no_echo(e.value)


def test_config_value_errors_name_the_file(tmp_path, saved):
    d = _copy(saved, "hf", tmp_path)
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    for key, value in [("hidden_size", "wide"), ("num_hidden_layers", None), ("rms_norm_eps", [1])]:
        json.dump({**cfg, key: value}, open(path, "w"))
        with pytest.raises(ck.CheckpointError, match=rf"^{path}: "):
            ck.load_config(d)


def test_a_file_that_shrinks_while_loading_is_named(tmp_path, saved, model):
    from mistral_jax.checkpoint import safetensors as st

    d = _copy(saved, "hf", tmp_path)
    path = os.path.join(d, "model.safetensors")
    with st.open_checked(d, "hf", model[0]) as source:
        os.truncate(path, os.path.getsize(path) // 2)
        with pytest.raises(ck.CheckpointError, match=rf"^{path}: cannot read tensor '[a-z_.0-9]+'"):
            for _ in st.host_leaves(source, "hf", model[0], np.dtype(np.float32)):
                pass


# ---------------------------------------------------------------------------------------------------------------
# 2. Integrity: non-finite weights, orbax data corruption, incomplete orbax checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _poison_hf(d, name, values):
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors.numpy.load_file(path).items()}
    tensors[name].reshape(-1)[: len(values)] = values
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_safetensors_nonfinite_weights_are_named(tmp_path, saved):
    d = _copy(saved, "hf", tmp_path)
    path = _poison_hf(d, "model.layers.1.mlp.up_proj.weight", [np.nan, np.inf, -np.inf])
    for load in (ck.load_params, ck.load_host_params):
        with pytest.raises(ck.CheckpointError) as e:
            load(d)
        msg = str(e.value)
        assert path in msg and "'model.layers.1.mlp.up_proj.weight'" in msg and "3 non-finite" in msg, msg
    # The way to look at them anyway.
    params = ck.load_params(d, check_finite=False)
    assert np.isnan(np.asarray(params["layers"]["feed_forward"]["w3"][1])).sum() == 1
    assert np.isinf(ck.load_host_params(d, check_finite=False)["layers"]["feed_forward"]["w3"]).sum() == 2


def test_cast_overflow_is_named(tmp_path, saved):
    d = _copy(saved, "hf", tmp_path)
    _poison_hf(d, "model.norm.weight", [1e6])
    assert np.isfinite(np.asarray(ck.load_params(d, dtype="bfloat16")["norm"]["scale"])).all()
    with pytest.raises(ck.CheckpointError, match=r"'model.norm.weight'.*1 values overflow float16"):
        ck.load_params(d, dtype="float16")


def test_orbax_nonfinite_weights_are_named(tmp_path, model):
    config, params = model
    bad = jax.tree.map(np.copy, params)
    bad["layers"]["attention"]["wo"][1, 0, 0, :2] = np.nan
    d = str(tmp_path / "ckpt")
    ck.save(d, bad, config)  # saving is not refused: a diverged run's weights can be kept and looked at
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_params(d)
    assert d in str(e.value) and "'layers/attention/wo'" in str(e.value) and "2 non-finite" in str(e.value)
    assert np.isnan(np.asarray(ck.load_params(d, check_finite=False)["layers"]["attention"]["wo"])).sum() == 2


def _data_file(d):
    return max(glob.glob(os.path.join(d, "params", "**", "d", "*"), recursive=True), key=os.path.getsize)


@pytest.mark.parametrize("where", ["start", "middle", "all"])
def test_orbax_garbage_bytes_are_caught(tmp_path, saved, model, where):
    """Garbage that decodes to finite numbers is still caught: each array's checksum was saved with it."""
    d = _copy(saved, "orbax", tmp_path)
    f = _data_file(d)
    n = os.path.getsize(f)
    with open(f, "r+b") as fh:
        if where == "all":
            fh.write(np.random.default_rng(0).bytes(n))
        else:
            fh.seek(0 if where == "start" else n // 2)
            fh.write(b"garbage " * 8)  # finite as float32
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_params(d)
    msg = str(e.value)
    assert d in msg and "checksum" in msg and "corrupt" in msg, msg
    assert any(f"'{leaf}'" in msg for leaf in params_lib.leaf_shapes(model[0])), msg


@pytest.mark.parametrize("how", ["truncated", "removed"])
def test_orbax_missing_data_is_caught(tmp_path, saved, how):
    d = _copy(saved, "orbax", tmp_path)
    f = _data_file(d)
    if how == "removed":
        os.remove(f)
    else:
        os.truncate(f, os.path.getsize(f) // 2)
    with pytest.raises(
        ck.CheckpointError,
        match=r"params: cannot read array '[a-z0-9_/]+': a data file is missing, "
        r"truncated or corrupt \([A-Z_]+\)$",
    ):
        ck.load_params(d, check_finite=False)


@pytest.mark.parametrize("name", ["_METADATA", "manifest.ocdbt"])
def test_orbax_missing_files_are_named(tmp_path, saved, name):
    d = _copy(saved, "orbax", tmp_path)
    os.remove(os.path.join(d, "params", name))
    with pytest.raises(ck.CheckpointError, match=rf"params: incomplete orbax checkpoint, missing {name}"):
        ck.load_params(d)
    with pytest.raises(ck.CheckpointError, match=rf"missing {name}"):
        ck.convert(d, str(tmp_path / "out"), to="hf")


def test_orbax_checksum_file_must_list_every_array(tmp_path, saved):
    d = _copy(saved, "orbax", tmp_path)
    path = os.path.join(d, integrity.CHECKSUMS)
    sums = json.load(open(path))
    del sums["arrays"]["norm/scale"]
    json.dump(sums, open(path, "w"))
    with pytest.raises(ck.CheckpointError, match=r"has no checksum for array 'norm/scale'"):
        ck.load_params(d)
    assert ck.load_params(d, check_finite=False)["norm"]["scale"].shape == (64,)


def test_checksum_is_independent_of_sharding(tmp_path):
    """Saved from one sharding and checked under another: the checksum is a sum over values, wherever they lie."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from mistral_jax.checkpoint import integrity
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
        x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
        want = integrity.stats(x)
        for spec in [P(), P("a"), P(None, "b", "a"), P(("a", "b"))]:
            assert integrity.stats(jax.device_put(x, NamedSharding(mesh, spec))) == want, spec
        y = x.copy()
        y[1, 2, 3], y[1, 2, 4] = y[1, 2, 4], y[1, 2, 3]  # the same values, two swapped
        assert integrity.stats(y)[1] != want[1]
        print("ok")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# 3. infer.convert: every user error is one line `error: ...`, exit status 2
# ---------------------------------------------------------------------------------------------------------------
def _cli(capsys, argv):
    try:
        rc = convert_cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def test_convert_cli_user_errors_are_one_line(tmp_path, saved, capsys):
    hf = _copy(saved, "hf", tmp_path)
    existing = _copy(saved, "orbax", tmp_path, "existing")
    corrupt = _copy(saved, "hf", tmp_path, "corrupt")
    open(os.path.join(corrupt, "model.safetensors"), "w").write(SECRET * 10)
    nan = _copy(saved, "hf", tmp_path, "nan")
    _poison_hf(nan, "lm_head.weight", [np.nan])
    out = str(tmp_path / "out")
    cases = {
        "missing src": (["--src", str(tmp_path / "nope"), "--dst", out], "not found"),
        "bad dtype": (["--src", hf, "--dst", out, "--dtype", "int8"], "--dtype"),
        "bad format": (["--src", hf, "--dst", out, "--to", "gguf"], "--to"),
        "existing dst": (["--src", hf, "--dst", existing], "overwrite"),
        "corrupt file": (["--src", corrupt, "--dst", out], "model.safetensors: not a readable safetensors file"),
        "non-finite": (["--src", nan, "--dst", out], "'lm_head.weight'"),
        "no src": (["--dst", out], "--src"),
    }
    for name, (argv, needle) in cases.items():
        rc, err = _cli(capsys, argv)
        assert rc == 2, (name, rc, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, err)
        assert SECRET not in err
    assert not os.path.exists(out)
    rc, err = _cli(capsys, ["--src", nan, "--dst", out, "--no-check"])
    assert rc == 0, err
    assert np.isnan(np.asarray(ck.load_params(out, check_finite=False)["output"]["kernel"])).sum() == 1


def test_convert_cli_error_from_the_shell(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "infer.convert", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: checkpoint directory not found: {tmp_path}/nope"]


# ---------------------------------------------------------------------------------------------------------------
# 4. infer.demo --workdir deletes only what it made
# ---------------------------------------------------------------------------------------------------------------
def test_demo_refuses_a_directory_it_did_not_make(tmp_path, capsys):
    w = tmp_path / "mine"
    w.mkdir()
    (w / "thesis.tex").write_text("years of work")
    (w / "ckpt").mkdir()  # even one named like an output
    assert demo.main(["--workdir", str(w)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(w) in err[0] and demo.MARKER in err[0]
    assert sorted(os.listdir(w)) == ["ckpt", "thesis.tex"]
    f = tmp_path / "file"
    f.write_text("x")
    assert demo.main(["--workdir", str(f)]) == 2
    assert f.read_text() == "x"


def test_demo_workdir_marker(tmp_path):
    w = str(tmp_path / "new" / "demo")
    demo.prepare_workdir(w)  # created: marked as the demo's
    assert os.listdir(w) == [demo.MARKER]
    for name in ("hf", "ckpt", ".ckpt.partial"):
        os.makedirs(os.path.join(w, name, "sub"))
    for name in ("texts.jsonl", "completions.jsonl", "completions.jsonl.manifest.json", "notes.txt", "hf.txt"):
        open(os.path.join(w, name), "w").write("x")
    demo.prepare_workdir(w)  # a rerun: its own outputs go, anything else stays
    assert sorted(os.listdir(w)) == sorted([demo.MARKER, "hf.txt", "notes.txt"])
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    demo.prepare_workdir(empty)  # an empty directory is taken (nothing to lose)
    assert os.listdir(empty) == [demo.MARKER]
