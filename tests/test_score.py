"""infer.score end to end against a live transformers MistralForCausalLM (float32, per-token log-probs)."""

import json
import math
import os

import numpy as np
import pytest
import safetensors.numpy
import torch
from hf_models import make_hf_model
from reference import hf_to_native

from infer import score as score_cli

# Each case: config overrides, row lengths. The first row lengths exceed the windows many times over,
# and one row is long enough (> attention_block + W) to take the blockwise attention path.
CASES = {
    "window-4": (dict(sliding_window=4), [40, 7, 300, 2]),
    "no-window": (dict(sliding_window=None), [33, 5, 64]),
    "gqa-head-dim-24": (
        dict(hidden_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=24, sliding_window=12),
        [50, 13, 290],
    ),
    "odd-vocab-mqa": (dict(vocab_size=97, num_key_value_heads=1, sliding_window=9), [45, 3, 27]),
    "tied": (dict(tie_word_embeddings=True, sliding_window=6), [30, 21]),
}


def _rows(lengths, vocab, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _hf_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return lp.numpy()


def _run_score(tmp_path, ckpt, rows, *extra):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "ids": r}) + "\n" for i, r in enumerate(rows)))
    assert (
        score_cli.main(
            ["--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out), "--batch-size", "2", *extra]
        )
        == 0
    )
    return [json.loads(x) for x in out.read_text().splitlines()]


def _check(results, model, rows):
    assert [r["id"] for r in results] == [f"r{i}" for i in range(len(rows))]
    for res, ids in zip(results, rows):
        want = _hf_logprobs(model, ids)
        got = np.array(res["token_logprobs"])
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert res["num_tokens"] == len(ids)
        assert res["nll"] == pytest.approx(-want.sum(), abs=1e-3)
        assert res["perplexity"] == pytest.approx(math.exp(-want.mean()), rel=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_score_matches_transformers(tmp_path, name):
    overrides, lengths = CASES[name]
    model, cfg, _ = make_hf_model(7, **overrides)
    model.save_pretrained(tmp_path / "hf")
    rows = _rows(lengths, cfg["vocab_size"], 1)
    _check(_run_score(tmp_path, tmp_path / "hf", rows), model, rows)


def test_score_sharded_safetensors(tmp_path):
    model, cfg, _ = make_hf_model(3, sliding_window=5)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 2
    rows = _rows([37, 12, 60], cfg["vocab_size"], 2)
    _check(_run_score(tmp_path, tmp_path / "hf", rows), model, rows)


@pytest.mark.parametrize("overrides", [dict(sliding_window=6), dict(sliding_window=None, head_dim=24)])
def test_score_mistral_native_format(tmp_path, overrides):
    # Native files are made with the oracle's own (independent) permutation to interleaved rotary.
    model, cfg, weights = make_hf_model(11, **overrides)
    native, params_json = hf_to_native(weights, cfg)
    os.makedirs(tmp_path / "native")
    safetensors.numpy.save_file(native, str(tmp_path / "native" / "consolidated.safetensors"))
    (tmp_path / "native" / "params.json").write_text(json.dumps(params_json))
    rows = _rows([44, 9, 70], cfg["vocab_size"], 3)
    _check(_run_score(tmp_path, tmp_path / "native", rows), model, rows)


def test_score_after_convert_to_orbax(tmp_path):
    from infer import convert as convert_cli

    model, cfg, _ = make_hf_model(5, sliding_window=7)
    model.save_pretrained(tmp_path / "hf")
    assert convert_cli.main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ours")]) == 0
    rows = _rows([50, 4], cfg["vocab_size"], 4)
    _check(_run_score(tmp_path, tmp_path / "ours", rows), model, rows)


def test_score_bad_rows_are_reported_and_the_job_goes_on(tmp_path, capsys):
    model, cfg, _ = make_hf_model(2, sliding_window=4, max_position_embeddings=64)
    model.save_pretrained(tmp_path / "hf")
    good = _rows([20, 9], cfg["vocab_size"], 5)
    lines = [
        json.dumps({"id": "a", "ids": good[0]}),
        "{not json",
        json.dumps({"id": "oov", "ids": [1, 5, cfg["vocab_size"]]}),
        json.dumps({"id": "long", "ids": [1] * 65}),
        json.dumps({"id": "text-no-tok", "text": "hello"}),
        json.dumps({"id": "neither"}),
        json.dumps({"id": "short", "ids": [1]}),
        json.dumps({"id": "b", "ids": good[1]}),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    assert score_cli.main(["--checkpoint", str(tmp_path / "hf"), "--input", str(inp), "--output", str(out)]) == 0
    res = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in res] == ["a", 2, "oov", "long", "text-no-tok", "neither", "short", "b"]
    errors = {r["id"]: r["error"] for r in res if "error" in r}
    assert "in.jsonl:2: not valid JSON" in errors[2]
    assert f"token id {cfg['vocab_size']} is outside the vocabulary" in errors["oov"]
    assert "65 tokens exceed the model's context of 64" in errors["long"]
    assert "needs a tokenizer" in errors["text-no-tok"]
    assert "neither 'text' nor 'ids'" in errors["neither"]
    assert "at least 2 tokens" in errors["short"]
    np.testing.assert_allclose(res[0]["token_logprobs"], _hf_logprobs(model, good[0]), atol=1e-4)
    np.testing.assert_allclose(res[-1]["token_logprobs"], _hf_logprobs(model, good[1]), atol=1e-4)
    assert "in.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_score_text_rows_with_tokenizer(tmp_path, v1_tokenizer_path):
    from mistral_jax.tokenizer import Tokenizer

    model, cfg, _ = make_hf_model(9, vocab_size=32000, hidden_size=32, intermediate_size=48, head_dim=8)
    model.save_pretrained(tmp_path / "hf")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    texts = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé and 日本語\nnew line"]
    inp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    assert (
        score_cli.main(
            [
                "--checkpoint",
                str(tmp_path / "hf"),
                "--input",
                str(inp),
                "--output",
                str(out),
                "--tokenizer",
                v1_tokenizer_path,
            ]
        )
        == 0
    )
    res = [json.loads(x) for x in out.read_text().splitlines()]
    tok = Tokenizer.from_file(v1_tokenizer_path)
    for r, t in zip(res, texts):
        ids = tok.encode(t, bos=True)
        assert ids[0] == 1
        np.testing.assert_allclose(r["token_logprobs"], _hf_logprobs(model, ids), atol=1e-4)
