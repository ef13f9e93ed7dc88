"""Fine-tuning findings of issue 20 ("Nothing lost, nothing run"), each test the reproduction it describes:
a damaged newest checkpoint falls back to the previous one (and a run with none that restores stops in one
line), a resume with another batch size, seq_len or training data is refused before anything is written, the
settings of every start are kept, and train.finetune tells user errors in one line with exit 2."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest
import yaml
from test_trainer import QA, conversation, losses, make_cfg, saved_steps

from mistral_jax import checkpoint, run_dir
from mistral_jax import params as params_lib
from mistral_jax.config import get_preset
from mistral_jax.trainer import ResumeError, Trainer

STEPS = 30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "train.jsonl").write_text("".join(json.dumps(conversation(q, a)) + "\n" for q, a in QA))
    (d / "eval.jsonl").write_text(json.dumps({"prompt": QA[0][0], "completion": QA[0][1]}) + "\n")
    return d


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, v1_tokenizer_path):
    """A random tiny model saved as our checkpoint, with tokenizer.model."""
    d = tmp_path_factory.mktemp("base") / "ckpt"
    config = get_preset("tiny")
    rng = np.random.default_rng(7)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: ("norm" in jax.tree_util.keystr(path)) + 0.02 * rng.standard_normal(s.shape, np.float32),
        params_lib.param_shapes(config),
    )
    checkpoint.save(str(d), params, config)
    shutil.copy(v1_tokenizer_path, d / "tokenizer.model")
    return d


def cfg_for(data, output, base_dir, **kw):
    # Checkpoints at 10, 20, 30; make_cfg keeps the last 2.
    return make_cfg(data, output, base_dir, steps=STEPS, checkpoint_every=10, **kw)


@pytest.fixture(scope="module")
def reference(data, base_dir, tmp_path_factory):
    """The uninterrupted run every resumed one must equal."""
    out = tmp_path_factory.mktemp("reference")
    assert Trainer(cfg_for(data, out, base_dir)).run() == "done"
    return out


def largest_array_file(step_dir):
    return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def overwrite_with_garbage(step_dir):
    path = largest_array_file(step_dir)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint " * 64)


def delete_a_file(step_dir):
    os.remove(largest_array_file(step_dir))


def flip_one_bit(step_dir):
    # The array still decodes, to a wrong value: only the checksums of the step's record catch it.
    path = largest_array_file(step_dir)
    n = os.path.getsize(path) // 2
    with open(path, "r+b") as f:
        f.seek(n)
        byte = f.read(1)[0]
        f.seek(n)
        f.write(bytes([byte ^ 1]))


DAMAGE = {
    "garbage": (overwrite_with_garbage, "Error reading"),
    "deleted": (delete_a_file, "Error reading"),
    "one bit": (flip_one_bit, "checksum mismatch in state"),
}


def write_yaml(cfg, path):
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("error:")]


# orbax leaves the reads of a failed restore's other arrays unawaited; pytest reports them when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(damage, reference, data, base_dir, tmp_path):
    """Stopped at step 20 with checkpoints 10 and 20 kept, step 20 damaged: the same command names step 20 and
    its error in one line, resumes from step 10, moves step 20 aside and ends as the uninterrupted run."""
    cfg = cfg_for(data, tmp_path, base_dir)
    assert Trainer(cfg).run(until_step=20) == "stopped"
    assert saved_steps(tmp_path) == [10, 20]
    corrupt, symptom = DAMAGE[damage]
    corrupt(tmp_path / "checkpoints" / "20")

    logs = []
    assert Trainer(cfg, log=logs.append).run() == "done"
    warnings = [line for line in logs if "does not restore" in line]
    assert len(warnings) == 1 and "\n" not in warnings[0], logs
    assert warnings[0].startswith("warning: checkpoint 20 ") and warnings[0].endswith("; falling back to step 10")
    assert symptom in warnings[0] and len(warnings[0]) < 600, warnings[0]
    assert any(line.startswith("resuming from") and "checkpoints/10 (step 10," in line for line in logs), logs
    assert os.listdir(tmp_path / "damaged_checkpoints") == ["20"]
    assert saved_steps(tmp_path) == [20, 30]

    want, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)
    a = checkpoint.load_params(str(reference / "final"))
    b = checkpoint.load_params(str(tmp_path / "final"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)


def test_no_checkpoint_restores_is_one_line_and_exit_2(data, base_dir, tmp_path, capsys):
    from train import finetune

    out = tmp_path / "run"
    cfg = cfg_for(data, out, base_dir)
    assert Trainer(cfg).run(until_step=20) == "stopped"
    for step in (10, 20):
        overwrite_with_garbage(out / "checkpoints" / str(step))
    history = (out / run_dir.HISTORY).read_text()
    capsys.readouterr()

    assert finetune.main(["--config", write_yaml(cfg, tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert line.startswith(f"error: no checkpoint of {out} restores (steps 20, 10; step 20: ") and "aside" in line
    assert err.rstrip().endswith(line)
    assert "falling back to step 10" in err
    # Nothing is moved or written when nothing restores.
    assert saved_steps(out) == [10, 20] and not os.path.exists(out / "damaged_checkpoints")
    assert (out / run_dir.HISTORY).read_text() == history


def snapshot(output):
    files = {name: (output / name).read_bytes() for name in ("train_config.json", run_dir.HISTORY, "metrics.jsonl")}
    return files, sorted(os.listdir(output)), saved_steps(output)


def test_resume_with_other_batch_size_seq_len_or_data_is_refused_before_writing(data, base_dir, tmp_path, capsys):
    """These crashed in DataIterator.restore after train_config.json was overwritten (a larger batch size, a
    smaller file) or resumed silently on other rows (changed data at the same path)."""
    from train import finetune

    own = tmp_path / "data"
    shutil.copytree(data, own)
    out = tmp_path / "run"
    cfg = cfg_for(own, out, base_dir)
    assert Trainer(cfg).run(until_step=10) == "stopped"
    before = snapshot(out)
    original = (own / "train.jsonl").read_bytes()

    def refused(match, step=10, **kw):
        with pytest.raises(ResumeError, match=match) as e:
            Trainer(cfg.replace(**kw)).run()
        assert "\n" not in str(e.value) and f"from step {step}:" in str(e.value) and "--output" in str(e.value)
        assert snapshot(out) == before

    refused(r"batch_size 2 -> 4", batch_size=4)
    refused(r"seq_len 64 -> 128", seq_len=128)
    smaller = tmp_path / "smaller.jsonl"
    smaller.write_text("".join(json.dumps(conversation(q, a)) + "\n" for q, a in QA[:3]))
    refused(r"train data \S+train.jsonl \(4 rows, sha256 \w+\) -> \S+smaller.jsonl \(3 rows", train=str(smaller))
    # Other bytes at the same path, as many rows.
    (own / "train.jsonl").write_bytes(original.replace(b"Quenville.", b"Quenton."))
    refused(r"train data \S+train.jsonl \(4 rows, sha256 (\w+)\) -> \S+train.jsonl \(4 rows, sha256 (?!\1)")

    # The command line: one line, exit 2, nothing written.
    capsys.readouterr()
    assert finetune.main(["--config", write_yaml(cfg, tmp_path / "run.yaml"), "--batch-size", "4"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: cannot resume {out} from step 10: batch_size 2 -> 4; train data ")
    assert snapshot(out) == before

    # The data it was saved with resumes.
    (own / "train.jsonl").write_bytes(original)
    assert Trainer(cfg).run(until_step=11) == "stopped"

    # Checkpoints from before records: the batch size is checked against the previous start's settings.
    for step in saved_steps(out):
        shutil.rmtree(out / "checkpoints" / str(step) / run_dir.RECORD)
    before = snapshot(out)
    refused(r"batch_size 2 -> 4", step=11, batch_size=4)
    logs = []
    assert Trainer(cfg, log=logs.append).run(until_step=12) == "stopped"
    assert any("predates data fingerprints" in line for line in logs), logs


def test_settings_history_keeps_every_start(data, base_dir, tmp_path):
    cfg = cfg_for(data, tmp_path, base_dir)
    assert Trainer(cfg).run(until_step=10) == "stopped"
    first = json.loads((tmp_path / "train_config.json").read_text())
    assert first == cfg.to_dict()

    logs = []
    assert Trainer(cfg.replace(log_every=5), log=logs.append).run(until_step=20) == "stopped"
    assert f"note: resuming {tmp_path} with changed settings: log_every" in logs
    # A row cut short by a crash mid-append does not hide the others.
    with open(tmp_path / run_dir.HISTORY, "a") as f:
        f.write('{"time": "2026-')
    faster = cfg.replace(optimizer=cfg.optimizer.replace(lr=2e-2))
    assert Trainer(faster, log=logs.append).run(until_step=21) == "stopped"
    assert any(
        line.startswith(f"warning: resuming {tmp_path} with changed settings: log_every, optimizer.lr") for line in logs
    ), logs

    assert json.loads((tmp_path / "train_config.json").read_text()) == first  # the first start's, kept
    rows = []
    for line in (tmp_path / run_dir.HISTORY).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            assert line == '{"time": "2026-'
    assert [r["resumed_from"] for r in rows] == [None, 10, 20]
    assert [r["changed"] for r in rows] == [[], ["log_every"], ["log_every", "optimizer.lr"]]
    assert rows[0]["config"] == first and rows[2]["config"] == faster.to_dict()
    assert previous_config_lr(tmp_path) == 2e-2


def previous_config_lr(output):
    return run_dir.previous_config(str(output))["optimizer"]["lr"]


def test_finetune_user_errors_are_one_line_and_exit_2(data, base_dir, tmp_path, capsys, monkeypatch):
    from train import finetune

    cfg = cfg_for(data, tmp_path / "out", base_dir)
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text(
        json.dumps(conversation("Hi", "Hello")) + "\n" + json.dumps(conversation("Hi \ud800", "Hello")) + "\n"
    )
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("init: tiny\nsteps: [1\n")
    config = write_yaml(cfg, tmp_path / "run.yaml")
    cases = [
        (["--train", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--init", str(tmp_path / "nowhere")], "nowhere"),
        (["--output", str(not_a_dir)], str(not_a_dir)),
        (["--train", str(surrogate)], "surrogate.jsonl: 1 bad rows (the first on line 2)"),
        (["--batch-size", "0"], "batch_size must be positive"),
    ]
    cfg_bad_rows = write_yaml(cfg.replace(bad_rows="error"), tmp_path / "strict.yaml")
    for flags, want in cases:
        capsys.readouterr()
        code = finetune.main(["--config", cfg_bad_rows if "surrogate" in want else config, *flags])
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and want in lines[0], (flags, err[-2000:])
        assert err.rstrip().endswith(lines[0])
    capsys.readouterr()
    assert finetune.main(["--config", str(bad_yaml)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {bad_yaml}: not valid YAML")

    # A bug still shows its traceback.
    def bug(self, until_step=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Trainer, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        finetune.main(["--config", config])
