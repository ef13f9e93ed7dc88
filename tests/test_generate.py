"""decode.py, programs.py, generator.py and infer.generate: batched greedy generation against transformers, the
rolling buffer, sampling reproducibility, compile counts, stop conditions, streaming, and the resumable job."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import torch
from hf_models import make_hf_model

from mistral_jax import checkpoint, programs, tuning
from mistral_jax.config import Numerics
from mistral_jax.decode import DecodeState
from mistral_jax.generator import Generator, SamplingParams

NUM = Numerics()


ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(tmp_path, **overrides):
    model, cfg, _ = make_hf_model(0, linear_std=0.1, **overrides)
    model.save_pretrained(tmp_path / "hf")
    config = checkpoint.load_config(tmp_path / "hf")
    return model, config, checkpoint.load_params(tmp_path / "hf", config)


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def _prompts(vocab, lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("window,layout", [(5, "stacked"), (None, "stacked"), (5, "tuned")])
def test_batched_greedy_matches_transformers_one_at_a_time(tmp_path, window, layout):
    """layout "stacked": the training layout; "tuned": what load_model gives (tuning.for_inference: per-layer
    params and out-major projections on one CPU device)."""
    model, config, params = _load(tmp_path, sliding_window=window)
    if layout == "tuned":
        from mistral_jax import api

        loaded = api.load_model(tmp_path / "hf")
        config, params = loaded.config, loaded.params
        assert isinstance(params["layers"], tuning.PerLayer)
    prompts = _prompts(config.vocab_size, [3, 17, 9, 30, 1])  # 30 > prefill chunk: chunked prefill
    gen = Generator(params, config, NUM, batch_size=4, prefill_chunk=8)  # 5 prompts: two batches, one partial
    batches = []
    outs = gen.generate(
        prompts,
        SamplingParams(max_new_tokens=40, stop_token_ids=()),  # 40 >> window 5
        on_batch=lambda idx, comps: batches.append(list(idx)),
    )
    assert batches == [[4, 0, 2, 1], [3]]  # batched shortest first; results still in the order given
    for p, o in zip(prompts, outs):
        assert o.ids == _hf_greedy(model, p, 40)
        assert o.finish_reason == "length" and o.prompt_tokens == len(p) and o.completion_tokens == 40


def test_batch_of_one_on_the_tuned_layout_matches_transformers(tmp_path):
    from mistral_jax import api

    model, _, _ = _load(tmp_path, sliding_window=5)
    loaded = api.load_model(tmp_path / "hf")
    assert isinstance(loaded.params["layers"], tuning.PerLayer)
    prompts = _prompts(loaded.config.vocab_size, [3, 12])
    outs = api.Mistral(loaded, batch_size=1, prefill_chunk=8).generator.generate(
        prompts, SamplingParams(max_new_tokens=30, stop_token_ids=())
    )
    for p, o in zip(prompts, outs):
        assert o.ids == _hf_greedy(model, p, 30)


def test_rolling_buffer_equals_full_cache_and_stays_at_window(tmp_path):
    _, config, params = _load(tmp_path, sliding_window=6)
    prompts = _prompts(config.vocab_size, [25, 4, 11])
    sp = SamplingParams(max_new_tokens=50, stop_token_ids=())
    rolling = Generator(params, config, NUM, batch_size=3, prefill_chunk=8)
    full = Generator(params, config, NUM, batch_size=3, prefill_chunk=8, cache_slots=32 + 64)
    a, b = rolling.generate(prompts, sp), full.generate(prompts, sp)
    assert [x.ids for x in a] == [x.ids for x in b]
    assert rolling.last_cache_shape[3] == 6  # [L, B, K, S, H]: W slots however long the generation
    assert full.last_cache_shape[3] == 96


def test_fixed_seed_reproduces_across_batch_sizes(tmp_path):
    _, config, params = _load(tmp_path, sliding_window=8)
    target = _prompts(config.vocab_size, [12], seed=5)[0]
    others = _prompts(config.vocab_size, [3, 20, 7, 9, 14], seed=6)
    sp = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.9, seed=1234, stop_token_ids=())
    alone = Generator(params, config, NUM, batch_size=1).generate([target], sp)[0].ids
    batch = others[:2] + [target] + others[2:]
    mixed = Generator(params, config, NUM, batch_size=6).generate(
        batch,
        [SamplingParams(max_new_tokens=24, temperature=0.7, seed=i, stop_token_ids=()) for i in range(2)]
        + [sp]
        + [SamplingParams(max_new_tokens=24, seed=9, stop_token_ids=())] * 3,
    )
    assert mixed[2].ids == alone
    again = Generator(params, config, NUM, batch_size=1).generate([target], sp)[0].ids
    assert again == alone
    other_seed = (
        Generator(params, config, NUM, batch_size=1)
        .generate(
            [target],
            SamplingParams(max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.9, seed=99, stop_token_ids=()),
        )[0]
        .ids
    )
    assert other_seed != alone


def test_low_temperature_equals_greedy(tmp_path):
    _, config, params = _load(tmp_path, sliding_window=8)
    prompts = _prompts(config.vocab_size, [6, 13])
    gen = Generator(params, config, NUM, batch_size=2)
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=20, stop_token_ids=()))
    cold = gen.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1e-5, seed=3, stop_token_ids=()))
    assert [g.ids for g in greedy] == [c.ids for c in cold]


def test_compilations_for_many_prompts_are_a_handful(tmp_path):
    _, config, params = _load(tmp_path, sliding_window=8)
    compiles = []
    backend = "/jax/core/compile/backend_compile_duration"
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == backend else None
    )
    rng = np.random.default_rng(0)
    prompts = _prompts(config.vocab_size, rng.integers(1, 120, 50).tolist())
    gen = Generator(params, config, NUM, batch_size=8, prefill_chunk=64)
    before, decode_before, prefill_before = len(compiles), programs.count("decode"), programs.count("prefill")
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=8, stop_token_ids=()))
    n = len(compiles) - before
    assert len(outs) == 50 and all(o.completion_tokens == 8 for o in outs)
    # one decode program for every prompt bucket (none at all if an earlier test compiled the same one)
    assert programs.count("decode") - decode_before <= 1
    assert programs.count("prefill") - prefill_before <= 7  # at most one per prompt bucket, 16..128
    # The same prompts again, and other prompts of the same buckets: nothing compiles.
    before, counted = len(compiles), programs.count()
    gen.generate(prompts[::-1], SamplingParams(max_new_tokens=8, stop_token_ids=()))
    gen.generate(
        _prompts(config.vocab_size, [len(p) for p in prompts[:16]], seed=2),
        SamplingParams(max_new_tokens=7, stop_token_ids=()),
    )
    assert programs.count() == counted and len(compiles) == before
    # Prompt buckets 16..128 give at most 7 prefill programs, one decode program (its cache is sized by a
    # power of two at most the window, the same for every bucket here), plus the cache initialisation: a
    # handful, never one per prompt or per bucket.
    assert 2 <= n <= 10, n


def test_stop_tokens_per_row_limits_and_reasons(tmp_path):
    model, config, params = _load(tmp_path, sliding_window=8)
    prompts = _prompts(config.vocab_size, [5, 9])
    ref = [_hf_greedy(model, p, 20) for p in prompts]
    stop = ref[0][6]  # the 7th greedy token of row 0 becomes a stop token
    first = ref[0].index(stop)
    gen = Generator(params, config, NUM, batch_size=2)
    outs = gen.generate(
        prompts,
        [
            SamplingParams(max_new_tokens=20, stop_token_ids=(stop,)),
            SamplingParams(max_new_tokens=7, stop_token_ids=()),
        ],
    )
    assert outs[0].ids == ref[0][:first] and outs[0].finish_reason == "stop"
    assert outs[1].ids == ref[1][:7] and outs[1].finish_reason == "length"


@pytest.fixture()
def tok_model(tmp_path, v1_tokenizer_path):
    model, _, _ = make_hf_model(
        4, vocab_size=32000, hidden_size=32, intermediate_size=48, head_dim=8, sliding_window=8, linear_std=0.1
    )
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
    needle = full.text[len(full.text) // 2 :][:3]
    cut = m.generate("Hello world", max_new_tokens=30, stop_token_ids=(), stop_strings=(needle,))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(needle)]
    assert needle in m.tokenizer.decode(cut.ids) and cut.ids == full.ids[: len(cut.ids)]


def test_a_second_run_takes_its_programs_from_the_compilation_cache(tmp_path):
    """With JAX's persistent compilation cache on (api.enable_compilation_cache), a second process finds the
    prefill and decode programs there instead of compiling them, and generates the same tokens."""
    import subprocess
    import sys
    import textwrap

    model, config, _ = _load(tmp_path, sliding_window=8)
    prompts = _prompts(config.vocab_size, [5, 17, 40])
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import jax
        from mistral_jax import api, programs
        hits = [0]
        jax.monitoring.register_event_listener(
            lambda event, **kw: hits.__setitem__(0, hits[0] + (event == "/jax/compilation_cache/cache_hits")))
        api.enable_compilation_cache({str(tmp_path / "xla")!r})
        m = api.Mistral(api.load_model({str(tmp_path / "hf")!r}), batch_size=2)
        outs = m.generate({prompts!r}, max_new_tokens=12, stop_token_ids=())
        print(json.dumps({{"ids": [o.ids for o in outs], "programs": programs.count(), "hits": hits[0]}}))
    """)

    def run():
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = run()
    assert first["ids"] == [_hf_greedy(model, p, 12) for p in prompts]
    assert first["programs"] == 3  # prefill buckets 24 and 48 (two batches), one decode
    second = run()
    assert second["ids"] == first["ids"] and second["programs"] == 3
    assert second["hits"] >= 3 and second["hits"] > first["hits"]


def test_generate_job_resumes_and_reports_bad_rows(tok_model, tmp_path, monkeypatch):
    from infer import generate as gen_cli
    from mistral_jax.tokenizer import Tokenizer

    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "xla"))
    model, path = tok_model
    rows = [json.dumps({"id": f"p{i}", "prompt": f"Story number {i}:"}) for i in range(5)]
    rows += [
        "{broken",
        json.dumps({"id": "m", "messages": [{"role": "user", "content": "Hi there"}]}),
        json.dumps({"id": "ids", "prompt_ids": [1, 300, 400]}),
        json.dumps({"id": "oov", "prompt_ids": [1, 32000]}),
        json.dumps({"id": "none", "text": "x"}),
        json.dumps({"id": "badmsg", "messages": [{"role": "bot", "content": "x"}]}),
        json.dumps({"id": "long", "prompt_ids": [1] + [300] * 512}),
    ]  # 513 tokens, the context is 512
    rows += [json.dumps({"id": f"q{i}", "prompt": f"Another {i}"}) for i in range(4)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(rows) + "\n")
    args = ["--checkpoint", str(path), "--input", str(inp), "--max-new-tokens", "6", "--batch-size", "3"]
    full_out = tmp_path / "full.jsonl"
    assert gen_cli.main(args + ["--output", str(full_out)]) == 0
    full = [json.loads(x) for x in full_out.read_text().splitlines()]
    ids = [r["id"] for r in full]
    assert ids == ["p0", "p1", "p2", "p3", "p4", 6, "m", "ids", "oov", "none", "badmsg", "long", "q0", "q1", "q2", "q3"]
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
    shutil.copy(f"{full_out}.manifest.json", f"{out}.manifest.json")  # the same job's output
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
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "infer.generate",
                "--checkpoint",
                str(tmp_path / "hf"),
                "--input",
                str(inp),
                "--output",
                str(out),
                "--max-new-tokens",
                "7",
                "--batch-size",
                "2",
                "--ignore-eos",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "MISTRAL_JAX_CACHE": str(tmp_path / "xla")},
        )
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
    outs = Generator(params, config, NUM, batch_size=2).generate(
        prompts, SamplingParams(max_new_tokens=10, stop_token_ids=())
    )
    assert outs[0].ids == [] and outs[0].finish_reason == "length"
    assert outs[1].ids == _hf_greedy(model, prompts[1], 2) and outs[1].finish_reason == "length"


def _tuned(tmp_path):
    """(config, params, mesh) as load_model gives them: per-layer params on one CPU device."""
    from mistral_jax import api

    make_hf_model(0, sliding_window=8)[0].save_pretrained(tmp_path / "hf")
    loaded = api.load_model(tmp_path / "hf")
    assert isinstance(loaded.params["layers"], tuning.PerLayer)
    return loaded.config, loaded.params, loaded.mesh


def _compiled_prefills(config, params, mesh):
    """(t, chunk, compiled prefill) for a batch of 2 prompts of t tokens: in one chunk, and in several."""
    import jax.numpy as jnp

    b = 2
    for t, chunk in [(16, 16), (32, 8)]:
        pre = programs.prefill_program(config, NUM, chunk, mesh)
        with mesh.activate():
            yield (
                t,
                chunk,
                pre.lower(
                    params, jnp.zeros((b, t), jnp.int32), jnp.full((b,), t, jnp.int32), mesh.cache(b, 8)
                ).compile(),
            )


@pytest.mark.parametrize("b,sampled,final", [(3, True, True), (3, False, True), (1, False, True), (1, False, False)])
def test_decode_program_updates_the_cache_in_place_and_copies_no_weight(tmp_path, b, sampled, final):
    """The compiled decode loop, as the tools run it (load_model's params), holds no copy or transpose of a
    KV-cache buffer or of a weight: each step writes the cache in place and reads every weight as stored."""
    import re

    import jax.numpy as jnp

    config, params, mesh = _tuned(tmp_path)
    slots, m = 8, 16
    state = DecodeState.greedy(mesh.cache(b, slots), jnp.zeros((b, config.vocab_size), jnp.float32), 5, m, m)
    state.check(config)
    dec = programs.decode_program(config, NUM, mesh)
    with mesh.activate():
        hlo = dec.lower(params, state, jnp.int32(m), sampled=sampled, final=final).compile().as_text()

    def shape(x):
        return f"f32[{','.join(map(str, x.shape))}]"

    guarded = {shape(state.cache.k)}
    guarded |= {shape(x) for x in jax.tree.leaves(params) if x.ndim >= 2 and x.shape[0] != config.vocab_size}
    copies = [
        line.strip()[:160]
        for line in hlo.splitlines()
        if (mt := re.match(r"\s*(?:ROOT )?%([\w.-]+) = (f32\[[\d,]*\])\{[\d,]*\} (\w+)\(", line))
        and mt.group(2) in guarded
        and (
            mt.group(3) in ("copy", "transpose")
            or (mt.group(3) == "fusion" and re.search(r"copy|transpose", mt.group(1)))
        )
    ]
    assert not copies, "\n".join(copies)
    assert "dot(" in hlo or "fusion" in hlo  # the program was inspected, not an empty text


def test_a_final_decode_call_does_not_feed_its_last_token(tmp_path):
    """decode(final=True), the single call of a batch that the tools make when nothing is checked on the host
    between calls, picks the same tokens as the general loop (final=False) but runs the model one step fewer:
    the logits it returns are those its last token was picked from, which the general loop returns when
    stopped one step short; with the extra forward they would be the general loop's own. Rows of different
    prompt lengths and token limits."""
    import jax.numpy as jnp

    config, params, mesh = _tuned(tmp_path)
    b, t, m = 3, 8, 6
    lengths = np.array([8, 5, 3], np.int32)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(_prompts(config.vocab_size, lengths)):
        tokens[i, : len(p)] = p
    pre, dec = programs.prefill_program(config, NUM, t, mesh), programs.decode_program(config, NUM, mesh)

    def run(steps, final):
        with mesh.activate():
            logits, cache = pre(params, *mesh.place(tokens, lengths), mesh.cache(b, 16))
            state = DecodeState.greedy(cache, logits, lengths, [m, m, 4], m)
            return jax.device_get(dec(params, state, jnp.int32(steps), sampled=False, final=final))

    general, short, final = run(m, False), run(m - 1, False), run(m, True)
    for key in ("out", "n", "done", "reason"):
        np.testing.assert_array_equal(getattr(final, key), getattr(general, key), err_msg=key)
    assert general.n.tolist() == [m, m, 4] and general.done.all()
    np.testing.assert_array_equal(final.logits, short.logits)
    assert not np.array_equal(general.logits, short.logits)


def test_prefill_program_on_the_tuned_layout_holds_no_copy_of_the_weights(tmp_path):
    """Prefill with per-layer params (what load_model gives on one CPU device) reads the weights where they
    lie: the compiled program's temporary memory stays well under the weights' size, for one chunk and for
    several (stacking the layers inside the program would copy every weight at every call)."""
    config, params, mesh = _tuned(tmp_path)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))
    for t, chunk, compiled in _compiled_prefills(config, params, mesh):
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < layer_bytes / 2, (t, chunk, temp, layer_bytes)
