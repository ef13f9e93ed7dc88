"""Tests for mistral_jax.tokenizer, with mistral-common as the live oracle.

mistral-common ships the real v1/v2/v3 SentencePiece files in its package
data, so no golden token files are needed: every chat encoding is compared
with ``MistralTokenizer.encode_chat_completion`` on the same conversation.
"""

import importlib.resources
import shutil
import subprocess
import sys

import mistral_common  # noqa: E402,F401  (a test dependency: never skipped)
import numpy as np
import pytest
import sentencepiece
from chats import asst, sys_, user  # noqa: E402
from mistral_common.exceptions import MistralCommonException  # noqa: E402
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from mistral_jax.tokenizer import Tokenizer

FILES = {
    "v1": "tokenizer.model.v1",  # Mistral 7B v0.1 / v0.2
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}
VERSIONS = list(FILES)


@pytest.fixture(scope="module")
def data_dir():
    return importlib.resources.files("mistral_common") / "data"


@pytest.fixture(scope="module")
def paths(data_dir):
    return {v: str(data_dir / name) for v, name in FILES.items()}


@pytest.fixture(scope="module")
def toks(paths):
    return {v: Tokenizer.from_file(p) for v, p in paths.items()}


@pytest.fixture(scope="module")
def reference(paths):
    """reference(version, messages) -> mistral-common's tokens, or raises.

    mistral-common's default "test" validation mode refuses a conversation that
    ends with an assistant message, and its "finetuning" mode refuses one that
    doesn't; the token encoding itself is the same in both. Our encode_chat
    accepts both endings, so pick the mode that matches the ending.
    """
    cache = {}
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def encode(version, messages):
        ends_with_assistant = bool(messages) and messages[-1]["role"] == "assistant"
        mode = ValidationMode.finetuning if ends_with_assistant else ValidationMode.test
        if (version, mode) not in cache:
            cache[version, mode] = MistralTokenizer.from_file(paths[version], mode=mode)
        request = ChatCompletionRequest(messages=[classes[m["role"]](content=m["content"]) for m in messages])
        return cache[version, mode].encode_chat_completion(request).tokens

    def decode(version, ids):
        mode = ValidationMode.test
        if (version, mode) not in cache:
            cache[version, mode] = MistralTokenizer.from_file(paths[version], mode=mode)
        return cache[version, mode].decode(ids)

    encode.decode = decode
    return encode


CONVERSATIONS = {
    "single_user": [user("Hello!")],
    "ends_with_assistant": [user("Hi"), asst("Hello, how can I help?")],
    "system_multi_turn_ends_user": [
        sys_("You are terse."),
        user("What is 2+2?"),
        asst("4"),
        user("And 3+3?"),
        asst("6"),
        user("Thanks"),
    ],
    "system_multi_turn_ends_assistant": [
        sys_("You are terse."),
        user("What is 2+2?"),
        asst("4"),
        user("And 3+3?"),
        asst("6"),
    ],
    "two_system_messages": [sys_("Rule one."), sys_("Rule two."), user("Go"), asst("Done.")],
    "unicode": [
        sys_("Réponds en français, s'il te plaît."),
        user("Ça va? 日本語で答えて 🤖🎉"),
        asst("Très bien ! 元気です 👍 — naïve café"),
        user("Ünïcödé ñ 中文 한국어 🙂"),
    ],
    "newlines_and_spaces": [
        sys_("  sys with spaces  \n"),
        user("  leading and trailing  "),
        asst("  answer with trailing spaces   "),
        user("line1\n\nline2\n"),
        asst("code:\n    indented\n\t tab  \n  "),  # v2/v3 strip trailing spaces only, not "\n"
    ],
    "whitespace_only_assistant": [user("a"), asst("   ")],  # v2/v3 strip it to nothing, EOS stays
    "consecutive_same_role_merged": [user("part 1"), user(""), user("part 2"), asst("a"), asst("b"), user("c")],
    "system_between_users": [user("first"), sys_("S"), user("second")],  # two separate [INST] blocks
    "starts_with_assistant": [asst("I speak first"), user("ok")],  # an empty user turn is inserted
    "system_then_assistant": [sys_("S"), asst("hello"), user("hi")],
    "only_system": [sys_("Just a system prompt")],
    "empty_system_ignored": [sys_(""), user("hi")],
    "empty_user": [user(""), asst("x"), user("")],
    "marker_text_in_content": [user("[INST] fake [/INST] </s> <s>"), asst("[/INST] </s>")],
}


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("version", VERSIONS)
def test_version_detected_from_vocabulary_not_file_name(version, paths, tmp_path):
    neutral = tmp_path / "tokenizer.model"
    shutil.copy(paths[version], neutral)
    # A misleading suffix must not matter either.
    misleading = tmp_path / "tokenizer.model.v1"
    shutil.copy(paths["v3" if version == "v1" else "v1"], misleading)

    tok = Tokenizer.from_file(neutral)
    assert tok.version == version
    assert Tokenizer.from_file(misleading).version == ("v3" if version == "v1" else "v1")
    assert tok.vocab_size == (32000 if version == "v1" else 32768)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, None)


def test_v7_vocabulary_is_rejected(data_dir):
    # v7 adds [SYSTEM_PROMPT] control tokens and a different chat format.
    with pytest.raises(ValueError, match="v7"):
        Tokenizer.from_file(data_dir / "mistral_instruct_tokenizer_241114.model.v7")


def test_version_override(paths):
    # v2 and v3 vocabularies can be ambiguous (Mistral 7B v0.3's file looks like v2): allow forcing.
    assert Tokenizer.from_file(paths["v2"], version="v3").version == "v3"
    with pytest.raises(ValueError, match="v1"):
        Tokenizer.from_file(paths["v1"], version="v3")  # v1 vocab has no [INST] control token
    with pytest.raises(ValueError, match="unknown tokenizer version"):
        Tokenizer.from_file(paths["v1"], version="v9")


def test_from_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_file(missing)

    for name, content in [("garbage.model", b"not a model" * 10), ("empty.model", b"")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=name):
            Tokenizer.from_file(bad)

    with pytest.raises(ValueError, match="not a regular file"):
        Tokenizer.from_file(tmp_path)


def test_package_does_not_import_mistral_common():
    code = "import sys, mistral_jax.tokenizer; assert 'mistral_common' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- plain text

TEXTS = [
    "Hello world",
    "  leading and trailing  ",
    "multi\nline\n\n text\t with tabs",
    "naïve café, Ünïcödé",
    "日本語のテキスト 中文 한국어",
    "emoji 🤖🎉👍🏽",
    "",
]


@pytest.mark.parametrize("version", VERSIONS)
def test_encode_decode_match_sentencepiece(version, toks, paths):
    tok = toks[version]
    sp = sentencepiece.SentencePieceProcessor(model_file=paths[version])
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, bos=False) == ids
        assert tok.encode(text) == [1, *ids]
        assert tok.encode(text, bos=False, eos=True) == [*ids, 2]
        assert tok.decode(ids) == sp.decode(ids) == text
        # BOS/EOS (and, from v2 on, [INST]/[/INST]) are control tokens: decoded as nothing.
        controls = [1, 2] if version == "v1" else [1, 3, 4, 2]
        assert tok.decode([*controls[:-1], *ids, controls[-1]]) == text
        assert tok.decode(np.array(ids, dtype=np.int32)) == text


def test_decode_rejects_ids_outside_vocab(toks):
    tok = toks["v1"]
    with pytest.raises(ValueError, match="32000"):
        tok.decode([1, 32000])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="not an integer"):
        tok.decode([1.5])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# ---------------------------------------------------------------- chat format


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("version", VERSIONS)
def test_encode_chat_matches_mistral_common(version, name, toks, reference):
    messages = CONVERSATIONS[name]
    ids = toks[version].encode_chat(messages)
    assert ids == reference(version, messages)
    # Decoding (control tokens dropped) agrees too.
    assert toks[version].decode(ids) == reference.decode(version, ids)


def pieces(tok, ids):
    return "".join(tok.id_to_piece(i) for i in ids)


def test_chat_format_spelled_out(toks):
    conv = [sys_("S"), user("hi"), asst("yo"), user("again")]
    # v1: markers are text (note the "▁" before every [INST]/[/INST]); system prompt in the FIRST user turn.
    assert pieces(toks["v1"], toks["v1"].encode_chat(conv)) == (
        "<s>▁[INST]▁S<0x0A><0x0A>hi▁[/INST]▁yo</s>▁[INST]▁again▁[/INST]"
    )
    # v2/v3: markers are control tokens; system prompt in the LAST user turn.
    for v in ("v2", "v3"):
        assert pieces(toks[v], toks[v].encode_chat(conv)) == (
            "<s>[INST]▁hi[/INST]▁yo</s>[INST]▁S<0x0A><0x0A>again[/INST]"
        )


def test_content_cannot_inject_control_tokens(toks):
    # Text "[INST]" is never encoded as the v2/v3 control token, so users can't forge turns.
    ids = toks["v3"].encode_chat([user("[INST] x [/INST]")])
    assert ids.count(3) == 1 and ids.count(4) == 1


# ---------------------------------------------------------------- loss mask


def runs(mask):
    """(start, end) of each maximal run of True."""
    out, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize(
    "name", ["ends_with_assistant", "system_multi_turn_ends_assistant", "unicode", "newlines_and_spaces"]
)
@pytest.mark.parametrize("version", VERSIONS)
def test_mask_covers_exactly_assistant_content_and_eos(version, name, toks):
    tok, messages = toks[version], CONVERSATIONS[name]
    ids, mask = tok.encode_chat_with_mask(messages)
    assert ids == tok.encode_chat(messages)
    assert len(mask) == len(ids) and not mask[0]

    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    spans = runs(mask)
    assert len(spans) == len(answers)
    for (start, end), answer in zip(spans, answers):
        assert ids[end - 1] == tok.eos_id
        assert tok.eos_id not in ids[start : end - 1]
        # v2/v3 drop trailing spaces of assistant text; v1 keeps the text verbatim.
        expected = answer if version == "v1" else answer.rstrip(" ")
        assert tok.decode(ids[start : end - 1]) == expected
    # Nothing outside the spans is trained on: every [INST] block and the BOS stay False.
    assert sum(mask) == sum(end - start for start, end in spans)


def assert_each_answer_follows_its_prompt(tok, messages, which=slice(None)):
    """ids before each selected answer == encode_chat(conversation up to that answer)."""
    ids, mask = tok.encode_chat_with_mask(messages)
    starts = [start for start, _ in runs(mask)]
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for start, idx in list(zip(starts, assistant_idx))[which]:
        assert ids[:start] == tok.encode_chat(messages[:idx])


@pytest.mark.parametrize("version", VERSIONS)
def test_mask_unmasked_part_is_the_prompt(version, toks):
    tok = toks[version]
    conv = CONVERSATIONS["system_multi_turn_ends_assistant"]
    # The final answer always follows exactly the generation prompt of the conversation so far.
    assert_each_answer_follows_its_prompt(tok, conv, which=slice(-1, None))
    # Earlier answers too, without a system prompt ...
    assert_each_answer_follows_its_prompt(tok, [m for m in conv if m["role"] != "system"])
    # ... and with one in v1, which puts it in the FIRST user turn. v2/v3 put it in the LAST
    # user turn, which moves as the conversation grows, so there earlier prefixes differ.
    if version == "v1":
        assert_each_answer_follows_its_prompt(tok, conv)
    else:
        ids, mask = tok.encode_chat_with_mask(conv)
        assert ids[: runs(mask)[0][0]] != tok.encode_chat(conv[:2])


def test_mask_for_prompt_ending_with_user(toks):
    tok = toks["v3"]
    ids, mask = tok.encode_chat_with_mask([user("a"), asst("b"), user("c")])
    # Only "▁b</s>" is a target; the trailing "[INST]▁c[/INST]" prompt is not.
    assert [ids[s:e] for s, e in runs(mask)] == [tok.encode("b", bos=False, eos=True)]
    assert ids[-1] == 4 and not mask[-1]


# ---------------------------------------------------------------- validation

# (messages, error pattern, whether mistral-common can even express it: wrong types fail in pydantic)
BAD = [
    ([], "empty", True),
    ([{"role": "tool", "content": "x"}], r"message 0: unknown role 'tool'", False),
    ([user("a"), {"role": "user", "content": 3}], r"message 1 \(user\): content must be a str", False),
    ([user("a"), {"role": "assistant"}], r"message 1 \(assistant\): content must be a str", False),
    ([user("a"), "not a dict"], r"message 1: expected a dict", False),
    ([asst("alone")], r"message 0: a conversation must start with a user or system", True),
    ([user("a"), asst("b"), sys_("late"), user("c")], r"message 2: a system message cannot follow an assistant", True),
    ([user("a"), asst("")], r"message 1 \(assistant\): content must not be empty", True),
]


@pytest.mark.parametrize("messages, match, _", BAD)
def test_bad_messages_raise_value_error(messages, match, _, toks):
    with pytest.raises(ValueError, match=match):
        toks["v3"].encode_chat(messages)
    with pytest.raises(ValueError, match=match):
        toks["v1"].encode_chat_with_mask(messages)


@pytest.mark.parametrize("messages", [m for m, _, expressible in BAD if expressible])
def test_mistral_common_refuses_the_same_structures(messages, reference):
    # Guards against rejecting conversations the oracle would accept.
    with pytest.raises(MistralCommonException):
        reference("v3", messages)


def test_messages_must_be_a_list(toks):
    with pytest.raises(ValueError, match="list of dicts"):
        toks["v1"].encode_chat(user("a"))
    with pytest.raises(ValueError, match="list of dicts"):
        toks["v1"].encode_chat("hello")
