"""Tests for mistral_jax.data, against independent references: mistral-common's own encoding and plain decoding
for the loss mask, the model run on each example alone for packing."""

import json

import jax
import numpy as np
import pytest
from chats import asst, sys_, user
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_jax.config import Numerics, get_preset
from mistral_jax.data import KEYS, DataIterator, Example, load_examples, pack
from mistral_jax.model import forward
from mistral_jax.params import param_shapes
from mistral_jax.tokenizer import Tokenizer

CONVERSATIONS = [
    [user("What is 2+2?"), asst("4")],
    [sys_("You are terse."), user("Capital of France?"), asst("Paris."), user("And of Italy?"), asst("Rome.")],
    [user("Hi"), asst("Hello!"), user("Tell me a joke"), asst("No.  "), user("Why not?")],  # trailing user turn
    [user("Ça va? 日本語"), asst("Très bien ! 元気です 👍\nsecond line")],
    [user("Count"), asst("one"), asst("two")],  # consecutive assistant messages merge into one turn
]


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module", params=["v1", "v3"])
def version(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer_paths(v1_tokenizer_path, v3_tokenizer_path):
    return {"v1": v1_tokenizer_path, "v3": v3_tokenizer_path}


def mistral_common_encode(path, messages):
    """mistral-common's tokens; its finetuning mode accepts a trailing assistant turn, test mode a trailing user."""
    mode = ValidationMode.finetuning if messages[-1]["role"] == "assistant" else ValidationMode.test
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[classes[m["role"]](content=m["content"]) for m in messages])
    return MistralTokenizer.from_file(path, mode=mode).encode_chat_completion(request).tokens


def segments(packed):
    """Yields (row, slice) for every packed example."""
    for r, seg in enumerate(packed["segment_ids"]):
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert idx[-1] - idx[0] + 1 == len(idx), "an example's tokens must be contiguous"
            yield r, slice(idx[0], idx[-1] + 1)


def runs(flags):
    """Maximal runs of True in a 1-D bool array, as slices."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return [slice(a, b) for a, b in zip(edges[::2], edges[1::2])]


def test_loss_mask_is_assistant_content_and_eos(tmp_path, version, tokenizer_paths):
    tok = Tokenizer.from_file(tokenizer_paths[version])
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    examples, report = load_examples(path, tok, seq_len=64)
    assert report.kept == len(CONVERSATIONS) and not report.bad
    packed = pack(examples, seq_len=64)
    assert packed["tokens"].shape[0] < len(CONVERSATIONS), "several examples should share a row"
    by_tokens = {tuple(ex.ids): (ex, CONVERSATIONS[ex.line - 1]) for ex in examples}

    seen = 0
    for r, sl in segments(packed):
        tokens, targets, loss = (packed[k][r, sl] for k in ("tokens", "targets", "loss_mask"))
        ex, conv = by_tokens[tuple(tokens.tolist())]
        seen += 1
        np.testing.assert_array_equal(packed["positions"][r, sl], np.arange(len(tokens)))
        np.testing.assert_array_equal(targets[:-1], tokens[1:])
        # Mapped back: the loss mask is the tokenizer's chat mask shifted by one, and 0 on the last token.
        np.testing.assert_array_equal(loss, np.array(ex.mask[1:] + [False], np.float32))

        # Independently: each run of loss-carrying targets is one assistant turn's text plus EOS ...
        trimmed = conv[: max(i for i, m in enumerate(conv) if m["role"] == "assistant") + 1]
        turns = []  # assistant turns after merging consecutive assistant messages, as the chat format does
        for prev, m in zip([None] + trimmed, trimmed):
            if m["role"] == "assistant":
                if prev is not None and prev["role"] == "assistant":
                    turns[-1] += "\n\n" + m["content"]
                else:
                    turns.append(m["content"])
        spans = [targets[s] for s in runs(loss > 0)]
        assert len(spans) == len(turns)
        for span, text in zip(spans, turns):
            assert span[-1] == tok.eos_id
            expected = text if version == "v1" else text.rstrip(" ")  # v2/v3 strip trailing spaces
            assert tok.decode(span[:-1]) == expected

        # ... and exactly what mistral-common adds when the conversation grows by that assistant turn. (Only
        # without a system prompt: v3 attaches it to the LAST user turn, so prefixes encode it elsewhere.)
        if not any(m["role"] == "system" for m in conv):
            cuts = [
                i
                for i, m in enumerate(trimmed)
                if m["role"] == "assistant" and (i + 1 == len(trimmed) or trimmed[i + 1]["role"] != "assistant")
            ]
            starts = [max(j for j in range(i + 1) if trimmed[j]["role"] == "user") + 1 for i in cuts]
            for span, start, cut in zip(spans, starts, cuts):
                before = mistral_common_encode(tokenizer_paths[version], trimmed[:start])
                after = mistral_common_encode(tokenizer_paths[version], trimmed[: cut + 1])
                assert after[: len(before)] == before
                assert span.tolist() == after[len(before) :]
    assert seen == len(examples)

    # Padding and example boundaries carry no loss.
    assert not packed["loss_mask"][packed["segment_ids"] == 0].any()
    for r, sl in segments(packed):
        assert packed["loss_mask"][r, sl.stop - 1] == 0


def random_params(config, seed=0):
    """Random params in the model's shapes. Drawn with numpy: init_params runs eagerly and takes ~10-20 s on
    two CPU cores. std 0.05 (not 0.02) so attention to a wrong token moves the logits far beyond atol."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if "scale" in jax.tree_util.keystr(path):  # RMSNorm scales start at 1
            return np.ones(leaf.shape, leaf.dtype)
        return rng.normal(0, 0.05, leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(lambda p, leaf: jax.numpy.asarray(draw(p, leaf)), param_shapes(config))


def test_packed_logits_equal_each_example_alone():
    # Window 4 with examples up to 12 tokens: the window, not only the segment mask, shapes attention.
    config = get_preset("tiny", sliding_window=4, vocab_size=1000)
    numerics = Numerics(attention_block=8)
    params = random_params(config)
    rng = np.random.default_rng(0)
    lengths = [12, 3, 7, 9, 5, 6, 1]
    examples = [
        Example(i + 1, rng.integers(3, config.vocab_size, n).tolist(), [True] * n) for i, n in enumerate(lengths)
    ]
    packed = pack(examples, seq_len=16)
    assert packed["tokens"].shape[0] < len(examples)
    assert (packed["segment_ids"] > 0).sum() == sum(lengths)

    logits = forward(
        params, packed["tokens"], packed["positions"], packed["segment_ids"], config=config, numerics=numerics
    )
    # Each example alone: a row of its own from position 0, one segment (the defaults). Attention is causal,
    # so the filler after a short example cannot reach its logits, and one batch serves every lone run (one
    # compile instead of one per length).
    lone = np.full((len(examples), max(lengths)), 7, np.int32)
    for i, ex in enumerate(examples):
        lone[i, : len(ex.ids)] = ex.ids
    lone_logits = forward(params, lone, config=config, numerics=numerics)
    alone = {tuple(ex.ids): lone_logits[i, : len(ex.ids)] for i, ex in enumerate(examples)}
    seen = 0
    for r, sl in segments(packed):
        tokens = tuple(packed["tokens"][r, sl].tolist())
        np.testing.assert_array_equal(packed["positions"][r, sl], np.arange(len(tokens)))
        np.testing.assert_allclose(logits[r, sl], alone[tokens], atol=1e-5, rtol=0)
        seen += 1
    assert seen == len(examples)


def test_pack_is_deterministic_and_rejects_long_examples():
    examples = [Example(i, [1] * n, [False] * n) for i, n in enumerate([5, 2, 7, 3, 8, 1], 1)]
    a, b = pack(examples, 8), pack(list(examples), 8)
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["tokens"].dtype == np.int32 and a["loss_mask"].dtype == np.float32
    assert a["tokens"].shape == (4, 8)  # 26 tokens in 8-token rows: best-fit decreasing leaves no row to spare
    with pytest.raises(ValueError, match="line 9"):
        pack([Example(9, [1] * 9, [False] * 9)], 8)


def test_bad_rows_are_reported_with_line_numbers(tmp_path, v1_tokenizer_path):
    tok = Tokenizer.from_file(v1_tokenizer_path)
    good = {"messages": [user("Hi"), asst("Hello")]}
    lines = [
        good,  # 1
        '{"messages": [',  # 2 malformed JSON
        "[1, 2]",  # 3 not an object
        {"messages": [user("Only a question?")]},  # 4 no assistant turn
        {"messages": [user("Hi"), {"role": "bot", "content": "Hello"}]},  # 5 unknown role
        {"messages": [{"content": "no role"}, asst("Hello")]},  # 6 missing role
        {"messages": [user("Hi"), asst(42)]},  # 7 non-string content
        {"messages": [user(""), asst("Hello")]},  # 8 empty content
        {"messages": [user("word " * 100), asst("Hello")]},  # 9 too long
        {"messages": [user("a"), asst("b"), sys_("c"), user("d"), asst("e")]},  # 10 tokenizer refuses
        {"text": "plain text"},  # 11 neither format
        "",  # 12 blank: skipped, not counted
        {"prompt": "Hi", "completion": "Hello"},  # 13 good
        {"prompt": "Hi", "completion": None},  # 14 non-string completion
        {"messages": "Hi"},  # 15 messages not a list
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    examples, report = load_examples(path, tok, seq_len=32)
    expected = {
        2: "malformed JSON",
        3: "malformed JSON",
        4: "no assistant turn",
        5: "unknown role",
        6: "unknown role",
        7: "bad content",
        8: "bad content",
        9: "too long",
        10: "tokenizer error",
        11: "bad format",
        14: "bad content",
        15: "bad format",
    }
    assert {line: reason.split(":")[0] for line, reason in report.bad} == expected
    assert [line for line, _ in report.bad] == sorted(expected)
    assert (report.total, report.kept) == (14, 2)
    assert [ex.line for ex in examples] == [1, 13]
    summary = report.summary()
    assert "14 rows, 2 kept, 12 bad" in summary and "bad content: 3 (lines 7, 8, 14)" in summary

    with pytest.raises(ValueError, match="mixed.jsonl: 12 bad rows") as err:
        load_examples(path, tok, seq_len=32, on_bad="error")
    assert "lines 2, 3" in str(err.value)

    only_bad = write_jsonl(tmp_path / "all_bad.jsonl", lines[1:4])
    with pytest.raises(ValueError, match="all_bad.jsonl: no usable rows"):
        load_examples(only_bad, tok, seq_len=32)


def test_lone_surrogate_is_a_bad_row_naming_file_and_line(tmp_path, v1_tokenizer_path):
    """JSON's "\\ud800" escape reads as a lone surrogate, which the tokenizer cannot take: it was a crash of
    data validation without a line number, and is now a bad row of its line (issue 20)."""
    tok = Tokenizer.from_file(v1_tokenizer_path)
    path = tmp_path / "surrogate.jsonl"
    lines = [
        {"messages": [user("Hi"), asst("Hello")]},
        {"messages": [user("Hi \ud800 there"), asst("Hello")]},
        {"prompt": "Hi", "completion": "\udfff"},
        {"messages": [sys_("\ud83d"), user("Hi"), asst("Hello")]},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))  # ensure_ascii writes the \\u escapes
    assert "\\ud800" in path.read_text()
    examples, report = load_examples(str(path), tok, seq_len=64)
    assert [ex.line for ex in examples] == [1]
    assert [line for line, _ in report.bad] == [2, 3, 4]
    assert all(
        reason.startswith("bad content: ") and "not valid Unicode (lone surrogate" in reason for _, reason in report.bad
    ), report.bad
    assert "bad content: 3 (lines 2, 3, 4)" in report.summary()
    with pytest.raises(ValueError, match=r"surrogate\.jsonl: 3 bad rows") as err:
        load_examples(str(path), tok, seq_len=64, on_bad="error")
    assert "lines 2, 3, 4" in str(err.value)


def test_prompt_completion_equals_messages(tmp_path, version, tokenizer_paths):
    tok = Tokenizer.from_file(tokenizer_paths[version])
    pairs = [("What is 2+2?", "4"), ("Write a haiku", "Old pond\nfrog jumps in\nsplash")]
    a, _ = load_examples(
        write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in pairs]), tok, 64
    )
    b, _ = load_examples(
        write_jsonl(tmp_path / "m.jsonl", [{"messages": [user(p), asst(c)]} for p, c in pairs]), tok, 64
    )
    assert a == b


def identified_rows(n_rows, seq_len=4):
    """Packed-like arrays whose row r is all r+1 (segment ids too), so a batch tells which rows it holds."""
    ids = np.repeat(np.arange(1, n_rows + 1, dtype=np.int32)[:, None], seq_len, axis=1)
    return {
        "tokens": ids,
        "targets": ids,
        "loss_mask": np.ones(ids.shape, np.float32),
        "positions": np.zeros_like(ids),
        "segment_ids": ids,
    }


def take(it, n):
    return [next(it) for _ in range(n)]


def rows_of(batches):
    return [int(r) for b in batches for r in b["segment_ids"][:, 0] if r]


def test_iterator_epochs_cover_every_row_and_reshuffle():
    packed = identified_rows(10)
    it = DataIterator(packed, batch_size=4, seed=3)
    assert it.steps_per_epoch == 3
    epochs = [take(it, 3) for _ in range(3)]
    orders = [rows_of(e) for e in epochs]
    for order in orders:
        assert sorted(order) == list(range(1, 11))
    assert len({tuple(o) for o in orders}) == 3
    # The last batch of each epoch is padded: pad rows are all zeros, so they carry no loss and no segment.
    last = epochs[0][-1]
    assert last["tokens"].shape == (4, 4)
    assert not last["loss_mask"][2:].any() and not last["segment_ids"][2:].any()
    assert it.state() == {"epoch": 3, "index": 0, "seed": 3}

    assert rows_of(take(DataIterator(packed, 4, seed=3), 3)) == orders[0]
    assert rows_of(take(DataIterator(packed, 4, seed=4), 3)) != orders[0]
    assert rows_of(take(DataIterator(packed, 4, seed=3, shuffle=False), 3)) == list(range(1, 11))


@pytest.mark.parametrize("k", [0, 2, 3, 7])  # start, mid-epoch, an epoch boundary, a later epoch
def test_iterator_restore_continues_identically(k):
    packed = identified_rows(11)
    it = DataIterator(packed, batch_size=4, seed=0)
    take(it, k)
    state = json.loads(json.dumps(it.state()))  # what a checkpoint stores
    expected = take(it, 5)
    fresh = DataIterator(packed, batch_size=4, seed=123)  # the state's seed wins
    fresh.restore(state)
    for a, b in zip(take(fresh, 5), expected):
        for key in KEYS:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="index"):
        fresh.restore({"epoch": 0, "index": 99, "seed": 0})
