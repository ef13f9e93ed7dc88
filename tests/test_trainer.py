"""Tests for mistral_jax.trainer and train.finetune: resume equals an uninterrupted run, a save killed midway
leaves the previous checkpoint, non-finite losses abort, the final checkpoint serves infer.generate /
infer.score / infer.convert, and the PEFT adapters give the merged model's logits under `peft`."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from mistral_jax import checkpoint
from mistral_jax import config as config_lib
from mistral_jax import model as model_lib
from mistral_jax import params as params_lib
from mistral_jax.config import Numerics, get_preset
from mistral_jax.lora import LoraConfig
from mistral_jax.train_config import TrainConfig
from mistral_jax.train_step import OptimizerConfig
from mistral_jax.trainer import NonFiniteLossError, Trainer, checkpoint_manager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QA = [
    ("What is the capital of Zorbia?", "Quenville."),
    ("Say hello to Bob.", "Hello, Bob!"),
    ("What colour is the moon of Tarn?", "Silver."),
    ("What is 7 times 6?", "42."),
]


def conversation(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "train.jsonl").write_text("".join(json.dumps(conversation(q, a)) + "\n" for q, a in QA))
    (d / "eval.jsonl").write_text(
        json.dumps({"prompt": "What is the capital of Zorbia?", "completion": "Quenville."}) + "\n"
    )
    return d


def make_cfg(data, output, base_dir, **kw) -> TrainConfig:
    # Full fine-tuning of the random tiny model in base_dir (a checkpoint: no init program to compile). Four short
    # conversations pack into one row of 64 tokens; batch 2 adds a padding row.
    base = dict(
        init=str(base_dir),
        train=str(data / "train.jsonl"),
        eval=str(data / "eval.jsonl"),
        output=str(output),
        tokenizer="mistral-common:v1",
        seq_len=64,
        batch_size=2,
        steps=60,
        optimizer=OptimizerConfig(lr=1e-2, warmup_steps=3),
        numerics=Numerics(dtype="float32"),
        checkpoint_every=20,
        eval_every=20,
        log_every=1,
        keep_checkpoints=2,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def losses(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def saved_steps(output):
    return sorted(int(d) for d in os.listdir(os.path.join(output, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, v1_tokenizer_path):
    """A random tiny model saved as our checkpoint, with tokenizer.model: the starting point of every run."""
    d = tmp_path_factory.mktemp("base") / "ckpt"
    config = get_preset("tiny")
    rng = np.random.default_rng(7)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            (1.0 if "norm" in jax.tree_util.keystr(path) else 0.0) + 0.02 * rng.standard_normal(s.shape, np.float32)
        ),
        params_lib.param_shapes(config),
    )
    checkpoint.save(str(d), params, config)
    shutil.copy(v1_tokenizer_path, d / "tokenizer.model")
    return d


def lora_kw():
    # tokenizer None: the tokenizer.model beside the base weights
    return dict(
        tokenizer=None,
        lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q", "k", "v", "o", "gate", "up", "down")),
    )


@pytest.fixture(scope="module")
def full_run(data, base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert Trainer(make_cfg(data, out, base_dir)).run() == "done"
    return out


@pytest.fixture(scope="module")
def lora_run(data, base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    assert Trainer(make_cfg(data, out, base_dir, **lora_kw())).run() == "done"
    return out


def test_finished_run_outputs(full_run):
    rows = [json.loads(line) for line in open(full_run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert evals[0]["eval_loss"] > evals[1]["eval_loss"] > evals[2]["eval_loss"]
    assert evals[-1]["eval_loss"] < 0.5 and rows[0]["loss"] > 5
    np.testing.assert_allclose(evals[-1]["eval_ppl"], np.exp(evals[-1]["eval_loss"]), rtol=1e-6)
    # keep_checkpoints=2 keeps 40 and 60; 60 is also the best eval loss.
    assert saved_steps(full_run) == [40, 60]
    assert checkpoint.detect_format(str(full_run / "final")) == "orbax"
    assert os.path.isfile(full_run / "final" / "tokenizer.model")
    assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the loss plot beside metrics.jsonl


def test_finetune_without_config_and_loss_plot(data, base_dir, tmp_path, capsys, monkeypatch):
    """--config is optional (the TrainConfig defaults, with the flags); loss.png is drawn from metrics.jsonl,
    and skipped with a one-line note where matplotlib is missing."""
    from PIL import Image

    from mistral_jax.metrics import plot_loss
    from train import finetune

    out = tmp_path / "run"
    assert (
        finetune.main(
            [
                "--init",
                str(base_dir),
                "--train",
                str(data / "train.jsonl"),
                "--eval",
                str(data / "eval.jsonl"),
                "--output",
                str(out),
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--seq-len",
                "64",
            ]
        )
        == 0
    )
    saved = json.loads((out / "train_config.json").read_text())
    default = TrainConfig().to_dict()
    assert saved["lora"] is None and saved["numerics"] == default["numerics"]
    assert saved["optimizer"] == default["optimizer"] and saved["grad_accum"] == default["grad_accum"]
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl"))] == [3]  # log_every 10: the last step
    assert Image.open(out / "loss.png").size == (700, 400)

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: every import of it fails
    notes = []
    assert not plot_loss(str(out / "metrics.jsonl"), str(tmp_path / "none.png"), notes.append)
    assert len(notes) == 1 and notes[0].startswith("note: matplotlib is not installed")
    assert not os.path.exists(tmp_path / "none.png")


def test_final_checkpoint_answers_through_infer_generate_and_score(full_run, data, tmp_path):
    from infer import generate, score

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": i, "messages": [{"role": "user", "content": q}]}) + "\n" for i, (q, _) in enumerate(QA)
        )
    )
    out = tmp_path / "out.jsonl"
    assert (
        generate.main(
            [
                "--checkpoint",
                str(full_run / "final"),
                "--input",
                str(prompts),
                "--output",
                str(out),
                "--max-new-tokens",
                "12",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    got = {r["id"]: r for r in map(json.loads, open(out))}
    for i, (_, answer) in enumerate(QA):
        assert got[i]["completion"].strip() == answer and got[i]["finish_reason"] == "stop"

    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"id": 0, "text": "[INST] What is 7 times 6? [/INST] 42."}) + "\n")
    assert (
        score.main(
            ["--checkpoint", str(full_run / "final"), "--input", str(texts), "--output", str(tmp_path / "scores.jsonl")]
        )
        == 0
    )


def test_resumed_run_equals_uninterrupted(lora_run, data, base_dir, tmp_path):
    """Stopped at step 20 and run again, the losses of every step and the final weights are those of the
    uninterrupted run: adapters, optimizer state, step, RNG (LoRA dropout) and data position are restored.
    (A full fine-tuning run is resumed after a crash in the next test.)"""
    cfg = make_cfg(data, tmp_path, base_dir, **lora_kw())
    assert Trainer(cfg).run(until_step=20) == "stopped"
    assert saved_steps(tmp_path) == [20] and not os.path.exists(tmp_path / "final")
    assert Trainer(cfg).run() == "done"
    want, got = losses(lora_run), losses(tmp_path)
    assert sorted(got) == list(range(1, 61))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)
    a = checkpoint.load_params(str(lora_run / "final"))
    b = checkpoint.load_params(str(tmp_path / "final"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
    # A third run finds the work done.
    assert Trainer(cfg).run() == "done"


def subprocess_env(xla_flags=""):
    return dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


KILL_SCRIPT = """
import asyncio, json, os, signal, sys
from orbax.checkpoint._src.path import atomicity
from mistral_jax.trainer import TrainConfig, Trainer

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def die_before_commit(self):
    # Step 20 is fully written into its temporary directory; die before orbax renames it into place.
    if self.get_final().name == "20":
        os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = die_before_commit
Trainer(TrainConfig.from_dict(json.loads(sys.argv[1]))).run()
"""


def test_save_killed_midway_leaves_previous_checkpoint(full_run, data, base_dir, tmp_path):
    # Checkpoints every 10 steps (the full run's every 20: saving does not change the training), killed
    # while saving step 20.
    cfg = make_cfg(data, tmp_path, base_dir, checkpoint_every=10)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.to_dict())],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = tmp_path / "checkpoints"
    assert any(d.startswith("20.") and "tmp" in d for d in os.listdir(ckpts)), os.listdir(ckpts)  # mid-save
    assert saved_steps(tmp_path) == [10]
    import orbax.checkpoint as ocp

    reader = ocp.CheckpointManager(str(ckpts), options=ocp.CheckpointManagerOptions(read_only=True))
    assert reader.latest_step() == 10  # orbax itself sees step 10 as the last complete checkpoint
    reader.close()
    assert max(losses(tmp_path)) >= 20  # rows past step 10 were logged before the kill (the save is async)

    # The same command resumes from step 10 (rows past it are dropped and redone) and ends where an
    # uninterrupted run ends.
    assert Trainer(cfg).run() == "done"
    assert not any("tmp" in d for d in os.listdir(ckpts))
    want, got = losses(full_run), losses(tmp_path)
    np.testing.assert_allclose([got[s] for s in range(1, 61)], [want[s] for s in range(1, 61)], rtol=1e-6)


MESH_SCRIPT = """
import json, os, sys
import jax, optax
from mistral_jax import train_step
from mistral_jax.trainer import TrainConfig, Trainer

seen = {}
jit_train_step = train_step.jit_train_step

def spy(*args, **kw):  # records the shardings of what the jitted step receives
    fn = jit_train_step(*args, **kw)
    def call(state, frozen, batch):
        spec = lambda tree: jax.tree.map(lambda x: list(x.sharding.spec), tree)
        seen.setdefault("params", spec(state.params))
        seen.setdefault("mu", spec(optax.tree_utils.tree_get(state.opt_state, "mu")))
        seen.setdefault("frozen", spec(frozen))
        seen.setdefault("batch", spec(batch))
        return fn(state, frozen, batch)
    return call

train_step.jit_train_step = spy
Trainer(TrainConfig.from_dict(json.loads(sys.argv[1]))).run(until_step=6)
print(json.dumps(seen))
"""


def test_mesh_run_is_sharded_and_equals_single_device(lora_run, data, base_dir, tmp_path):
    """LoRA on an fsdp=2 mesh of 2 CPU devices: adapters, their AdamW state and the frozen base are split
    over fsdp, the batch over (data, fsdp), and the losses are those of the single-device run."""
    cfg = make_cfg(data, tmp_path, base_dir, mesh="fsdp=2", **lora_kw())
    # LLVM optimisations off: compiling is most of this process's time. Its float results differ from the
    # optimised build's in the 7th digit, so the comparison below stops after a few steps.
    env = subprocess_env("--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, json.dumps(cfg.to_dict())],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(spec[0] == ["data", "fsdp"] for spec in seen["batch"].values())  # rows over the batch axes
    attn = seen["params"]["layers"]["attention"]
    assert attn["wq_a"][:2] == [None, "fsdp"]  # A [L, D, r]: embed over fsdp
    assert attn["wo_b"] == [None, None, "fsdp"]  # B [L, r, D]
    assert seen["mu"] == seen["params"]  # AdamW state laid out as the adapters
    assert seen["frozen"]["layers"]["attention"]["wq"][:2] == [None, "fsdp"]
    want, got = losses(lora_run), losses(tmp_path)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)


def test_nonfinite_losses_skip_then_abort(data, base_dir, tmp_path):
    trainer = Trainer(make_cfg(data, tmp_path, base_dir, max_bad_steps=3))
    clean = trainer.data

    class Poisoned:  # from the 5th batch on, NaN loss weights make every loss NaN
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            batch = next(clean)
            if self.n >= 5:
                batch["loss_mask"] = batch["loss_mask"] * np.float32("nan")
            return batch

        def state(self):
            return clean.state()

    trainer.data = Poisoned()
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row.*step 7"):
        trainer.run()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [0, 0, 0, 0, 1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows[:4]) and not os.path.exists(tmp_path / "final")


def test_peft_adapter_gives_the_merged_model_logits(lora_run, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    from infer import convert

    adapter = lora_run / "final_adapter"
    cfg = json.load(open(adapter / "adapter_config.json"))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # The HF export of the base, with peft's adapters on top.
    config = checkpoint.load_config(str(base_dir))
    checkpoint.export_hf(str(tmp_path / "base_hf"), checkpoint.load_params(str(base_dir)), config, "float32")
    base = MistralForCausalLM.from_pretrained(
        tmp_path / "base_hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (2, 40))  # several windows of 16
    with torch.no_grad():
        base_logits = base(torch.from_numpy(tokens)).logits.numpy()
        peft_model = PeftModel.from_pretrained(base, adapter).eval()
        peft_logits = peft_model(torch.from_numpy(tokens)).logits.numpy()

    ours = np.asarray(
        model_lib.forward(checkpoint.load_params(str(lora_run / "final")), jax.numpy.asarray(tokens), config=config)
    )
    assert np.abs(peft_logits - base_logits).max() > 1e-2  # the adapters moved the model
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4)

    # infer.convert exports the merged model; transformers loads it and agrees too.
    assert convert.main(["--src", str(lora_run / "final"), "--dst", str(tmp_path / "merged_hf"), "--to", "hf"]) == 0
    merged = MistralForCausalLM.from_pretrained(
        tmp_path / "merged_hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.from_numpy(tokens)).logits.numpy(), peft_logits, atol=1e-4)


def test_checkpoint_manager_keeps_last_k_and_best(tmp_path):
    import orbax.checkpoint as ocp

    manager = checkpoint_manager(str(tmp_path), keep=2)
    for step, loss in [(1, 3.0), (2, 1.0), (3, None), (4, 2.0), (5, 4.0), (6, None)]:
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.arange(3) + step})),
            metrics=None if loss is None else {"eval_loss": loss},
        )
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 5, 6]  # step 2 has the best eval loss
    manager.close()


def test_config_file_and_flags(data, tmp_path, capsys):
    from train import finetune

    yaml_path = tmp_path / "run.yaml"
    # v0.1's flat keys still read, each into its section (with a one-line note); flags override the file.
    yaml_path.write_text(
        "init: tiny\nlr: 3e-4\nlora_rank: 8\nlora_targets: [q, v]\nsteps: 7\ndtype: float32\n"
        "adam_b1: 0.8\nmodel: {dim: 128, attention_block: 64}\n"
    )
    cfg = TrainConfig.load(str(yaml_path), steps=9, output="x")
    assert (cfg.optimizer.lr, cfg.lora.rank, cfg.lora.targets, cfg.steps, cfg.output) == (3e-4, 8, ("q", "v"), 9, "x")
    assert (cfg.optimizer.b1, cfg.numerics.dtype, cfg.numerics.attention_block, cfg.model) == (
        0.8,
        "float32",
        64,
        {"dim": 128},
    )
    assert "note: " in capsys.readouterr().err
    # The nested form says the same; config.from_yaml reads it too.
    yaml_path.write_text(
        "init: tiny\nsteps: 7\nmodel: {dim: 128}\noptimizer: {lr: 3.0e-4, b1: 0.8}\n"
        "lora: {rank: 8, targets: [q, v]}\n"
        "numerics: {param_dtype: float32, dtype: float32, attention_impl: auto, attention_block: 64}\n"
    )
    nested = TrainConfig.load(str(yaml_path), steps=9, output="x")
    assert nested == cfg == config_lib.from_yaml(TrainConfig, str(yaml_path), steps=9, output="x")
    assert TrainConfig.load(str(yaml_path), lora_rank=0).lora is None  # --lora-rank 0: full fine-tuning
    assert TrainConfig.load(str(yaml_path), lora_rank=4).lora == LoraConfig(rank=4, targets=("q", "v"))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg

    yaml_path.write_text("init: tiny\nlearning_rate: 3e-4\n")
    with pytest.raises(ValueError, match=r"run\.yaml: unknown keys \['learning_rate'\]"):
        TrainConfig.load(str(yaml_path))
    yaml_path.write_text("init: tiny\nsteps: many\n")
    with pytest.raises(ValueError, match=r"run\.yaml: steps: expected an integer"):
        TrainConfig.load(str(yaml_path))
    yaml_path.write_text("init: tiny\noptimizer: {lr: fast}\n")
    with pytest.raises(ValueError, match=r"run\.yaml: optimizer: lr: expected a number"):
        TrainConfig.load(str(yaml_path))
    yaml_path.write_text("init: tiny\nlr: 1e-4\noptimizer: {lr: 1e-4}\n")
    with pytest.raises(ValueError, match=r"run\.yaml: lr and optimizer\.lr both given"):
        TrainConfig.load(str(yaml_path))
    yaml_path.write_text("init: tiny\nmodel: {dimension: 3}\n")
    with pytest.raises(ValueError, match="unknown MistralConfig field 'dimension'"):
        TrainConfig.load(str(yaml_path))

    # Flags override the file; every row is validated before any weight is read.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(conversation("Hi", "Hello"))
        + "\n{not json\n"
        + json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
        + "\n"
    )
    yaml_path.write_text("init: tiny\ntokenizer: mistral-common:v1\nbad_rows: error\nseq_len: 64\n")
    assert finetune.main(["--config", str(yaml_path), "--train", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: 2 bad rows" in err and "malformed JSON: 1 (lines 2)" in err and "lines 3" in err
    assert finetune.main(["--config", str(yaml_path), "--output", str(tmp_path / "o")]) == 2
    assert "'train' is required" in capsys.readouterr().err

    # The shipped run configs parse (every key a TrainConfig field), in the nested form config.from_yaml reads.
    configs = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".yaml"))
    assert "demo.yaml" in configs and "mistral-7b-lora-v5e-8.yaml" in configs
    for name in configs:
        path = os.path.join(REPO, "configs", name)
        assert config_lib.from_yaml(TrainConfig, path) == TrainConfig.load(path)


SETUP_ERROR_SCRIPT = """
import json, sys
from mistral_jax.trainer import TrainConfig, Trainer
try:
    Trainer(TrainConfig.from_dict(json.loads(sys.argv[1])))
except ValueError as e:
    print(e)
    sys.exit(0)
sys.exit(1)
"""


def test_start_up_refusals_name_the_tokenizer_and_the_mesh(data, base_dir, tmp_path):
    """Two start-up errors met while building multi-host training, each refused before any weight is read:
    a tokenizer with more pieces than the model's vocabulary, and a microbatch that does not split over the
    mesh's data-parallel devices."""
    from hf_models import make_hf_model

    make_hf_model(0, vocab_size=128)[0].save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=r"tokenizer \S+ has 32000 pieces, more than the model's vocab_size 128"):
        Trainer(make_cfg(data, tmp_path / "o1", tmp_path / "small"))

    cfg = make_cfg(data, tmp_path / "o2", base_dir, mesh="fsdp=2", batch_size=3)
    proc = subprocess.run(
        [sys.executable, "-c", SETUP_ERROR_SCRIPT, json.dumps(cfg.to_dict())],
        env=subprocess_env("--xla_force_host_platform_device_count=2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "batch_size / grad_accum = 3 rows must be a multiple of the data-parallel size 2 of mesh 'fsdp=2'"
        in proc.stdout
    ), proc.stdout
    assert not os.path.exists(tmp_path / "o2" / "checkpoints")
