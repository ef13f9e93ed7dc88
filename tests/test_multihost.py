"""Two processes on localhost, 4 CPU devices each, joined by jax.distributed (gloo collectives on CPU), run
a sharded infer.score, an orbax save and restore across the processes, sharded training steps and a whole
LoRA `train.finetune` run; all must give what one process on one device gives (computed here in the pytest
process while the two run).

The workers are this file run as a script: `python test_multihost.py TMP PORT PROCESS_ID`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MESH = "data=2,fsdp=2,tensor=2"
ROW_LENGTHS = [7, 16, 3, 12, 9]
MODEL = dict(vocab_size=128, sliding_window=4, num_attention_heads=4, num_key_value_heads=2)
TRAIN_ROWS, TRAIN_LEN, STEPS = 8, 16, 2
FINETUNE_STEPS = 4


def _train_batch():
    """A fixed global batch in data.pack's format: 8 rows, some padded, two packed examples in row 0."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(3, 128, (TRAIN_ROWS, TRAIN_LEN)).astype(np.int32)
    seg = np.ones((TRAIN_ROWS, TRAIN_LEN), np.int32)
    pos = np.tile(np.arange(TRAIN_LEN, dtype=np.int32), (TRAIN_ROWS, 1))
    seg[0, 6:], pos[0, 6:] = 2, np.arange(TRAIN_LEN - 6)
    for r, n in [(3, 9), (5, 4)]:
        seg[r, n:], tokens[r, n:], pos[r, n:] = 0, 0, 0
    targets = np.roll(tokens, -1, axis=1)
    loss_mask = ((seg != 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, positions=pos, segment_ids=seg)


def _train(params, config, batch, mm=None):
    """STEPS full fine-tuning steps (AdamW, 2 microbatches); returns (per-step loss and grad norm, params).
    With `mm` (a sharding.ModelMesh) the state and batch are sharded as the trainer shards them."""
    import jax

    from mistral_jax import train_step as ts
    from mistral_jax.train_state import TrainState

    # A large eps keeps Adam's update a smooth function of the gradient: with the default 1e-8, a gradient
    # element near 0 gets an update of +-lr from float noise alone, whatever the sharding.
    opt_cfg = ts.OptimizerConfig(lr=1e-3, total_steps=10, weight_decay=0.1, eps=1e-3)
    opt = ts.make_optimizer(opt_cfg)
    state_sh = None
    if mm is not None:
        abstract = jax.eval_shape(lambda p: TrainState.create(p, opt, 0), params)
        state_sh = ts.state_shardings(mm, abstract, mm.param_shardings)  # as the trainer lays them out
    step = ts.jit_train_step(config, opt_cfg, grad_accum=2, mm=mm)
    init = jax.jit(lambda p: TrainState.create(p, opt, 0), out_shardings=state_sh)
    metrics = []
    with mm.activate() if mm is not None else _null():
        state = init(params)
        for _ in range(STEPS):
            state, m = step(state, None, batch)
            metrics.append([float(m["loss"]), float(m["grad_norm"])])
    fetch = mm.fetch if mm is not None else jax.device_get
    return metrics, fetch(state.params)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cluster_detection_and_flag_checks():
    import pytest

    from mistral_jax import distributed

    assert distributed.detect_cluster({}) is None
    assert distributed.detect_cluster({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4"}) == "slurm"
    assert distributed.detect_cluster({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}) is None  # a shell in salloc
    assert distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "openmpi"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host slice
    assert distributed.initialize(environ={}) is False  # one process: nothing to join
    with pytest.raises(ValueError, match="--coordinator given without --num-processes, --process-id"):
        distributed.initialize(coordinator="localhost:1234")
    with pytest.raises(ValueError, match=r"--process-id 2 must be in \[0, --num-processes 2\)"):
        distributed.initialize(coordinator="localhost:1234", num_processes=2, process_id=2)


def _finetune_files(tmp):
    """A random tiny model (with the v1 tokenizer) and a few conversations for train.finetune. Adam's eps is
    large for the reason given in _train."""
    import jax

    from mistral_jax import checkpoint
    from mistral_jax import params as params_lib
    from mistral_jax.config import get_preset
    from mistral_jax.tokenizer import mistral_common_tokenizer

    config = get_preset("tiny")
    rng = np.random.default_rng(9)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            (1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
            + 0.02 * rng.standard_normal(s.shape).astype(np.float32)
        ),
        params_lib.param_shapes(config),
    )
    checkpoint.save(str(tmp / "tiny"), params, config, tokenizer=mistral_common_tokenizer("v1"))
    qa = [(f"What is {a} plus {b}?", f"{a + b}.") for a, b in rng.integers(1, 50, (24, 2)).tolist()]
    (tmp / "ft.jsonl").write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in qa
        )
    )
    (tmp / "ft.yaml").write_text(f"""
init: {tmp / "tiny"}
train: {tmp / "ft.jsonl"}
seq_len: 64
batch_size: 8
grad_accum: 2
dtype: float32
steps: {FINETUNE_STEPS}
lr: 0.01
warmup_steps: 1
adam_eps: 0.001
lora_rank: 4
lora_alpha: 8.0
lora_dropout: 0.1
checkpoint_every: 2
log_every: 1
eval_every: 0
progress: false
""")


def _finetune_args(tmp, out, *extra):
    return ["--config", str(tmp / "ft.yaml"), "--output", str(tmp / out), *extra]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_results(tmp_path):
    import jax
    from hf_models import make_hf_model

    from infer import score as score_cli
    from mistral_jax import checkpoint
    from train import finetune

    make_hf_model(2, **MODEL)[0].save_pretrained(tmp_path / "hf")
    _finetune_files(tmp_path)
    rng = np.random.default_rng(5)
    (tmp_path / "in.jsonl").write_text(
        "".join(
            json.dumps({"id": f"r{i}", "ids": rng.integers(3, 128, n).tolist()}) + "\n"
            for i, n in enumerate(ROW_LENGTHS)
        )
    )
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(tmp_path), str(port), str(i)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        # The single-process, single-device reference, while the two processes run.
        assert (
            score_cli.main(
                [
                    "--checkpoint",
                    str(tmp_path / "hf"),
                    "--input",
                    str(tmp_path / "in.jsonl"),
                    "--output",
                    str(tmp_path / "ref.jsonl"),
                    "--batch-size",
                    "3",
                ]
            )
            == 0
        )
        config = checkpoint.load_config(tmp_path / "hf")
        ref_metrics, ref_params = _train(
            checkpoint.load_params(tmp_path / "hf", config), config, jax.tree.map(jax.numpy.asarray, _train_batch())
        )
        assert finetune.main(_finetune_args(tmp_path, "ft-ref")) == 0
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    assert "process 1 of 2, 4 local / 8 devices" in logs[1]

    ref = [json.loads(x) for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    for name in ("score-hf.jsonl", "score-orbax.jsonl"):  # written by process 0 only, complete and in order
        got = [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
        assert [r["id"] for r in got] == [r["id"] for r in ref], name
        for a, b in zip(ref, got):
            np.testing.assert_allclose(b["token_logprobs"], a["token_logprobs"], atol=1e-5, rtol=0, err_msg=name)

    result = json.loads((tmp_path / "train.json").read_text())
    np.testing.assert_allclose(result["metrics"], ref_metrics, rtol=1e-5)
    got = np.load(tmp_path / "train-params.npz")
    flat = {
        "/".join(str(k.key) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(ref_params)[0]
    }
    assert sorted(got.files) == sorted(flat)
    for leaf, want in flat.items():
        np.testing.assert_allclose(got[leaf], want, atol=2e-6, rtol=0, err_msg=leaf)

    # train.finetune on the two processes: every logged loss of the one-device run, each step once (process 0
    # alone writes metrics.jsonl), and a final checkpoint and PEFT adapters that equal the one-device ones.
    def rows(out):
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    ref_rows, got_rows = rows("ft-ref"), rows("ft-mh")
    assert [r["step"] for r in got_rows] == list(range(1, FINETUNE_STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in got_rows], [r["loss"] for r in ref_rows], rtol=1e-5)
    assert sorted(os.listdir(tmp_path / "ft-mh" / "checkpoints")) == sorted(
        os.listdir(tmp_path / "ft-ref" / "checkpoints")
    )
    final_config = checkpoint.load_config(tmp_path / "ft-mh" / "final")
    want = checkpoint.load_params(tmp_path / "ft-ref" / "final", final_config)
    got = checkpoint.load_params(tmp_path / "ft-mh" / "final", final_config)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert (tmp_path / "ft-mh" / "final" / "tokenizer.model").is_file()
    from safetensors.numpy import load_file

    want, got = (load_file(tmp_path / d / "final_adapter" / "adapter_model.safetensors") for d in ("ft-ref", "ft-mh"))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)


def _worker(tmp, port, pid):
    import pathlib

    tmp = pathlib.Path(tmp)
    flags = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid)]
    from infer import score as score_cli

    def score(ckpt, out):
        assert (
            score_cli.main(
                [
                    "--checkpoint",
                    str(tmp / ckpt),
                    "--input",
                    str(tmp / "in.jsonl"),
                    "--output",
                    str(tmp / out),
                    "--batch-size",
                    "3",
                    "--mesh",
                    MESH,
                    *flags,
                ]
            )
            == 0
        )

    score("hf", "score-hf.jsonl")  # joins the other process (distributed.initialize) on the way

    import jax

    from mistral_jax import checkpoint, distributed, sharding

    assert jax.process_count() == 2 and jax.device_count() == 8
    config = checkpoint.load_config(tmp / "hf")
    mm = sharding.ModelMesh.build(config, MESH)
    # Devices come host by host, so the first axis (data=2) splits between the two processes (docs/scaling.md).
    assert {d.process_index for d in mm.mesh.devices[pid].flat} == {pid}
    params = checkpoint.load_params(tmp / "hf", config, "float32", shardings=mm.param_shardings)
    checkpoint.save(tmp / "orbax", params, config)  # each process writes its shards
    score("orbax", "score-orbax.jsonl")  # and each restores only its own

    # Training: each process builds only its share of the rows (every other row), the global batch is
    # assembled from the shares. The loss is a sum over rows, so the row order does not change the step.
    local = jax.tree.map(lambda x: np.stack(distributed.process_shard(list(x))), _train_batch())
    batch = mm.place_local(local)
    metrics, trained = _train(params, config, batch, mm)
    if distributed.is_main():
        (tmp / "train.json").write_text(json.dumps({"metrics": metrics}))
        np.savez(
            tmp / "train-params.npz",
            **{
                "/".join(str(k.key) for k in path): np.asarray(x)
                for path, x in jax.tree_util.tree_flatten_with_path(trained)[0]
            },
        )
    from train import finetune

    assert finetune.main(_finetune_args(tmp, "ft-mh", "--mesh", MESH, *flags)) == 0
    distributed.barrier("test_multihost.done")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
