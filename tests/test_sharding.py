"""sharding.py, memory_plan.py, infer.plan, and the tools on 8 simulated CPU devices.

The 8-device checks need XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts, so they run
in ONE subprocess (this file run as a script) that goes through every mesh; the single-device results they
are compared with come from this (one-device) pytest process, computed while the subprocess runs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MESHES = ["data=2,fsdp=2,tensor=2", "fsdp=8", "data=4,tensor=2"]
ROW_LENGTHS = [5, 13, 16, 2, 11]  # 5 rows, batch 3: never a multiple of the data-parallel size
BATCH = 3
NEW_TOKENS = 10  # prompts up to 16 tokens + 10 new >> window 4: generation runs past it
# GQA model (4 heads, 2 KV heads: tensor=2 splits both) and a 1-KV-head model (KV heads replicated).
MODELS = {"gqa": dict(num_key_value_heads=2), "mqa": dict(num_key_value_heads=1)}
RUNS = [("gqa", m) for m in MESHES] + [("mqa", "data=2,fsdp=2,tensor=2")]


def _model_kwargs(name):
    return dict(vocab_size=128, sliding_window=4, num_attention_heads=4, **MODELS[name])


# ---- unit tests (this process, one device) --------------------------------------------------------------------


def test_parse_mesh():
    from mistral_jax.sharding import ShardingError, parse_mesh

    assert parse_mesh(None, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh("tensor=2", 8) == {"data": 1, "fsdp": 1, "tensor": 2}  # fewer devices: allowed
    for bad, words in [
        ("model=2", "name one of"),
        ("data=2,data=2", "twice"),
        ("data=-1,fsdp=-1", "only one"),
        ("data=3,fsdp=-1", "do not divide"),
        ("data=4,tensor=4", "needs 16 devices"),
        ("fsdp=x", "must be an int"),
        ("fsdp=0", "positive"),
    ]:
        with pytest.raises(ShardingError, match=words):
            parse_mesh(bad, 8)


def test_rules_put_batch_on_data_and_fsdp_and_weights_on_fsdp_and_tensor():
    from jax.sharding import PartitionSpec as P

    from mistral_jax import sharding
    from mistral_jax.config import get_preset

    c = get_preset("mistral-7b-v0.1")
    specs = sharding.param_specs(c, {"data": 2, "fsdp": 2, "tensor": 2})
    assert specs["layers"]["attention"]["wq"] == P(None, "fsdp", "tensor", None)
    assert specs["layers"]["attention"]["wo"] == P(None, "tensor", None, "fsdp")
    assert specs["layers"]["feed_forward"]["w2"] == P(None, "tensor", "fsdp")
    assert specs["tok_embeddings"]["embedding"] == P("tensor", "fsdp")
    # An activation [batch, length, embed]: batch takes fsdp, so embed stays whole.
    assert sharding.spec_for(("batch", "length", "embed"), sharding.RULES) == P(("data", "fsdp"), None, None)
    assert sharding.spec_for(sharding.CACHE_AXES["k"], sharding.RULES) == P(
        None, ("data", "fsdp"), "tensor", None, None
    )


def test_kv_heads_that_do_not_divide_tensor_are_replicated_with_a_note():
    from jax.sharding import PartitionSpec as P

    from mistral_jax import sharding
    from mistral_jax.config import get_preset

    c = get_preset("tiny").replace(n_kv_heads=1)
    rules, notes = sharding.rules_for(c, {"tensor": 2})
    assert len(notes) == 1 and "n_kv_heads=1" in notes[0] and "tensor=2" in notes[0] and "replicated" in notes[0]
    specs = sharding.param_specs(c, {"tensor": 2}, rules)["layers"]["attention"]
    assert specs["wk"] == P(None, "fsdp", None, None) and specs["wq"] == P(None, "fsdp", "tensor", None)
    assert sharding.rules_for(c.replace(n_kv_heads=2), {"tensor": 2}) == (sharding.RULES, [])


def test_a_model_that_does_not_divide_names_the_axis_and_sizes():
    from mistral_jax import sharding
    from mistral_jax.config import get_preset

    c = get_preset("tiny")  # 4 heads, hidden_dim 128, dim 64
    with pytest.raises(sharding.ShardingError, match=r"heads dimension \(n_heads=4.*tensor of size 8"):
        sharding.check_divisible(c, {"tensor": 8})
    with pytest.raises(sharding.ShardingError, match=r"embed dimension \(dim=64.*fsdp of size 128"):
        sharding.check_divisible(c, {"fsdp": 128})
    sharding.check_divisible(c, {"data": 3, "fsdp": 4, "tensor": 2})  # data splits no weight


def test_round_batch():
    from mistral_jax.sharding import round_batch

    assert round_batch(3, {"data": 2, "fsdp": 2, "tensor": 2}) == 4
    assert round_batch(3, {"fsdp": 8}) == 8
    assert round_batch(8, {"data": 4, "tensor": 2}) == 8


@pytest.mark.parametrize("tied", [False, True])
def test_param_spec_matches_transformers_and_the_initialised_tree(tied):
    """params.py's declared tree: its leaves per layer have transformers' tensor names and shapes (the peer's own
    state dict), and init_params builds exactly the declared shapes, dtypes and tree."""
    import jax
    from hf_models import make_hf_model

    from mistral_jax import params as params_lib
    from mistral_jax.config import MistralConfig

    _, cfg, weights = make_hf_model(0, tie_word_embeddings=tied)
    c = MistralConfig.from_hf(cfg)
    names = {}
    for w in params_lib.weights(c):
        for layer in range(c.n_layers if w.layered else 1):
            names[w.hf.format(l=layer)] = w.stored_shape(c)
    assert names == {k: v.shape for k, v in weights.items() if not (tied and k == "lm_head.weight")}
    shapes = params_lib.param_shapes(c, "bfloat16")
    built = jax.eval_shape(lambda r: params_lib.init_params(c, r, "bfloat16"), jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(built)
    assert jax.tree.leaves(shapes) == jax.tree.leaves(built)
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x)  # noqa: E731
    axes = params_lib.param_logical_axes(c)
    assert jax.tree.structure(axes, is_leaf=is_names) == jax.tree.structure(shapes)
    assert all(len(a) == len(s.shape) for a, s in zip(jax.tree.leaves(axes, is_leaf=is_names), jax.tree.leaves(shapes)))
    assert ("output" in shapes) != tied
    assert sum(x.size for x in jax.tree.leaves(shapes)) == c.num_params


def test_memory_plan_is_the_exact_share_of_the_real_preset():
    from mistral_jax import kv_cache, memory_plan
    from mistral_jax.config import get_preset

    c = get_preset("mistral-7b-v0.1")
    assert c.num_params == 7_241_732_096  # the published parameter count
    # Every 7B dimension divides by 8, so fsdp=8 holds exactly 1/8 of the bf16 weights per device.
    plan = memory_plan.inference(c, {"fsdp": 8}, "bfloat16", 32, 4096)
    assert plan.bytes_of("weights") * 8 == c.num_params * 2
    slots = kv_cache.num_slots(c, 4096)
    assert plan.bytes_of("cache") * 8 == kv_cache.cache_bytes(c, 32, slots, "bfloat16")
    # 128 KiB per token: batch 32 x 4096 tokens is 16 GiB of K and V, plus int32 positions.
    assert kv_cache.cache_bytes(c, 32, slots, "bfloat16") == 16 * 2**30 + 32 * 4096 * 4
    # Tensor=16 does not divide 8 KV heads: the cache is replicated over tensor, so it does not shrink.
    rep = memory_plan.inference(c, {"tensor": 16}, "bfloat16", 32, 4096)
    assert rep.bytes_of("cache") == kv_cache.cache_bytes(c, 32, slots, "bfloat16") and rep.notes
    full = memory_plan.training(c, {"fsdp": 8}, "full", 8, 4096)
    assert full.bytes_of("weights") * 8 == c.num_params * 4 and full.bytes_of("optimizer") == 3 * full.bytes_of(
        "weights"
    )
    lora = memory_plan.training(c, {"fsdp": 1}, "lora", 8, 4096, lora_rank=16)
    r, L, d, f, kv = 16, c.n_layers, c.dim, c.hidden_dim, c.n_kv_heads * c.head_dim
    adapters = L * r * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)  # wq, wo; wk, wv; w1, w3, w2
    assert lora.bytes_of("weights") == c.num_params * 2 + adapters * 4
    assert lora.bytes_of("optimizer") == adapters * 4 * 3


def test_memory_plan_refuses_what_cannot_fit():
    from mistral_jax import memory_plan
    from mistral_jax.config import get_preset

    plan = memory_plan.training(get_preset("mistral-7b-v0.1"), {"fsdp": 1}, "full", 8, 4096)
    with pytest.raises(memory_plan.MemoryPlanError, match=r"full fine-tuning.*107\.\d+ GiB.*80\.00 GiB free"):
        memory_plan.check(plan, memory_plan.DEVICES["h100"])
    memory_plan.check(plan, None)  # CPU: no memory reported, no refusal
    memory_plan.check(
        memory_plan.training(get_preset("mistral-7b-v0.1"), {"fsdp": 8}, "full", 8, 4096), memory_plan.DEVICES["h100"]
    )
    out = []
    memory_plan.report(plan, print_fn=out.append)  # this CPU reports no memory: printed, not refused
    assert "not checked" in out[0] and "AdamW" in out[0]

    class Device:  # what an accelerator's memory_stats() reports
        def memory_stats(self):
            return {"bytes_limit": 40 * 2**30, "bytes_in_use": 2**30}

    with pytest.raises(memory_plan.MemoryPlanError, match="39.00 GiB free"):
        memory_plan.report(plan, print_fn=out.append, devices=[Device()])


def test_plan_cli(capsys):
    from infer import plan

    assert plan.main(["--preset", "mistral-7b-v0.1", "--mesh", "fsdp=8", "--device", "h100", "--markdown"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 3 and all(r.startswith("| 8 x h100 | data=1,fsdp=8,tensor=1 |") for r in rows)
    assert plan.main(["--preset", "mistral-7b-v0.1", "--mesh", "tensor=3", "--device", "v5e"]) == 2
    assert "n_heads=32" in capsys.readouterr().err


def test_mesh_bigger_than_the_devices_is_refused_at_start_up(tmp_path):
    from infer import score as score_cli

    with pytest.raises(SystemExit, match=r"needs 2 devices.*1 are available"):
        score_cli.main(
            [
                "--checkpoint",
                str(tmp_path),
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
                "--mesh",
                "tensor=2",
            ]
        )


# ---- 8 devices: the tools on three meshes give the single-device results ----------------------------------


def _write_inputs(tmp_path):
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, 128, n).tolist() for n in ROW_LENGTHS]
    (tmp_path / "score.jsonl").write_text("".join(json.dumps({"id": i, "ids": r}) + "\n" for i, r in enumerate(rows)))
    (tmp_path / "gen.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt_ids": r}) + "\n" for i, r in enumerate(rows))
    )


def _tool_args(tmp_path, model, tool, out, mesh=None):
    args = [
        "--checkpoint",
        str(tmp_path / model),
        "--input",
        str(tmp_path / f"{tool}.jsonl"),
        "--output",
        str(out),
        "--batch-size",
        str(BATCH),
    ]
    if tool == "gen":
        args += ["--max-new-tokens", str(NEW_TOKENS), "--ignore-eos"]
    return args + (["--mesh", mesh] if mesh else [])


def _read(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_tools_on_8_devices_match_one_device(tmp_path):
    from hf_models import make_hf_model

    from infer import generate as gen_cli
    from infer import score as score_cli

    for name in MODELS:
        make_hf_model(1, **_model_kwargs(name))[0].save_pretrained(tmp_path / name)
    _write_inputs(tmp_path)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for name in MODELS:  # the single-device reference, while the subprocess runs
            assert score_cli.main(_tool_args(tmp_path, name, "score", tmp_path / f"{name}-score-ref.jsonl")) == 0
            assert gen_cli.main(_tool_args(tmp_path, name, "gen", tmp_path / f"{name}-gen-ref.jsonl")) == 0
        log, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-6000:]
    for name, mesh in RUNS:
        ref, got = _read(tmp_path / f"{name}-score-ref.jsonl"), _read(tmp_path / f"{name}-score-{mesh}.jsonl")
        assert [r["id"] for r in got] == list(range(len(ROW_LENGTHS))), (name, mesh)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(
                b["token_logprobs"], a["token_logprobs"], atol=1e-5, rtol=0, err_msg=f"{name} {mesh} row {a['id']}"
            )
        ref, got = _read(tmp_path / f"{name}-gen-ref.jsonl"), _read(tmp_path / f"{name}-gen-{mesh}.jsonl")
        assert [r["completion_ids"] for r in got] == [r["completion_ids"] for r in ref], (name, mesh)
        assert all(len(r["completion_ids"]) == NEW_TOKENS for r in got)
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert checks["batch_note"] and checks["kv_note"]
    assert "n_heads=4" in checks["bad_mesh_error"] and "tensor of size 8" in checks["bad_mesh_error"]
    # fsdp=8: every device holds exactly 1/8 of every weight, whether imported, restored or initialised.
    for how in ("safetensors", "orbax", "init"):
        for leaf, (total, per_device) in checks[f"bytes_{how}"].items():
            assert per_device == [total // 8] * 8, (how, leaf, total, per_device)
    assert checks["orbax_equal"] and checks["tuning_keeps_stacked"]
    assert checks["per_layer_sharded_diff"] < 1e-4 and checks["per_layer_sharded_spec"]
    assert checks["cache_spec_gqa"] == [None, ["data", "fsdp"], "tensor", None, None]
    assert checks["cache_spec_mqa"] == [None, ["data", "fsdp"], None, None, None]
    # One training step (full fine-tuning, and LoRA with dropout), grad_accum 2: loss and every gradient.
    for kind in TRAIN_KINDS:
        want = _train_grads(tmp_path, kind)
        for mesh in MESHES:
            got = np.load(tmp_path / f"train-{kind}-{mesh}.npz")
            assert sorted(got.files) == sorted(want), (kind, mesh)
            np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, err_msg=f"{kind} {mesh}")
            assert 3.0 < float(want["loss"]) < 7.0  # a real loss over a 128-token vocab, not 0 or nan
            for name in want:
                np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5, err_msg=f"{kind} {mesh} {name}")
            assert checks[f"train_sharded_{kind}_{mesh}"]


# ---- one training step on a mesh: loss and gradients -------------------------------------------------------

TRAIN_KINDS = ("full", "lora")
TRAIN_ROWS, TRAIN_LEN, TRAIN_ACCUM = 16, 24, 2  # 8 rows per microbatch: one per device on fsdp=8


def _train_batch():
    """Packed rows as data.pack makes them: 2-3 examples per row (segment ids, positions restarting at each),
    loss on the second half of each example, a padding tail; plus one all-padding row."""
    rng = np.random.default_rng(11)
    b = {k: np.zeros((TRAIN_ROWS, TRAIN_LEN), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    b["loss_mask"] = np.zeros((TRAIN_ROWS, TRAIN_LEN), np.float32)
    for r in range(TRAIN_ROWS - 1):
        t = 0
        for seg in range(1, 4):
            n = int(rng.integers(4, 10))
            if t + n > TRAIN_LEN:
                break
            ids = rng.integers(3, 128, n + 1)
            b["tokens"][r, t : t + n], b["targets"][r, t : t + n] = ids[:-1], ids[1:]
            b["positions"][r, t : t + n], b["segment_ids"][r, t : t + n] = np.arange(n), seg
            b["loss_mask"][r, t + n // 2 : t + n] = 1.0
            t += n
    return b


def _train_setup(tmp, kind):
    """(config, trainable, frozen, lora_spec) on the host: the gqa checkpoint, and for LoRA adapters whose B
    is random (at B = 0 the gradients of A would be zero and prove nothing)."""
    import jax

    from mistral_jax import checkpoint, lora

    config = checkpoint.load_config(tmp / "gqa")
    params = jax.device_get(checkpoint.load_params(tmp / "gqa", config, "float32"))
    if kind == "full":
        return config, params, None, None
    spec = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    rng = np.random.default_rng(5)
    lora = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            (0.05 * rng.standard_normal(a.shape)).astype(np.float32)
            if str(getattr(path[-1], "key", "")).endswith("_b")
            else np.asarray(a)
        ),
        jax.device_get(lora.init_lora(config, spec, jax.random.key(1))),
    )
    return config, lora, params, spec


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _train_grads(tmp, kind, mm=None):
    """{'loss', and one entry per trainable leaf: its gradient} of train_step.accumulate_grads. With a
    ModelMesh, the jit has the trainer's shardings: trainable and frozen weights by the mesh rules, the batch
    over (data, fsdp); the function also returns whether the inputs really were split."""
    import functools

    import jax

    from mistral_jax import train_step as ts

    config, trainable, frozen, spec = _train_setup(tmp, kind)
    fn = functools.partial(ts.accumulate_grads, config=config, lora_spec=spec, grad_accum=TRAIN_ACCUM)
    batch, rng = _train_batch(), jax.random.key(3)
    if mm is None:
        grads, loss, _ = jax.jit(fn)(trainable, frozen, batch, rng)
        return {"loss": np.asarray(loss), **_flat(grads)}
    train_sh = ts.trainable_shardings(mm, config, spec)  # as the trainer lays them out
    frozen_sh = None if spec is None else mm.param_shardings
    batch_sh = ts.batch_shardings(mm)
    trainable, frozen, batch = jax.device_put((trainable, frozen, batch), (train_sh, frozen_sh, batch_sh))
    with mm.activate():
        grads, loss, _ = jax.jit(
            fn, in_shardings=(train_sh, frozen_sh, batch_sh, None), out_shardings=(train_sh, None, None)
        )(trainable, frozen, batch, rng)
    split = all(len({str(s.index) for s in x.addressable_shards}) > 1 for x in jax.tree.leaves(batch))
    split &= any(len({str(s.index) for s in x.addressable_shards}) > 1 for x in jax.tree.leaves(grads))
    return {"loss": np.asarray(loss), **_flat(grads)}, split


def _worker(tmp):
    """Runs in the 8-device subprocess: the tools on every mesh, plus placement and byte checks."""
    import contextlib
    import io

    import jax

    from infer import generate as gen_cli
    from infer import score as score_cli
    from mistral_jax import checkpoint, sharding

    assert jax.device_count() == 8
    tmp = __import__("pathlib").Path(tmp)
    checks = {}
    for name, mesh in RUNS:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert score_cli.main(_tool_args(tmp, name, "score", tmp / f"{name}-score-{mesh}.jsonl", mesh)) == 0
            assert gen_cli.main(_tool_args(tmp, name, "gen", tmp / f"{name}-gen-{mesh}.jsonl", mesh)) == 0
        sys.stderr.write(err.getvalue())
        if mesh == "fsdp=8":
            checks["batch_note"] = "--batch-size 3 rounded up to 8" in err.getvalue()
        if name == "mqa":
            checks["kv_note"] = "n_kv_heads=1 does not divide over tensor=2" in err.getvalue()
    try:
        score_cli.main(_tool_args(tmp, "gqa", "score", tmp / "never.jsonl", "data=1,tensor=8"))
    except SystemExit as e:
        checks["bad_mesh_error"] = str(e)

    def spread(params):
        return {
            "/".join(str(getattr(k, "key", k)) for k in path): (
                x.nbytes,
                [s.data.nbytes for s in sorted(x.addressable_shards, key=lambda s: s.device.id)],
            )
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
        }

    config = checkpoint.load_config(tmp / "gqa")
    mm = sharding.ModelMesh.build(config, "fsdp=8")
    imported = checkpoint.load_params(tmp / "gqa", config, "float32", shardings=mm.param_shardings)
    checks["bytes_safetensors"] = spread(imported)
    checkpoint.save(tmp / "orbax", imported, config)
    restored = checkpoint.load_params(tmp / "orbax", config, "float32", shardings=mm.param_shardings)
    checks["bytes_orbax"] = spread(restored)
    checks["orbax_equal"] = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(restored))
    )
    checks["bytes_init"] = spread(mm.init_params(jax.random.key(0)))
    from mistral_jax import tuning

    checks["tuning_keeps_stacked"] = isinstance(tuning.for_inference(restored, mm)["layers"], dict)
    # Per-layer params sliced on sharded devices (what several GPUs get) compute the stacked params' logits.
    from mistral_jax import model

    m = sharding.ModelMesh.build(config, "data=2,fsdp=2,tensor=2")
    stacked = checkpoint.load_params(tmp / "gqa", config, "float32", shardings=m.param_shardings)
    per = tuning.for_inference(jax.tree.map(lambda x: x.copy(), stacked), m, ("per_layer",))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 24))
    with m.activate():
        logits = jax.jit(lambda p, t: model.logits(p, t, config=config))
        diff = np.abs(np.asarray(logits(per, tokens)) - np.asarray(logits(stacked, tokens))).max()
    checks["per_layer_sharded_diff"] = float(diff)
    wo, wo_stacked = per["layers"].layer(1)["attention"]["wo"], stacked["layers"]["attention"]["wo"]
    checks["per_layer_sharded_spec"] = tuple(wo.sharding.spec) == tuple(wo_stacked.sharding.spec)[1:]
    for name in MODELS:
        c = checkpoint.load_config(tmp / name)
        m = sharding.ModelMesh.build(c, "data=2,fsdp=2,tensor=2")
        spec = m.cache(4, 8).k.sharding.spec
        checks[f"cache_spec_{name}"] = [list(e) if isinstance(e, tuple) else e for e in spec]
    for kind in TRAIN_KINDS:
        for mesh in MESHES:
            got, split = _train_grads(tmp, kind, sharding.ModelMesh.build(config, mesh))
            np.savez(tmp / f"train-{kind}-{mesh}.npz", **got)
            checks[f"train_sharded_{kind}_{mesh}"] = bool(split)
    (tmp / "checks.json").write_text(json.dumps(checks))


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    _worker(sys.argv[1])
