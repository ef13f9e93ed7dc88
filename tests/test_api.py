"""api.Mistral for experiments and PEFT adapters in: forward (logits, hidden states, attention weights) against
transformers, logprobs against infer.score, adapter= / --adapter against transformers + peft, and --no-check."""

import copy
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from hf_models import hf_logits, make_hf_model, make_peft

from infer import convert as convert_cli
from infer import generate as generate_cli
from infer import score as score_cli
from mistral_jax import api, launch


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(transformers model, its directory): 2 layers, window 5."""
    model, _, _ = make_hf_model(4, sliding_window=5)
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    return model, d


@pytest.fixture(scope="module")
def m(hf):
    return api.Mistral.load(hf[1])


def _rows(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def _hf_outputs(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True, use_cache=False)
    return (
        out.logits[0].double().numpy(),
        np.stack([h[0].double().numpy() for h in out.hidden_states]),
        [a[0].double().numpy() for a in out.attentions],
    )


def test_forward_gives_transformers_logits_hidden_states_and_attention(hf, m):
    model, _ = hf
    rows = _rows(m.config.vocab_size, [11, 3, 20])  # past the window of 5; two length buckets' worth of padding
    outs = m.forward(rows, hidden_states=True, attention_layers=[0, 1])
    assert len(outs) == 3
    for ids, out in zip(rows, outs):
        logits, hidden, attentions = _hf_outputs(model, ids)
        assert out.ids == ids
        np.testing.assert_allclose(out.logits, logits, atol=1e-4, rtol=0)
        assert out.hidden_states.shape == (m.config.n_layers + 1, len(ids), m.config.dim)
        np.testing.assert_allclose(out.hidden_states, hidden, atol=1e-4, rtol=0)
        assert sorted(out.attentions) == [0, 1]
        for layer in (0, 1):
            assert out.attentions[layer].shape == (m.config.n_heads, len(ids), len(ids))
            np.testing.assert_allclose(out.attentions[layer], attentions[layer], atol=1e-5, rtol=0)
        # The window: no query attends a key 5 or more positions back.
        t = np.arange(len(ids))
        assert (out.attentions[0][:, (t[:, None] - t[None, :]) >= 5] == 0).all()
    # One prompt in, one result out; without asking, only the logits.
    one = m.forward(rows[0])
    assert one.hidden_states is None and one.attentions == {}
    np.testing.assert_allclose(one.logits, outs[0].logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(m.forward(np.array(rows[0])).logits, one.logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention layer 2 is not one of the model's layers 0..1"):
        m.forward(rows[0], attention_layers=[2])
    with pytest.raises(ValueError, match="prompt 1: .*vocab"):
        m.forward([rows[0], [1, m.config.vocab_size]])


def test_forward_compiles_once_per_bucket(m):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: (
            compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    v = m.config.vocab_size
    m.forward(_rows(v, [9, 12]), hidden_states=True)
    before = len(compiles)
    for lengths in ([10, 13], [16, 2], [5, 7]):  # every length in the first bucket (16), two rows a batch
        m.forward(_rows(v, lengths, seed=len(lengths) + lengths[0]), hidden_states=True)
    assert len(compiles) == before
    m.forward(_rows(v, [20, 3]), hidden_states=True)  # the next bucket (24): its own program
    assert len(compiles) > before


def test_logprobs_are_infer_scores_numbers(hf, m, tmp_path):
    model, d = hf
    rows = _rows(m.config.vocab_size, [30, 2, 17, 9])
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "ids": r}) + "\n" for i, r in enumerate(rows)))
    assert score_cli.main(["--checkpoint", str(d), "--input", str(inp), "--output", str(out)]) == 0
    scored = [json.loads(x)["token_logprobs"] for x in out.read_text().splitlines()]
    ours = m.logprobs(rows)
    for lp, want, ids in zip(ours, scored, rows):
        assert lp.shape == (len(ids) - 1,)
        np.testing.assert_array_equal(lp, np.array(want, np.float32))
        logits = hf_logits(model, [ids])[0]
        ref = torch.log_softmax(torch.tensor(logits), -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        np.testing.assert_allclose(lp, ref.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(m.logprobs(rows[0]), ours[0])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        m.logprobs([rows[0], [5]])


# ---- PEFT adapters in ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    peft_model = make_peft(hf[0], out, seed=3)
    return peft_model, out


def test_adapter_generation_equals_peft_greedy(hf, adapter, tmp_path):
    peft_model, out = adapter
    m = api.Mistral.load(hf[1], adapter=out, batch_size=2)
    prompts = [list(range(5, 17)), list(range(30, 35)), [7, 8, 9, 10, 11, 40, 41]]
    n_new = 12  # with the prompts, past the window of 5
    want = []
    for p in prompts:
        with torch.no_grad():
            mask = torch.ones(1, len(p), dtype=torch.long)
            ids = peft_model.generate(
                input_ids=torch.tensor([p]),
                attention_mask=mask,
                max_new_tokens=n_new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        want.append(ids[0, len(p) :].tolist())
    got = m.generate(prompts, max_new_tokens=n_new, stop_token_ids=())
    assert [c.ids for c in got] == want
    # The same through the batch tool.
    inp, res = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt_ids": p}) + "\n" for i, p in enumerate(prompts)))
    assert (
        generate_cli.main(
            [
                "--checkpoint",
                str(hf[1]),
                "--adapter",
                str(out),
                "--input",
                str(inp),
                "--output",
                str(res),
                "--max-new-tokens",
                str(n_new),
                "--ignore-eos",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert [json.loads(x)["completion_ids"] for x in res.read_text().splitlines()] == want
    # The adapter moves the model: the base alone gives other tokens.
    base = api.Mistral.load(hf[1], batch_size=2)
    assert [c.ids for c in base.generate(prompts, max_new_tokens=n_new, stop_token_ids=())] != want


def test_score_tool_with_adapter_gives_peft_logprobs(hf, adapter, tmp_path):
    peft_model, out = adapter
    rows = _rows(hf[0].config.vocab_size, [14, 6])
    inp, res = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "ids": r}) + "\n" for i, r in enumerate(rows)))
    assert (
        score_cli.main(["--checkpoint", str(hf[1]), "--adapter", str(out), "--input", str(inp), "--output", str(res)])
        == 0
    )
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert str(out) in json.dumps(manifest)
    for line, ids in zip(res.read_text().splitlines(), rows):
        logits = torch.tensor(hf_logits(peft_model, [ids])[0])
        want = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(json.loads(line)["token_logprobs"], want, atol=1e-4, rtol=0)


def test_convert_with_adapter_writes_the_merged_model(hf, adapter, tmp_path, capsys):
    from transformers import MistralForCausalLM

    peft_model, out = adapter
    dst = tmp_path / "merged"
    assert convert_cli.main(["--src", str(hf[1]), "--adapter", str(out), "--dst", str(dst), "--to", "hf"]) == 0
    assert "merged" in capsys.readouterr().out
    merged = MistralForCausalLM.from_pretrained(dst, torch_dtype=torch.float32).eval()
    toks = np.array(_rows(hf[0].config.vocab_size, [19, 19], seed=5))
    theirs = hf_logits(copy.deepcopy(peft_model).merge_and_unload(), toks)
    np.testing.assert_allclose(hf_logits(merged, toks), theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(hf_logits(peft_model, toks), theirs, atol=1e-4, rtol=0)
    # Into ours, then loaded: the same model.
    assert convert_cli.main(["--src", str(hf[1]), "--adapter", str(out), "--dst", str(tmp_path / "ours")]) == 0
    ours = api.Mistral.load(tmp_path / "ours").forward([list(r) for r in toks])
    np.testing.assert_allclose(np.stack([o.logits for o in ours]), theirs, atol=1e-4, rtol=0)


def test_a_wrong_adapter_is_one_line_before_any_work(hf, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 0, "ids": [1, 2, 3]}) + "\n")
    argv = [
        "--checkpoint",
        str(hf[1]),
        "--adapter",
        str(hf[1]),
        "--input",
        str(inp),
        "--output",
        str(tmp_path / "out.jsonl"),
    ]
    assert launch.run_tool(score_cli.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a PEFT adapter directory" in err and "\n" not in err
    assert not (tmp_path / "out.jsonl").exists()
    assert convert_cli.main(["--src", str(hf[1]), "--adapter", str(hf[1]), "--dst", str(tmp_path / "c")]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


# ---- --no-check ---------------------------------------------------------------------------------------------------
def test_no_check_loads_a_checkpoint_with_a_nan_weight(hf, tmp_path, capsys):
    model, d = hf
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = safetensors.numpy.load_file(str(bad / "model.safetensors"))
    name = "model.embed_tokens.weight"
    tensors[name][100, 3] = np.nan  # the row of a token the input never holds: the scores stay finite
    safetensors.numpy.save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rows = _rows(model.config.vocab_size - 1, [12, 7])
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "ids": r}) + "\n" for i, r in enumerate(rows)))
    argv = ["--checkpoint", str(bad), "--input", str(inp), "--output", str(tmp_path / "out.jsonl")]
    assert launch.run_tool(score_cli.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and name in err and "NaN" in err
    assert launch.run_tool(score_cli.main, [*argv, "--no-check"]) == 0
    res = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    for r, ids in zip(res, rows):
        logits = torch.tensor(hf_logits(model, [ids])[0])
        want = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(r["token_logprobs"], want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=name):
        api.load_model(bad)
    assert np.isnan(np.asarray(api.load_model(bad, check_finite=False).params["tok_embeddings"]["embedding"])).any()
