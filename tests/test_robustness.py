"""Issue 20, "Nothing lost, nothing run": the batch jobs (infer.generate, infer.score) against crashes, bad
input, wrong flags, foreign outputs and a hostile cache directory, each written as the reproduction the issue
describes, and a fuzz of a few hundred malformed rows."""

import builtins
import fcntl
import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import zlib

import pytest
from hf_models import make_hf_model

from infer import generate as gen_cli
from infer import score as score_cli
from mistral_jax import job_output, jsonl, launch, programs
from mistral_jax.job_output import JobError, JobOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, v1_tokenizer_path):
    """A tiny random model with the v1 tokenizer, written once for the module."""
    path = tmp_path_factory.mktemp("model") / "tm"
    model, _, _ = make_hf_model(
        4, vocab_size=32000, hidden_size=32, intermediate_size=48, head_dim=8, sliding_window=8, linear_std=0.1
    )
    model.save_pretrained(path)
    shutil.copy(v1_tokenizer_path, path / "tokenizer.model")
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "xla"))


def generate(ckpt, inp, out, *extra, batch=4, new=3):
    """infer.generate's exit code as its process gives it (launch.run_tool: a user error is one line, 2)."""
    return launch.run_tool(
        gen_cli.main,
        [
            "--checkpoint",
            str(ckpt),
            "--input",
            str(inp),
            "--output",
            str(out),
            "--max-new-tokens",
            str(new),
            "--batch-size",
            str(batch),
            *extra,
        ],
    )


def score(ckpt, inp, out, *extra):
    return launch.run_tool(
        score_cli.main,
        ["--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out), "--batch-size", "4", *extra],
    )


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_rows(path):
    return [json.loads(x) for x in path.read_bytes().decode("utf-8").split("\n") if x]


def error_lines(err):
    """The `error: ...` lines of a tool's stderr, after checking it holds no traceback."""
    assert "Traceback" not in err, err
    return [x for x in err.splitlines() if x.startswith("error:")]


GOOD = [{"id": f"g{i}", "prompt_ids": [1, 5 + i, 7, 300 + i]} for i in range(5)] + [
    {"id": "é日本😀", "prompt": "Once upon a time"},
    {"id": 7, "messages": [{"role": "user", "content": "Hi"}]},
]


def _crashed(full, rows_kept=3):
    """A copy of `full`'s bytes as a crash leaves it: `rows_kept` rows and half of the next."""
    lines = full.read_bytes().split(b"\n")
    return b"\n".join(lines[:rows_kept]) + b"\n" + lines[rows_kept][: len(lines[rows_kept]) // 2]


# ---- 1. a second interruption must not wipe the output ------------------------------------------------------


@pytest.mark.parametrize("crash_at", ["os.fsync", "shutil.copymode", "os.replace"])
def test_a_crash_while_repairing_a_torn_tail_loses_nothing(ckpt, tmp_path, monkeypatch, crash_at):
    """A crash left a torn last row; the re-run that repairs it is killed at each point of the repair: the
    output keeps every byte it had (never truncated in place), and the next run completes it."""
    inp = write_rows(tmp_path / "in.jsonl", GOOD)
    full = tmp_path / "full.jsonl"
    assert generate(ckpt, inp, full) == 0
    out = tmp_path / "out.jsonl"
    crashed = _crashed(full)
    out.write_bytes(crashed)
    shutil.copy(f"{full}.manifest.json", f"{out}.manifest.json")

    def killed(*a, **k):
        raise KeyboardInterrupt  # as a kill would: no handler of the job catches it

    module, name = crash_at.split(".")
    with monkeypatch.context() as m:
        m.setattr(sys.modules[module], name, killed)
        with pytest.raises(KeyboardInterrupt):
            generate(ckpt, inp, out)
    assert out.read_bytes() == crashed
    assert sorted(os.listdir(tmp_path)) == [
        "full.jsonl",
        "full.jsonl.manifest.json",
        "in.jsonl",
        "out.jsonl",
        "out.jsonl.manifest.json",
        "xla",
    ]  # no temp file, no lock left
    assert generate(ckpt, inp, out) == 0
    assert out.read_bytes() == full.read_bytes()


def test_the_output_is_never_opened_for_writing_nor_truncated(ckpt, tmp_path, monkeypatch):
    """Through a resume that repairs a torn tail, the output is only read, appended to, or replaced by
    rename: no open with "w", "+" or O_TRUNC, no truncate."""
    inp = write_rows(tmp_path / "in.jsonl", GOOD)
    full = tmp_path / "full.jsonl"
    assert generate(ckpt, inp, full) == 0
    out = tmp_path / "out.jsonl"
    out.write_bytes(_crashed(full, 2))
    shutil.copy(f"{full}.manifest.json", f"{out}.manifest.json")
    target = os.path.realpath(out)
    calls = []
    real_open, real_os_open = builtins.open, os.open

    def is_out(p):
        return isinstance(p, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(p)) == target

    def spy_open(file, mode="r", *a, **k):
        if is_out(file):
            calls.append(("open", mode))
        return real_open(file, mode, *a, **k)

    def spy_os_open(path, flags, *a, **k):
        if is_out(path):
            calls.append(("os.open", flags))
        return real_os_open(path, flags, *a, **k)

    def no_truncate(*a, **k):
        calls.append(("truncate", a))
        raise AssertionError("truncate called")

    for mod in (builtins, io):
        monkeypatch.setattr(mod, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(os, "truncate", no_truncate)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    assert generate(ckpt, inp, out) == 0
    monkeypatch.undo()
    assert out.read_bytes() == full.read_bytes()
    assert calls and all(kind == "open" and mode in ("rb", "ab") for kind, mode in calls), calls


# ---- 2. every input and flag checked before any output is opened for writing ---------------------------------


def test_score_checks_its_input_before_touching_the_output(ckpt, tmp_path, capsys):
    out = tmp_path / "precious.jsonl"
    out.write_text("keep me\n")
    assert score(ckpt, tmp_path / "missing.jsonl", out) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: input file not found: {tmp_path / 'missing.jsonl'}"]
    assert out.read_text() == "keep me\n" and sorted(os.listdir(tmp_path)) == ["precious.jsonl"]


@pytest.mark.parametrize("tool", ["generate", "score"])
def test_output_equal_to_input_is_refused(ckpt, tmp_path, capsys, tool):
    inp = write_rows(tmp_path / "in.jsonl", [{"id": 1, "ids": [1, 2, 3], "prompt_ids": [1, 2, 3]}])
    before = inp.read_bytes()
    os.link(inp, tmp_path / "hardlink.jsonl")
    os.symlink(inp, tmp_path / "symlink.jsonl")
    for out in (inp, tmp_path / "symlink.jsonl", tmp_path / "hardlink.jsonl"):
        assert (generate if tool == "generate" else score)(ckpt, inp, out) == 2
        assert error_lines(capsys.readouterr().err) == [
            f"error: --output {out} is the input file; choose another --output"
        ]
    assert inp.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["hardlink.jsonl", "in.jsonl", "symlink.jsonl"]


@pytest.mark.parametrize("tool", ["generate", "score"])
def test_an_output_that_is_not_this_jobs_is_refused_untouched(ckpt, tmp_path, capsys, tool):
    """Lines without "id" (someone else's file), or a file without our manifest, are never rewritten: the old
    resume dropped every line without an "id"."""
    run = generate if tool == "generate" else score
    inp = write_rows(tmp_path / "in.jsonl", [{"id": "a", "ids": [1, 2, 3], "prompt_ids": [1, 2, 3]}])
    out = tmp_path / "out.jsonl"
    out.write_text('{"name": "not ours"}\n{"name": "no id either"}\n')
    before = out.read_bytes()
    assert run(ckpt, inp, out) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert f"{out} exists and has no {out}.manifest.json" in err and f"remove {out} to start over" in err
    assert out.read_bytes() == before and not os.path.exists(f"{out}.manifest.json")


def test_an_output_of_other_settings_or_input_is_refused_with_what_to_do(ckpt, tmp_path, capsys):
    inp = write_rows(tmp_path / "in.jsonl", GOOD[:3])
    out = tmp_path / "out.jsonl"
    assert generate(ckpt, inp, out) == 0
    before, manifest = out.read_bytes(), (tmp_path / "out.jsonl.manifest.json").read_bytes()
    assert json.loads(manifest)["input"]["rows"] == 3
    capsys.readouterr()
    assert generate(ckpt, inp, out, new=4) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "max_new_tokens was 3, now 4" in err and f"run with the input and settings in {out}.manifest.json" in err
    assert f"remove {out} and {out}.manifest.json to start over, or choose another --output" in err
    write_rows(inp, GOOD[:4])
    assert generate(ckpt, inp, out) == 2
    assert "its input was" in capsys.readouterr().err
    assert out.read_bytes() == before and (tmp_path / "out.jsonl.manifest.json").read_bytes() == manifest
    # Starting over as the message says.
    os.remove(out)
    os.remove(f"{out}.manifest.json")
    assert generate(ckpt, inp, out) == 0 and len(read_rows(out)) == 4


def test_a_second_job_on_the_same_output_is_refused(ckpt, tmp_path, capsys):
    inp = write_rows(tmp_path / "in.jsonl", GOOD[:2])
    out = tmp_path / "out.jsonl"
    fd = os.open(f"{out}.lock", os.O_RDWR | os.O_CREAT)  # a running job holds the lock
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert generate(ckpt, inp, out) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: another job is writing {out} (it holds {out}.lock); wait for it to finish, or choose another --output"
    ]
    assert not out.exists()
    os.close(fd)  # that job died: its lock file stays, but the kernel dropped the lock
    assert generate(ckpt, inp, out) == 0
    assert len(read_rows(out)) == 2 and not os.path.exists(f"{out}.lock")


# ---- 3. every row isolated ----------------------------------------------------------------------------------


def test_every_bad_row_is_its_own_error_row(ckpt, tmp_path, monkeypatch):
    rows = [
        {"id": "ok1", "prompt": "Hello"},  # 1
        {"id": "sur-prompt", "prompt": "a\ud800b"},  # 2
        {"id": "sur-msg", "messages": [{"role": "user", "content": "\udfff"}]},
        {"id": "a\ud800", "prompt": "x"},  # 4: the id itself
        {"id": "m-list", "messages": [[1]]},
        {"id": "m-null", "messages": [None]},
        {"id": "m-str", "messages": ["1", "2"]},  # never token ids
        {"id": "m-float", "messages": [1.0, 2.0]},
        {"id": "m-int", "messages": [1, 2]},
        {"id": "p-str", "prompt_ids": ["1", "2"]},  # 10
        {"id": "p-float", "prompt_ids": [1.0, 2.0]},
        {"id": "p-bool", "prompt_ids": [True]},
        {"id": "p-big", "prompt_ids": [1, 10**30]},
        {"id": 1.5, "prompt": "x"},
        {"id": True, "prompt": "x"},  # 15
        {"id": None, "prompt": "x"},
        {"id": 2**60, "prompt": "x"},
        {"id": [1], "prompt": "x"},
        {"id": "ok1", "prompt": "a duplicate id"},
        {"id": "seed", "prompt": "x", "seed": "1"},  # 20
        {"id": "ok2", "prompt_ids": [1, 10, 20]},
        {"id": "ok3", "messages": [{"role": "user", "content": "Hi"}]},
        {"id": "boom", "prompt_ids": [1, 99, 99, 99]},  # generation raises
    ]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    from mistral_jax import generator

    real = generator.Generator._batch

    def failing(self, batch, *a, **k):
        if [1, 99, 99, 99] in batch.prompts:
            raise RuntimeError("boom")
        return real(self, batch, *a, **k)

    monkeypatch.setattr(generator.Generator, "_batch", failing)
    out = tmp_path / "out.jsonl"
    assert generate(ckpt, inp, out) == 0
    res = read_rows(out)
    assert len(res) == len(rows)
    ok = [r["id"] for r in res if "error" not in r]
    assert ok == ["ok1", "ok2", "ok3"]
    err = {r["id"]: r["error"] for r in res if "error" in r}
    expect = {
        "sur-prompt": "in.jsonl:2: 'prompt': not valid Unicode",
        "sur-msg": "in.jsonl:3: 'messages': message 0",
        4: "in.jsonl:4: 'id': not valid Unicode",
        "m-list": "in.jsonl:5: 'messages': message 0 must be a {\"role\": str",
        "m-null": "in.jsonl:6: 'messages'",
        "m-str": "in.jsonl:7: 'messages'",
        "m-float": "in.jsonl:8",
        "m-int": "in.jsonl:9: 'messages'",
        "p-str": "in.jsonl:10: 'prompt_ids': token ids must be a list of integers",
        "p-float": "must be a list of integers",
        "p-bool": "must be a list of integers",
        "p-big": "token id 1000000000000000000000000000000 is outside",
        14: "'id': must be a string or an integer, got float",
        15: "got bool",
        16: "got NoneType",
        17: "'id': integer ids must be within",
        18: "got list",
        "seed": "in.jsonl:20: 'seed': must be an integer",
        "boom": "in.jsonl:23: generation failed (RuntimeError: boom)",
    }
    assert [r["id"] for r in res] == [
        "ok1",
        "sur-prompt",
        "sur-msg",
        4,
        "m-list",
        "m-null",
        "m-str",
        "m-float",
        "m-int",
        "p-str",
        "p-float",
        "p-bool",
        "p-big",
        14,
        15,
        16,
        17,
        18,
        "ok1",
        "seed",
        "ok2",
        "ok3",
        "boom",
    ]
    assert res[18]["error"] == f"{inp}:19: 'id': duplicate of the row on line 1"
    for k, text in expect.items():
        assert text in err[k], (k, err[k])
    # The rows batched with the failing one were generated one at a time, as in a run without it.
    clean = tmp_path / "clean.jsonl"
    monkeypatch.setattr(generator.Generator, "_batch", real)
    write_rows(inp, [r for r in rows if r["id"] != "boom"])
    assert generate(ckpt, inp, clean) == 0
    assert [r for r in read_rows(clean) if "error" not in r] == [r for r in res if "error" not in r]


def test_strings_and_floats_are_never_token_ids():
    from mistral_jax.api import Mistral

    assert Mistral.encode_prompt(None, [1, 2, 3]) == [1, 2, 3]
    for bad in (["1", "2"], [1.0, 2.0], [True], [[1]], [None], 5):
        with pytest.raises(TypeError, match="list of int token ids"):
            Mistral.encode_prompt(None, bad)


def test_score_rows_are_isolated_too(ckpt, tmp_path):
    rows = [
        {"id": "ok", "ids": [1, 5, 9]},
        {"id": "sur", "text": "x\ud800"},
        {"id": "str-ids", "ids": ["1", "2"]},
        {"id": "float-ids", "ids": [1.0, 2.0]},
        {"id": "ok", "ids": [1, 2]},
        {"id": "text", "text": "Hello"},
        {"id": {"a": 1}, "ids": [1, 2]},
    ]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert score(ckpt, inp, out) == 0
    res = read_rows(out)
    assert [r["id"] for r in res] == ["ok", "sur", "str-ids", "float-ids", "ok", "text", 7]
    assert [("error" in r) for r in res] == [False, True, True, True, True, False, True]
    assert "in.jsonl:2: 'text': not valid Unicode" in res[1]["error"]
    assert "in.jsonl:3: 'ids': token ids must be a list of integers" in res[2]["error"]
    assert "duplicate of the row on line 1" in res[4]["error"] and "got dict" in res[6]["error"]


# ---- 4. resume reads bytes: a torn last line, at any byte, is dropped and redone -----------------------------


def _job_files(tmp_path, n=4):
    ids = ["é日本😀", "ü", 12, "\u00e9\u0301 combining"][:n]
    inp = write_rows(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in ids])
    rows = [{"id": i, "completion": "日本語 ünïcode 😀", "n": k} for k, i in enumerate(ids)]
    return inp, rows, [jsonl.encode_row(r) for r in rows]


def test_a_torn_last_line_is_dropped_at_every_byte_boundary(tmp_path):
    inp, rows, lines = _job_files(tmp_path)
    out, settings = tmp_path / "out.jsonl", {"job": "test"}
    full = b"".join(lines)
    prefix, last = b"".join(lines[:2]), lines[2]
    assert len(last) > len(last.decode("utf-8"))  # multi-byte characters: cuts fall inside them
    cases = [last[:k] for k in range(len(last) + 1)] + [last[:k] + b"\n" for k in range(1, len(last) - 1)]
    cases += [b"\x00" * 50, b"\n\x00\x00", b"   "]
    with JobOutput(out, inp, settings) as jo:  # the job's first run: its manifest
        jo.begin()
    for tail in cases:
        out.write_bytes(prefix + tail)
        complete = tail in (last, last[:-1])  # whole, or only its newline lost
        with JobOutput(out, inp, settings) as jo:
            jo.check()
            done = jo.begin()
            assert done.rows == (3 if complete else 2), tail
            assert out.read_bytes() == prefix + (last if complete else b"")  # a lost newline is appended
            assert [r.id for r in job_output.skip_done(jsonl.read_jsonl(str(inp), job_ids=True), done, str(out))] == [
                r["id"] for r in rows[done.rows :]
            ]
            jo.write(rows[done.rows :])
        assert out.read_bytes() == full, tail  # never glued to the next row, never decoded into a crash


def test_a_damaged_row_before_the_last_one_stops_the_job_untouched(tmp_path):
    inp, rows, lines = _job_files(tmp_path)
    out = tmp_path / "out.jsonl"
    with JobOutput(out, inp, {"job": "test"}) as jo:
        jo.begin()
    for damaged in (
        lines[0][:10] + b"\n" + lines[1],
        lines[0] + b'{"no": "id"}\n' + lines[1],
        lines[0] + b"\xff\xfe\n" + lines[1],
        lines[0][:-1] + lines[1] + lines[2],
    ):  # glued
        out.write_bytes(damaged)
        with JobOutput(out, inp, {"job": "test"}) as jo, pytest.raises(JobError, match="damaged|not this job's"):
            jo.check()
            done = jo.begin()
            job_output.skip_done(jsonl.read_jsonl(str(inp), job_ids=True), done, str(out))
        assert out.read_bytes() == damaged


def test_resume_after_a_cut_inside_a_multibyte_character_or_a_lost_newline(ckpt, tmp_path):
    inp = write_rows(tmp_path / "in.jsonl", GOOD)
    full = tmp_path / "full.jsonl"
    assert generate(ckpt, inp, full) == 0
    data = full.read_bytes()
    start = data.index("é日本😀".encode())  # row 6's id
    for cut in (start + 1, start + 4, len(data) - 1):  # inside é, inside 日, only the final newline lost
        out = tmp_path / f"out{cut}.jsonl"
        out.write_bytes(data[:cut])
        shutil.copy(f"{full}.manifest.json", f"{out}.manifest.json")
        assert generate(ckpt, inp, out) == 0
        assert out.read_bytes() == data


# ---- 5. no code from the cache directory --------------------------------------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle ran')",))


def test_garbage_and_pickles_in_the_cache_directory_are_ignored(ckpt, tmp_path):
    """The only thing kept in $MISTRAL_JAX_CACHE is JAX's compilation cache, which never unpickles: every
    entry replaced by garbage or by a pickle that would run code, the job compiles again, gives the same rows,
    and the pickle never runs."""
    inp = write_rows(tmp_path / "in.jsonl", GOOD[:3])
    cache, marker = tmp_path / "xla", tmp_path / "PWNED"
    env = {**os.environ, "MISTRAL_JAX_CACHE": str(cache)}

    def run(out):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "infer.generate",
                "--checkpoint",
                str(ckpt),
                "--input",
                str(inp),
                "--output",
                str(out),
                "--max-new-tokens",
                "3",
                "--batch-size",
                "4",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    run(tmp_path / "first.jsonl")
    entries = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs]
    assert entries
    evil = pickle.dumps(_Evil(str(marker)))
    payloads = [evil, zlib.compress(evil), os.urandom(64), b"", zlib.compress(b"\x00" * 8 + evil)]
    for k, path in enumerate(entries):
        with open(path, "wb") as f:
            f.write(payloads[k % len(payloads)])
    for name, data in [("evil.pkl", evil), ("sub/dir/x-cache", zlib.compress(evil)), ("jit_x-cache", evil)]:
        os.makedirs(os.path.dirname(cache / name), exist_ok=True)
        (cache / name).write_bytes(data)
    r = run(tmp_path / "second.jsonl")
    assert "Error reading persistent compilation cache entry" in r.stderr  # the planted entries were read
    assert not marker.exists()
    assert (tmp_path / "second.jsonl").read_bytes() == (tmp_path / "first.jsonl").read_bytes()
    pickle.loads(evil)  # the payload does run when unpickled: the test is real
    assert marker.read_text() == "pickle ran"


def test_an_unusable_cache_directory_is_skipped(ckpt, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    assert programs.enable_compilation_cache(str(blocker / "xla")) is None
    assert "no compilation cache" in capsys.readouterr().err
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(blocker))
    inp = write_rows(tmp_path / "in.jsonl", GOOD[:1])
    assert generate(ckpt, inp, tmp_path / "out.jsonl") == 0


# ---- 6. flags: one line `error: ...`, exit 2 ----------------------------------------------------------------


@pytest.mark.parametrize("tool", ["generate", "score"])
@pytest.mark.parametrize("size", ["-1", "0"])
def test_a_batch_size_below_one_is_refused(ckpt, tmp_path, capsys, tool, size):
    inp = write_rows(tmp_path / "in.jsonl", GOOD[:1])
    out = tmp_path / "out.jsonl"
    main = gen_cli.main if tool == "generate" else score_cli.main
    args = ["--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out), "--batch-size", size]
    with pytest.raises(SystemExit, match=f"^error: --batch-size must be at least 1, got {size}$"):
        main(args)  # in a process: one line, exit 2 (below)
    assert launch.run_tool(main, args) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: --batch-size must be at least 1, got {size}"]
    assert not out.exists()


@pytest.mark.parametrize("tool", ["generate", "score"])
def test_user_errors_are_one_line_and_exit_2_as_processes(ckpt, tmp_path, tool):
    inp = write_rows(tmp_path / "in.jsonl", GOOD[:1])
    cases = [
        (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
        (["--checkpoint", str(tmp_path / "nope")], f"error: checkpoint directory not found: {tmp_path / 'nope'}"),
        (["--input", str(tmp_path / "nope.jsonl")], f"error: input file not found: {tmp_path / 'nope.jsonl'}"),
        (["--batch-size", "x"], "error: argument --batch-size: invalid int value: 'x'"),
    ]
    for extra, want in cases:
        args = {"--checkpoint": str(ckpt), "--input": str(inp), "--output": str(tmp_path / "out.jsonl")}
        args.update(zip(extra[::2], extra[1::2]))
        r = subprocess.run(
            [sys.executable, "-m", f"infer.{tool}", *[x for kv in args.items() for x in kv]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "MISTRAL_JAX_CACHE": str(tmp_path / "xla")},
        )
        assert r.returncode == 2, r.stderr[-2000:]
        assert error_lines(r.stderr) == [want]
        assert not (tmp_path / "out.jsonl").exists()


# ---- 7. fuzz ------------------------------------------------------------------------------------------------


def _random_text(rng, n, surrogates=True):
    ranges = [(0x20, 0x7E), (0xA0, 0x2FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F), (0, 0x1F)]
    if surrogates:
        ranges.append((0xD800, 0xDFFF))
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def _random_value(rng, depth=0):
    kind = rng.randrange(10 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 31999, 32000, 2**31, 2**53, 2**64, -(2**70), 10**40])
    if kind == 3:
        return rng.choice([0.5, -1.0, 1e300, 3.0, float(rng.randint(0, 100))])
    if kind in (4, 5):
        return _random_text(rng, rng.randint(0, 12))
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["role", "content", "id", "x"]): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _fuzz_line(rng, k) -> bytes:
    kind = rng.randrange(12)
    if kind == 0:  # raw bytes: invalid UTF-8, control characters, half JSON
        return rng.choice(
            [
                bytes(rng.randrange(256) for _ in range(rng.randint(1, 30))),
                b'{"id": "x", "pro',
                b"\xef\xbb\xbf{}",
                b'{"id": "\xed\xa0\x80"}',
                b"\r",
                b"\x00",
                b"[" * 3000,
                b"1" * 5000,
                b'{"id": 1e999}',
                b'{"id": NaN}',
                b'{"a": 1, "a": 2}',
            ]
        )
    if kind == 1:  # any JSON value
        return json.dumps(_random_value(rng)).encode()
    if kind == 2:  # deep nesting inside a row
        return json.dumps({"id": f"deep{k}", "prompt": json.loads("[" * 400 + "]" * 400)}).encode()
    row = {}
    if rng.random() < 0.8:
        row["id"] = rng.choice([f"r{k}", f"r{rng.randrange(k + 1)}", k, _random_value(rng), _random_text(rng, 3)])
    field = rng.choice(["prompt", "messages", "prompt_ids", "text", "ids", "other"])
    if kind < 7:  # wrong types, random values
        row[field] = _random_value(rng)
    elif field in ("prompt", "text"):
        row[field] = _random_text(rng, rng.randint(0, 10), surrogates=rng.random() < 0.3)
    elif field == "messages":
        row[field] = [
            {
                "role": rng.choice(["user", "assistant", "system", "bot", 3]),
                "content": _random_text(rng, rng.randint(0, 6), surrogates=rng.random() < 0.2),
            }
            for _ in range(rng.randint(0, 3))
        ]
    else:
        row[field] = [rng.choice([1, rng.randrange(32000), rng.randrange(-5, 40000)]) for _ in range(rng.randint(0, 9))]
    if rng.random() < 0.1:
        row["seed"] = _random_value(rng)
    return json.dumps(row, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def test_fuzz_every_line_gets_one_row_and_a_rerun_adds_nothing(ckpt, tmp_path):
    rng = random.Random(20)
    lines = [_fuzz_line(rng, k) for k in range(300)]
    for _ in range(20):  # blank lines get no row
        lines.insert(rng.randrange(len(lines)), rng.choice([b"", b"  ", b"\t", b"\r"]))
    data = b"\n".join(lines) + rng.choice([b"\n", b""])
    inp = tmp_path / "fuzz.jsonl"
    inp.write_bytes(data)
    expected = sum(1 for x in data.split(b"\n") if x.strip())
    for tool, run in (("generate", generate), ("score", score)):
        out = tmp_path / f"{tool}.jsonl"
        assert run(ckpt, inp, out) in (0, 1)
        written = out.read_bytes()
        res = read_rows(out)  # valid UTF-8 JSON, one row per line
        assert len(res) == expected, tool
        assert all(isinstance(r["id"], str) or (type(r["id"]) is int and abs(r["id"]) < 2**53) for r in res)
        assert all(("error" in r) != ("completion" in r or "token_logprobs" in r) for r in res)
        assert sum("error" not in r for r in res) >= 5, tool  # the valid rows were run
        assert run(ckpt, inp, out) in (0, 1) and out.read_bytes() == written  # a re-run adds nothing
        for cut in sorted(rng.sample(range(1, len(written)), 2)):  # a crash at a random byte, then resume
            out.write_bytes(written[:cut])
            assert run(ckpt, inp, out) in (0, 1)
            assert out.read_bytes() == written, (tool, cut)
