"""generate.py and infer.generate: batched greedy generation against transformers, the rolling buffer,
sampling reproducibility, compile counts, stop conditions, streaming, and the resumable batch job."""

import json
import os
import pathlib
import shutil
import time
import types

import jax
import numpy as np
import pytest
import torch

from hf_models import make_hf_model
from mistral_jax import checkpoint, generate
from mistral_jax.generate import Generator, SamplingParams


ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(tmp_path, **overrides):
    model, cfg, _ = make_hf_model(0, linear_std=0.1, **overrides)
    model.save_pretrained(tmp_path / "hf")
    config = checkpoint.load_config(tmp_path / "hf")
    return model, config, checkpoint.load_params(tmp_path / "hf", config)


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts(vocab, lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("window,layout", [(5, "stacked"), (None, "stacked"), (5, "cpu")])
def test_batched_greedy_matches_transformers_one_at_a_time(tmp_path, window, layout):
    """layout "stacked": the training layout; "cpu": what load_model gives on the CPU (unrolled layers,
    out-major weights)."""
    model, config, params = _load(tmp_path, sliding_window=window)
    if layout == "cpu":
        from mistral_jax import api

        loaded = api.load_model(tmp_path / "hf")
        config, params = loaded.config, loaded.params
        assert config.out_major_weights and not config.scan_layers
    prompts = _prompts(config.vocab_size, [3, 17, 9, 30, 1])  # 30 > prefill chunk: chunked prefill
    gen = Generator(params, config, batch_size=4, prefill_chunk=8)  # 5 prompts: two batches, one partial
    batches = []
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=40, stop_token_ids=()),  # 40 >> window 5
                        on_batch=lambda idx, comps: batches.append(list(idx)))
    assert batches == [[4, 0, 2, 1], [3]]  # batched shortest first; results still in the order given
    for p, o in zip(prompts, outs):
        assert o.ids == _hf_greedy(model, p, 40)
        assert o.finish_reason == "length" and o.prompt_tokens == len(p) and o.completion_tokens == 40


@pytest.mark.parametrize("window", [5, None])
def test_a_batch_folded_into_a_shorter_bucket_matches_transformers(tmp_path, window):
    """Prompts of 17 and 18 tokens (bucket 24) are prefilled to 16, the bucket of the batch before them, and
    their last tokens are fed by the decode loop (Generator's fold): the tokens are transformers' greedy ones,
    one prompt at a time, and sampling draws what it draws unfolded."""
    from mistral_jax import api

    model, _, _ = _load(tmp_path, sliding_window=window)
    loaded = api.load_model(tmp_path / "hf")
    config, params = loaded.config, loaded.params
    prompts = _prompts(config.vocab_size, [30, 17, 10, 18, 14, 20])
    gen = Generator(params, config, batch_size=2)
    assert gen._folding()  # on by default here: one CPU device
    assert gen._fold_lengths([14, 18, 30]) == [None, 16, None]
    prefills = []
    real = gen._prefill
    gen._prefill = lambda ps, *a: prefills.append((sorted(map(len, ps)), a[-1])) or real(ps, *a)
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=()))
    assert prefills == [([10, 14], None), ([17, 18], 16), ([20, 30], None)]
    for p, o in zip(prompts, outs):
        assert o.ids == _hf_greedy(model, p, 24)
        assert o.prompt_tokens == len(p) and o.completion_tokens == 24 and o.finish_reason == "length"
    sp = [SamplingParams(max_new_tokens=24, temperature=1.0, top_k=30, seed=i, stop_token_ids=()) for i in range(6)]
    folded = Generator(params, config, batch_size=2).generate(prompts, sp)
    plain = Generator(params, config, batch_size=2, fold=False).generate(prompts, sp)
    assert [o.ids for o in folded] == [o.ids for o in plain]


def test_fold_only_into_a_bucket_the_job_prefills_anyway_when_the_steps_cost_less():
    """_fold_lengths: a batch folds into the smallest shorter bucket an earlier batch uses, when its longest
    prompt passes it by at most TAIL_TOKENS and by at most a FOLD_STEP_COST-th of the padding saved; never
    into a bucket no batch uses (that would add a program), nor a prefill of several chunks."""
    from mistral_jax.config import MistralConfig

    gen = Generator(None, MistralConfig(max_seq_len=4096), batch_size=8)
    assert gen._fold_lengths([99, 136, 162, 189]) == [None, 128, None, None]  # 8 <= 64 / 4; 34 > 16
    assert gen._fold_lengths([189, 136, 99]) == [None, 128, None]  # by length, whatever the order
    assert gen._fold_lengths([136, 189]) == [None, None]  # 128 is nobody's bucket
    assert gen._fold_lengths([99, 129, 140]) == [None, 128, 128]  # 140 - 128 = 12 <= 64 / 4 = 16
    assert gen._fold_lengths([99, 145]) == [None, None]  # 17 > 16
    assert gen._fold_lengths([400, 520]) == [None, None]  # 520: two chunks of 512
    assert gen._fold_lengths([1000, 1030]) == [None, None]  # 1030 - 1024 fits the rule, but 1536 > 512


def test_batch_of_one_on_the_cpu_layout_matches_transformers(tmp_path):
    """Batch 1 writes its decode token through its own path (model._cache_write: a scatter of two identical
    indices, which XLA:CPU updates in place)."""
    from mistral_jax import api

    model, _, _ = _load(tmp_path, sliding_window=5)
    loaded = api.load_model(tmp_path / "hf")
    assert not loaded.config.scan_layers
    prompts = _prompts(loaded.config.vocab_size, [3, 12])
    outs = Generator(loaded.params, loaded.config, batch_size=1, prefill_chunk=8).generate(
        prompts, SamplingParams(max_new_tokens=30, stop_token_ids=()))
    for p, o in zip(prompts, outs):
        assert o.ids == _hf_greedy(model, p, 30)


def test_rolling_buffer_equals_full_cache_and_stays_at_window(tmp_path):
    _, config, params = _load(tmp_path, sliding_window=6)
    prompts = _prompts(config.vocab_size, [25, 4, 11])
    sp = SamplingParams(max_new_tokens=50, stop_token_ids=())
    rolling = Generator(params, config, batch_size=3, prefill_chunk=8)
    full = Generator(params, config, batch_size=3, prefill_chunk=8, cache_slots=32 + 64)
    a, b = rolling.generate(prompts, sp), full.generate(prompts, sp)
    assert [x.ids for x in a] == [x.ids for x in b]
    assert rolling.last_cache_shape[3] == 6  # [L, B, K, S, H]: W slots however long the generation
    assert full.last_cache_shape[3] == 96


def test_fixed_seed_reproduces_across_batch_sizes(tmp_path):
    _, config, params = _load(tmp_path, sliding_window=8)
    target = _prompts(config.vocab_size, [12], seed=5)[0]
    others = _prompts(config.vocab_size, [3, 20, 7, 9, 14], seed=6)
    sp = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.9, seed=1234, stop_token_ids=())
    alone = Generator(params, config, batch_size=1).generate([target], sp)[0].ids
    batch = others[:2] + [target] + others[2:]
    mixed = Generator(params, config, batch_size=6).generate(
        batch, [SamplingParams(max_new_tokens=24, temperature=0.7, seed=i, stop_token_ids=()) for i in range(2)]
        + [sp] + [SamplingParams(max_new_tokens=24, seed=9, stop_token_ids=())] * 3)
    assert mixed[2].ids == alone
    again = Generator(params, config, batch_size=1).generate([target], sp)[0].ids
    assert again == alone
    other_seed = Generator(params, config, batch_size=1).generate([target], SamplingParams(
        max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.9, seed=99, stop_token_ids=()))[0].ids
    assert other_seed != alone


def test_low_temperature_equals_greedy(tmp_path):
    _, config, params = _load(tmp_path, sliding_window=8)
    prompts = _prompts(config.vocab_size, [6, 13])
    gen = Generator(params, config, batch_size=2)
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=20, stop_token_ids=()))
    cold = gen.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1e-5, seed=3, stop_token_ids=()))
    assert [g.ids for g in greedy] == [c.ids for c in cold]


def test_compilations_for_many_prompts_are_a_handful(tmp_path):
    _, config, params = _load(tmp_path, sliding_window=8)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    rng = np.random.default_rng(0)
    prompts = _prompts(config.vocab_size, rng.integers(1, 120, 50).tolist())
    gen = Generator(params, config, batch_size=8, prefill_chunk=64)
    before, decode_before = len(compiles), generate.program_count("decode")
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=8, stop_token_ids=()))
    n = len(compiles) - before
    assert len(outs) == 50 and all(o.completion_tokens == 8 for o in outs)
    # one decode program for every prompt bucket (none at all if an earlier test compiled the same one)
    assert generate.program_count("decode") - decode_before <= 1
    # Prompt buckets 16..128 give at most 7 prefill programs, one decode program (its cache is sized by a
    # power of two at most the window, the same for every bucket here), plus the cache initialisation: a
    # handful, never one per prompt or per bucket.
    assert 2 <= n <= 10, n


def test_next_batch_prefills_in_a_worker_while_this_one_decodes(tmp_path, monkeypatch):
    """On one CPU device the next batch's prefill runs in a worker thread during this batch's decode; the
    completions are those of the sequential order, greedy and sampled rows alike. Elsewhere batches run one
    after the other."""
    import threading

    _, config, params = _load(tmp_path, sliding_window=8)
    prompts = _prompts(config.vocab_size, [3, 21, 9, 30, 14, 5, 26])  # three batches of 3, prompt buckets differ
    sampling = [SamplingParams(max_new_tokens=12 + i, temperature=0.8 * (i % 2), seed=i, stop_token_ids=())
                for i in range(len(prompts))]
    threads, events = [], []  # events: (thread is the main one, what)
    run, find = generate._run_prefill, generate._program

    def log(what):
        events.append((threading.current_thread() is threading.main_thread(), what))

    def run_prefill(*a):
        threads.append(threading.current_thread())
        log("run prefill")
        return run(*a)

    def program(jitted, name, *a, **k):
        log(f"find {name}")
        found = find(jitted, name, *a, **k)
        if name != "decode":
            return found
        return lambda *args, **kwargs: (log("run decode"), found(*args, **kwargs))[1]

    monkeypatch.setattr(generate, "_run_prefill", run_prefill)
    monkeypatch.setattr(generate, "_program", program)
    seen = {}
    for overlap in (False, True):
        threads.clear()
        events.clear()
        gen = Generator(params, config, batch_size=3, prefill_chunk=8, overlap_prefill=overlap)
        t0 = time.perf_counter()
        seen[overlap] = [(o.ids, o.finish_reason) for o in gen.generate(prompts, sampling)]
        assert 0 < gen.busy_seconds() < time.perf_counter() - t0  # compilations that ran alone are not counted
        assert len(threads) == 3
        assert all((t is threading.main_thread()) != overlap for t in threads), threads
        main = [what for in_main, what in events if in_main]
        if overlap:
            # A batch's decode program is found before its prefill is waited for; the next batch's prefill
            # program once this batch's decode has been dispatched.
            assert main == ["find prefill"] + ["find decode", "run decode", "find prefill"] * 2 + [
                "find decode", "run decode"], main
        else:  # one batch at a time: the next prefill after this decode, one KV cache held
            assert main == ["find prefill", "run prefill", "find decode", "run decode"] * 3, main
    assert seen[True] == seen[False]
    assert Generator(params, config)._overlap()  # the default here: one CPU device, one process
    # Several devices, or an accelerator, run one program at a time: no overlap there.
    assert not generate.overlaps_prefill(jax.devices() * 2)
    assert not generate.overlaps_prefill([types.SimpleNamespace(platform="gpu")])


def test_stop_tokens_per_row_limits_and_reasons(tmp_path):
    model, config, params = _load(tmp_path, sliding_window=8)
    prompts = _prompts(config.vocab_size, [5, 9])
    ref = [_hf_greedy(model, p, 20) for p in prompts]
    stop = ref[0][6]  # the 7th greedy token of row 0 becomes a stop token
    first = ref[0].index(stop)
    gen = Generator(params, config, batch_size=2)
    outs = gen.generate(prompts, [SamplingParams(max_new_tokens=20, stop_token_ids=(stop,)),
                                  SamplingParams(max_new_tokens=7, stop_token_ids=())])
    assert outs[0].ids == ref[0][:first] and outs[0].finish_reason == "stop"
    assert outs[1].ids == ref[1][:7] and outs[1].finish_reason == "length"


@pytest.fixture()
def tok_model(tmp_path, v1_tokenizer_path):
    model, _, _ = make_hf_model(4, vocab_size=32000, hidden_size=32, intermediate_size=48, head_dim=8,
                                sliding_window=8, linear_std=0.1)
    model.save_pretrained(tmp_path / "tm")
    shutil.copy(v1_tokenizer_path, tmp_path / "tm" / "tokenizer.model")
    return model, tmp_path / "tm"


def test_stop_strings_and_streaming(tok_model):
    from mistral_jax.api import Mistral

    model, path = tok_model
    m = Mistral.load(str(path), batch_size=2)
    full = m.generate("Hello world", max_new_tokens=30, stop_token_ids=())[0]
    assert full.ids == _hf_greedy(model, m.tokenizer.encode("Hello world"), 30)
    assert full.text == m.tokenizer.decode(full.ids)
    streamed = "".join(m.stream("Hello world", steps_per_call=4, max_new_tokens=30, stop_token_ids=()))
    assert streamed == full.text
    needle = full.text[len(full.text) // 2:][:3]
    cut = m.generate("Hello world", max_new_tokens=30, stop_token_ids=(), stop_strings=(needle,))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(needle)]
    assert needle in m.tokenizer.decode(cut.ids) and cut.ids == full.ids[: len(cut.ids)]


def test_a_second_run_loads_its_programs_instead_of_compiling(tmp_path):
    """With the compilation cache on, a second process loads the prefill and decode programs the first one kept
    (no tracing, lowering or compiling of them) and generates the same tokens; a corrupt kept program is
    compiled again, and runs after that still work; a new version keeps programs of its own."""
    import subprocess
    import sys
    import textwrap

    model, config, _ = _load(tmp_path, sliding_window=8)
    prompts = _prompts(config.vocab_size, [5, 17, 40])
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import jax
        from mistral_jax import api, generate
        if os.environ.get("FAKE_SOURCE_HASH"):  # another version of the package
            generate._source_hash = lambda: os.environ["FAKE_SOURCE_HASH"]
        events = {{"compile": 0, "load": 0}}
        def on(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                events["compile"] += 1
            elif event == generate.PROGRAM_EVENT:
                events["load"] += 1
        jax.monitoring.register_event_duration_secs_listener(on)
        api.enable_compilation_cache({str(tmp_path / "xla")!r})
        m = api.Mistral(api.load_model({str(tmp_path / "hf")!r}), batch_size=2)
        before = dict(events)
        outs = m.generate({prompts!r}, max_new_tokens=12, stop_token_ids=())
        print(json.dumps({{"ids": [o.ids for o in outs], "programs": generate.program_count(),
                          "compiles": events["compile"] - before["compile"], "loads": events["load"]}}))
    """)

    def run(version=""):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={**os.environ, "FAKE_SOURCE_HASH": version})
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = run()
    assert first["ids"] == [_hf_greedy(model, p, 12) for p in prompts]
    assert first["programs"] == 3 and first["loads"] == 0  # prefill buckets 24 and 48 (two batches), one decode
    kept = sorted((tmp_path / "xla" / "mistral_jax_programs").glob("*.bin"))
    assert len(kept) == 3
    second = run()
    assert second["ids"] == first["ids"] and second["loads"] == 3
    assert second["compiles"] < first["compiles"]  # jit's own small programs may still come from the XLA cache
    kept[0].write_bytes(b"not a program")
    third = run()
    assert third["ids"] == first["ids"] and third["loads"] == 2
    # That program came from JAX's persistent cache this time; kept from there it would lose kernels (it did:
    # "Function ... not found" on the run after), so it is not kept, and every later run still generates.
    assert third["programs"] == 3 and run()["ids"] == first["ids"]
    # A new version of the package (another source hash) compiles its own programs, not JAX's cached ones of the
    # old version (whose lowered modules it may share), and keeps them: its second run loads all three.
    before = len(list((tmp_path / "xla" / "mistral_jax_programs").glob("*.bin")))
    upgraded = run("0123456789abcdef" * 4)
    assert upgraded["ids"] == first["ids"] and upgraded["loads"] == 0
    assert len(list((tmp_path / "xla" / "mistral_jax_programs").glob("*.bin"))) == before + 3
    assert run("0123456789abcdef" * 4)["loads"] == 3


def test_generate_job_resumes_and_reports_bad_rows(tok_model, tmp_path, monkeypatch):
    from infer import generate as gen_cli
    from mistral_jax.tokenizer import Tokenizer

    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "xla"))
    model, path = tok_model
    rows = [json.dumps({"id": f"p{i}", "prompt": f"Story number {i}:"}) for i in range(5)]
    rows += ["{broken", json.dumps({"id": "m", "messages": [{"role": "user", "content": "Hi there"}]}),
             json.dumps({"id": "ids", "prompt_ids": [1, 300, 400]}), json.dumps({"id": "oov", "prompt_ids": [1, 32000]}),
             json.dumps({"id": "none", "text": "x"}), json.dumps({"id": "badmsg", "messages": [{"role": "bot", "content": "x"}]}),
             json.dumps({"id": "long", "prompt_ids": [1] + [300] * 512})]  # 513 tokens, the context is 512
    rows += [json.dumps({"id": f"q{i}", "prompt": f"Another {i}"}) for i in range(4)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(rows) + "\n")
    args = ["--checkpoint", str(path), "--input", str(inp), "--max-new-tokens", "6", "--batch-size", "3"]
    full_out = tmp_path / "full.jsonl"
    assert gen_cli.main(args + ["--output", str(full_out)]) == 0
    full = [json.loads(x) for x in full_out.read_text().splitlines()]
    ids = [r["id"] for r in full]
    assert ids == ["p0", "p1", "p2", "p3", "p4", 6, "m", "ids", "oov", "none", "badmsg", "long", "q0", "q1", "q2",
                   "q3"]
    err = {r["id"]: r["error"] for r in full if "error" in r}
    assert set(err) == {6, "oov", "none", "badmsg", "long"}
    assert "in.jsonl:6: not valid JSON" in err[6] and "token id 32000" in err["oov"]
    assert "none of 'prompt', 'messages', 'prompt_ids'" in err["none"] and "in.jsonl:11" in err["badmsg"]
    assert "in.jsonl:12" in err["long"] and "513 tokens exceed the model's context of 512" in err["long"]
    tok = Tokenizer.from_file(str(path / "tokenizer.model"))
    for r in full:
        if "error" in r:
            continue
        assert r["completion_tokens"] == len(r["completion_ids"]) == 6 and r["finish_reason"] == "length"
        assert r["completion"] == tok.decode(r["completion_ids"])
    m_row = next(r for r in full if r["id"] == "m")
    prompt = tok.encode_chat([{"role": "user", "content": "Hi there"}])
    assert m_row["prompt_tokens"] == len(prompt) and m_row["completion_ids"] == _hf_greedy(model, prompt, 6)

    # One row per batch: two windows of 8 batches, each sorted by length; the same rows in the same order.
    one_out = tmp_path / "one.jsonl"
    assert gen_cli.main(args[:-1] + ["1", "--output", str(one_out)]) == 0
    assert [json.loads(x) for x in one_out.read_text().splitlines()] == full

    # A crash after 4 rows, mid-write of the 5th: the re-run skips what was written and loses nothing.
    out = tmp_path / "resumed.jsonl"
    lines = full_out.read_text().splitlines()
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])
    assert gen_cli.main(args + ["--output", str(out)]) == 0
    resumed = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in resumed] == ids  # every id exactly once, in input order
    assert resumed == full


def test_generate_tool_as_a_process_writes_everything_and_returns_its_exit_code(tmp_path):
    """`python -m infer.generate` leaves through launch.exit_process (os._exit, no interpreter teardown): the
    output is complete and flushed, the tokens are transformers', and the exit code is main's (1 when every
    row was an error)."""
    import subprocess
    import sys

    model, config, _ = _load(tmp_path, sliding_window=8)
    prompts = _prompts(config.vocab_size, [5, 11, 3])
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"id": i, "prompt_ids": p}) + "\n" for i, p in enumerate(prompts)))
    bad.write_text("{broken\n" + json.dumps({"id": "oov", "prompt_ids": [1, 10**6]}) + "\n")

    def run(inp):
        out = tmp_path / f"out-{inp.stem}.jsonl"
        r = subprocess.run([sys.executable, "-m", "infer.generate", "--checkpoint", str(tmp_path / "hf"), "--input",
                            str(inp), "--output", str(out), "--max-new-tokens", "7", "--batch-size", "2",
                            "--ignore-eos"], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "MISTRAL_JAX_CACHE": str(tmp_path / "xla")})
        return r, [json.loads(x) for x in out.read_text().splitlines()]

    r, rows = run(good)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rows: 3 generated, 0 errors" in r.stdout
    assert [x["completion_ids"] for x in rows] == [_hf_greedy(model, p, 7) for p in prompts]
    r, rows = run(bad)
    assert r.returncode == 1 and [x["id"] for x in rows] == [1, "oov"] and all("error" in x for x in rows)


def test_generation_stops_at_the_context_length(tmp_path):
    model, config, params = _load(tmp_path, sliding_window=8, max_position_embeddings=32)
    prompts = _prompts(config.vocab_size, [32, 30])
    outs = Generator(params, config, batch_size=2).generate(prompts, SamplingParams(max_new_tokens=10,
                                                                                   stop_token_ids=()))
    assert outs[0].ids == [] and outs[0].finish_reason == "length"
    assert outs[1].ids == _hf_greedy(model, prompts[1], 2) and outs[1].finish_reason == "length"


def _cpu_layout(tmp_path):
    """(config, params) as load_model gives them on the CPU: per-layer, out-major weights."""
    from mistral_jax import api

    make_hf_model(0, sliding_window=8)[0].save_pretrained(tmp_path / "hf")
    loaded = api.load_model(tmp_path / "hf")
    assert not loaded.config.scan_layers and loaded.config.out_major_weights
    return loaded.config, loaded.params


def _greedy_state(config, cache, logits, pos, max_new, m):
    """A decode state (generate.decode) of greedy rows, nothing generated yet: pos and max_new per row, an
    output buffer of m tokens, no stop id."""
    import jax.numpy as jnp

    b = len(pos)
    z = lambda v, d=jnp.int32: jnp.full((b,), v, d)  # noqa: E731
    return dict(cache=cache, logits=logits, out=jnp.zeros((b, m), jnp.int32), n=z(0),
                pos=jnp.asarray(pos, jnp.int32), done=z(False, bool), reason=z(0), seeds=z(0, jnp.uint32),
                temperature=z(0.0, jnp.float32), top_k=z(0), top_p=z(1.0, jnp.float32),
                max_new=jnp.asarray(max_new, jnp.int32), stop_ids=jnp.full((b, 1), -1, jnp.int32))


def _compiled_prefills(config, params):
    """(t, chunk, compiled prefill) for a batch of 2 prompts of t tokens: in one chunk, and in several."""
    import jax.numpy as jnp

    from mistral_jax.kv_cache import init_cache

    b = 2
    for t, chunk in [(16, 16), (32, 8)]:
        pre, _ = generate._compiled(config, chunk)
        yield t, chunk, pre.lower(params, tokens=jnp.zeros((b, t), jnp.int32), lengths=jnp.full((b,), t, jnp.int32),
                                  cache=init_cache(config, b, 8)).compile()


@pytest.mark.parametrize("b,sampled,final", [(3, True, True), (3, False, True), (1, False, True), (1, False, False)])
def test_decode_program_updates_the_cache_in_place_and_copies_no_weight(tmp_path, b, sampled, final):
    """The compiled decode loop, as the tools run it on the CPU (unrolled layers), holds no copy or transpose of
    a KV-cache buffer or of a weight: each step writes the cache in place and reads every weight as stored.
    Such copies once slowed decode on the 125M benchmark (docs/benchmarks.md); at batch 1 XLA copied every
    layer's cache, until the write was made a scatter of two identical indices (model._cache_write)."""
    import re

    import jax.numpy as jnp

    from mistral_jax.kv_cache import init_cache

    config, params = _cpu_layout(tmp_path)
    slots, m = 8, 16
    state = _greedy_state(config, init_cache(config, b, slots), jnp.zeros((b, config.vocab_size), jnp.float32),
                          [5] * b, [m] * b, m)
    _, dec = generate._compiled(config, 16)
    hlo = dec.lower(params, state=state, max_steps=jnp.int32(m), sampled=sampled, final=final).compile().as_text()

    def shape(x):
        return f"f32[{','.join(map(str, x.shape))}]"

    guarded = {shape(x) for x in jax.tree.leaves(state["cache"]["k"])}
    guarded |= {shape(x) for x in jax.tree.leaves(params) if x.ndim >= 2 and x.shape[0] != config.vocab_size}
    assert config.out_major_weights  # wo [D, N, H], flattened below
    guarded |= {f"f32[{config.dim},{config.n_heads * config.head_dim}]"}
    copies = [line.strip()[:160] for line in hlo.splitlines()
              if (mt := re.match(r"\s*(?:ROOT )?%([\w.-]+) = (f32\[[\d,]*\])\{[\d,]*\} (\w+)\(", line))
              and mt.group(2) in guarded
              and (mt.group(3) in ("copy", "transpose") or (mt.group(3) == "fusion" and re.search(
                  r"copy|transpose", mt.group(1))))]
    assert not copies, "\n".join(copies)
    assert "dot(" in hlo or "fusion" in hlo  # the program was inspected, not an empty text


def test_a_final_decode_call_does_not_feed_its_last_token(tmp_path):
    """decode(final=True), the single call of a batch that the tools make when nothing is checked on the host
    between calls, picks the same tokens as the general loop (final=False) but runs the model one step fewer:
    the logits it returns are those its last token was picked from, which the general loop returns when
    stopped one step short; with the extra forward they would be the general loop's own. Rows of different
    prompt lengths and token limits."""
    import jax.numpy as jnp

    from mistral_jax.kv_cache import init_cache

    config, params = _cpu_layout(tmp_path)
    b, t, m = 3, 8, 6
    lengths = np.array([8, 5, 3], np.int32)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(_prompts(config.vocab_size, lengths)):
        tokens[i, :len(p)] = p
    pre, dec = generate._compiled(config, t)

    def run(steps, final):
        logits, cache = pre(params, tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                            cache=init_cache(config, b, 16))
        state = _greedy_state(config, cache, logits, lengths, [m, m, 4], m)
        return jax.device_get(dec(params, state=state, max_steps=jnp.int32(steps), sampled=False, final=final))

    general, short, final = run(m, False), run(m - 1, False), run(m, True)
    for key in ("out", "n", "done", "reason"):
        np.testing.assert_array_equal(final[key], general[key], err_msg=key)
    assert general["n"].tolist() == [m, m, 4] and general["done"].all()
    np.testing.assert_array_equal(final["logits"], short["logits"])
    assert not np.array_equal(general["logits"], short["logits"])


def test_prefill_program_on_the_cpu_layout_holds_no_copy_of_the_weights(tmp_path):
    """Prefill with per-layer params (what load_model gives on the CPU) reads the weights where they lie: the
    compiled program's temporary memory stays well under the weights' size, for one chunk and for several.
    Stacking the layers inside the program (one scanned layer) copied every weight at every call, twice the
    weights' memory during a prefill."""
    config, params = _cpu_layout(tmp_path)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))
    for t, chunk, compiled in _compiled_prefills(config, params):
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < layer_bytes / 2, (t, chunk, temp, layer_bytes)


def test_prefill_program_computes_the_rotary_tables_once(tmp_path):
    """The rotary tables (rope.rope_tables) are evaluated once per program, not inside every layer's rotation:
    the compiled prefill of an L-layer model holds one sine and one cosine per traced forward (one chunk: one;
    several: the first chunk and the scanned rest). Computed per layer (or fused into the rotations, which XLA
    does when nothing stops it), they were held 2 L times per forward and evaluated for every head and element."""
    config, params = _cpu_layout(tmp_path)
    assert config.n_layers > 1
    for t, chunk, compiled in _compiled_prefills(config, params):
        forwards = 1 if chunk == t else 2
        text = compiled.as_text()
        assert (text.count(" sine("), text.count(" cosine(")) == (forwards, forwards), (t, chunk)


@pytest.mark.parametrize("tied", [False, True])
def test_out_major_weights_give_the_same_logits(tied):
    """model.out_major_weights ([out, in] weights, the CPU inference layout), and fuse_projections on top of it,
    against the training layout, through both of its product forms: few rows (the weight as left operand,
    decode) and many rows (prefill)."""
    import jax.numpy as jnp

    from mistral_jax import model as model_lib
    from mistral_jax.config import get_preset

    config = get_preset("tiny", tie_embeddings=tied)
    params = model_lib.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 100)))
    few, many = tokens[:, :8], tokens  # 16 and 200 rows, either side of model._FEW_ROWS
    assert 16 <= model_lib._FEW_ROWS < 200
    ref_few, ref_many = model_lib.forward(params, config, few), model_lib.forward(params, config, tokens)
    for unroll in (False, True):
        p, c = jax.tree.map(jnp.array, params), config
        if unroll:
            p, c = model_lib.unstack_params(p, c)
        p, c = model_lib.out_major_weights(p, c)
        assert c.out_major_weights
        layer = p["layers"][0] if unroll else p["layers"]
        assert layer["attention"]["wq"].shape[-1] == config.dim  # [(L,) N, H, D]: the input axis last
        np.testing.assert_allclose(model_lib.forward(p, c, few), ref_few, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(model_lib.forward(p, c, many), ref_many, atol=1e-5, rtol=1e-5)
        if unroll:  # and fused (model.fuse_projections, the CPU layout load_model gives): the rows joined
            rows = lambda g, *ks: np.concatenate([np.asarray(layer[g][k]).reshape(-1, config.dim) for k in ks])  # noqa
            want_qkv, want_13 = rows("attention", "wq", "wk", "wv"), rows("feed_forward", "w1", "w3")
            p, c = model_lib.fuse_projections(p, c)
            assert c.fused_projections and "wq" not in p["layers"][0]["attention"]
            np.testing.assert_array_equal(p["layers"][0]["attention"]["wqkv"], want_qkv)
            np.testing.assert_array_equal(p["layers"][0]["feed_forward"]["w13"], want_13)
            np.testing.assert_allclose(model_lib.forward(p, c, few), ref_few, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(model_lib.forward(p, c, many), ref_many, atol=1e-5, rtol=1e-5)
            with pytest.raises(ValueError, match=r"one fused wqkv.*fused_projections is False"):
                model_lib.apply(p, c.replace(fused_projections=False), few)


def test_weights_in_the_wrong_layout_for_the_config_are_named():
    """Params and config that disagree on the weight layout fail with the tensor and the remedy named."""
    import jax.numpy as jnp

    from mistral_jax import model as model_lib
    from mistral_jax.config import get_preset

    config = get_preset("tiny")
    params = model_lib.init_params(config, jax.random.key(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    want = r"\[in, out\].*layers\.attention\.wq \(2, 64, 4, 16\).*out_major_weights is True"
    with pytest.raises(ValueError, match=want):
        model_lib.apply(params, config.replace(out_major_weights=True), tokens)
    moved, out_config = model_lib.out_major_weights(jax.tree.map(jnp.array, params), config)
    with pytest.raises(ValueError, match=r"\[out, in\].*out_major_weights is False"):
        model_lib.apply(moved, config, tokens)
    model_lib.apply(moved, out_config, tokens)  # agreeing: runs
