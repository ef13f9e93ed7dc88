"""SentencePiece tokenizer for Mistral 7B with Mistral's instruct chat format.

Only ``sentencepiece`` is needed at run time. The chat encoding reproduces
``mistral_common``'s ``MistralTokenizer.encode_chat_completion`` token for
token for text-only conversations (no tools, no images); the tests check this
against mistral-common itself.

Chat formats (``▁`` is SentencePiece's space, ``[INST]`` in v2/v3 is a single
control token, in v1 it is plain text):

    v1  <s>▁[INST]▁{user}▁[/INST]▁{assistant}</s>▁[INST]▁{user}▁[/INST]
    v2  <s>[INST]▁{user}[/INST]▁{assistant}</s>[INST]▁{user}[/INST]
    v3  same as v2 (v3 only changes how tool calls are written)

Subtleties copied from mistral-common (1.13):

* All system messages are joined with a blank line and prepended (again with
  a blank line) to ONE user message: the first one in v1, the last one in
  v2/v3. Empty system messages are dropped.
* Consecutive messages of the same role are merged into one turn, joined with
  a blank line (empty contents are skipped). A system message between two
  user messages still splits them into two ``[INST]`` blocks.
* If the conversation does not start with a user turn (it starts with an
  assistant, or holds only system messages), an empty user turn is inserted.
* Nothing is stripped, except that v2/v3 strip trailing *spaces* (not
  newlines) from assistant contents. v1 encodes ``"[INST] {user} [/INST]"``
  as one string, so spaces around the user text merge with the markers.
* Every assistant turn ends with EOS, including a final one (the encoding
  mistral-common produces in finetuning / agnostic validation mode; its
  default "test" mode refuses a trailing assistant message).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sentencepiece import SentencePieceProcessor

__all__ = ["Tokenizer"]

VERSIONS = ("v1", "v2", "v3")
ROLES = ("system", "user", "assistant")

# Joins system prompts, merged same-role messages, and system prompt + user text.
_JOIN = "\n\n"


@dataclass(frozen=True)
class _Turn:
    role: str  # "user" | "assistant"
    content: str


class Tokenizer:
    """Mistral SentencePiece tokenizer (v1, v2 or v3 vocabulary).

    Attributes:
        version: ``"v1"``, ``"v2"`` or ``"v3"``, detected from the vocabulary.
        vocab_size, bos_id, eos_id, unk_id: as in the model file.
        pad_id: always ``None``: Mistral's vocabularies have no pad piece, so
            callers that pad batches must choose a filler id and mask it out.
    """

    pad_id: int | None = None

    def __init__(self, processor: SentencePieceProcessor, version: str | None = None, path: str | None = None):
        self._sp = processor
        self.path = path
        self.vocab_size: int = processor.get_piece_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.unk_id: int = processor.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path or 'tokenizer'}: the model defines no BOS/EOS piece")

        detected = _detect_version(processor, path)
        if version is None:
            version = detected
        elif version not in VERSIONS:
            raise ValueError(f"unknown tokenizer version {version!r}; expected one of {VERSIONS}")
        elif (version == "v1") != (detected == "v1"):
            # v1 writes [INST] as text, v2/v3 need it as a control token: the two can't be swapped.
            raise ValueError(f"{path or 'tokenizer'}: vocabulary looks like {detected}, cannot use it as {version}")
        self.version: str = version

        if version != "v1":
            self._inst = processor.piece_to_id("[INST]")
            self._end_inst = processor.piece_to_id("[/INST]")

    @classmethod
    def from_file(cls, path: str | os.PathLike, version: str | None = None) -> Tokenizer:
        """Load a SentencePiece ``.model`` file (any file name).

        ``version`` overrides detection between v2 and v3 (see ``_detect_version``).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"not a sentencepiece model file (not a regular file): {path}")
        processor = SentencePieceProcessor()
        try:
            processor.Load(path)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse messages
            raise ValueError(f"not a valid sentencepiece model: {path} ({e})") from e
        return cls(processor, version=version, path=path)

    def __repr__(self) -> str:
        return f"Tokenizer(version={self.version!r}, vocab_size={self.vocab_size}, path={self.path!r})"

    # ------------------------------------------------------------------ text

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Plain SentencePiece encoding (adds the leading ``▁`` dummy prefix)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text. BOS, EOS and other control tokens decode to nothing.

        Accepts any 1-D sequence of integers (list, numpy/jax array).
        """
        if hasattr(ids, "tolist"):  # numpy / jax arrays -> python ints
            ids = ids.tolist()
        checked = []
        for pos, tok in enumerate(ids):
            try:
                tok = operator.index(tok)
            except TypeError:
                raise ValueError(f"token at position {pos} is not an integer: {tok!r}") from None
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"token id {tok} at position {pos} is outside the vocabulary [0, {self.vocab_size})")
            checked.append(tok)
        return self._sp.decode(checked)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    # ------------------------------------------------------------------ chat

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Encode a conversation of ``{"role", "content"}`` dicts like mistral-common.

        Ending with a user turn gives a generation prompt (ends with ``[/INST]``);
        ending with an assistant turn includes its text and EOS.
        """
        return self.encode_chat_with_mask(messages)[0]

    def encode_chat_with_mask(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[bool]]:
        """Like ``encode_chat``, plus a loss mask.

        The mask is True exactly on the tokens of each assistant turn's content
        and on the EOS that closes the turn. The first content token carries
        SentencePiece's leading ``▁`` (e.g. ``[/INST]`` then ``▁Sure``), so the
        space after ``[/INST]`` is part of the target.
        """
        turns, system_prompt = _normalize(messages)
        ids, mask = [self.bos_id], [False]
        for piece_ids, is_target in self._encode_turns(turns, system_prompt):
            ids += piece_ids
            mask += [is_target] * len(piece_ids)
        return ids, mask

    def _encode_turns(self, turns: list[_Turn], system_prompt: str | None) -> Iterator[tuple[list[int], bool]]:
        """Yield (ids, is_target) per turn; BOS is added by the caller."""
        user_idx = [i for i, t in enumerate(turns) if t.role == "user"]
        # Where the system prompt goes: v1 -> first user turn, v2/v3 -> last user turn.
        sys_idx = user_idx[0] if self.version == "v1" else user_idx[-1]
        for i, turn in enumerate(turns):
            if turn.role == "user":
                text = turn.content
                if system_prompt and i == sys_idx:
                    text = system_prompt + _JOIN + text
                if self.version == "v1":
                    # v1 markers are plain text, encoded together with the content.
                    yield self._sp.encode(f"[INST] {text} [/INST]"), False
                else:
                    yield [self._inst, *self._sp.encode(text), self._end_inst], False
            else:
                # v2/v3 strip trailing spaces (only spaces) from assistant text; v1 strips nothing.
                text = turn.content if self.version == "v1" else turn.content.rstrip(" ")
                yield self._sp.encode(text) + [self.eos_id], True


def _detect_version(sp: SentencePieceProcessor, path: str | None) -> str:
    """Tell v1/v2/v3 apart from the vocabulary alone (file names lie after renames).

    * v1 (Mistral 7B v0.1/v0.2, 32000 pieces): ``[INST]`` is not a control piece
      (only ``<s>``/``</s>`` are); the markers are written as text.
    * v2/v3 (32768 pieces): ``[INST]``, ``[/INST]`` and the tool markers are
      control pieces 3..9. mistral-common's v3 file additionally names
      ``[IMG] [PREFIX] [MIDDLE] [SUFFIX]`` at 10..13, where its v2 file has
      ``[control_8]..``; that is the only vocabulary difference, so it decides.
      Caveat: Mistral 7B v0.3's own ``tokenizer.model.v3`` (per its published
      Hugging Face config, id 10 is ``[control_8]``) is therefore reported as "v2". The chat formats of v2 and v3
      are identical without tools, so the encoding is unaffected; pass
      ``version="v3"`` to ``from_file`` if the label matters.
    * v7+ (``[SYSTEM_PROMPT]`` control piece) uses a different chat format and
      is rejected rather than silently mis-encoded.
    """

    def is_control(piece: str) -> bool:
        i = sp.piece_to_id(piece)  # unknown pieces map to <unk>, which is not a control piece
        return i != sp.unk_id() and sp.IsControl(i)

    if not is_control("[INST]"):
        return "v1"
    if not is_control("[/INST]"):
        raise ValueError(f"{path or 'tokenizer'}: has an [INST] control piece but no [/INST]")
    if is_control("[SYSTEM_PROMPT]"):
        raise ValueError(
            f"{path or 'tokenizer'}: tokenizer v7 or newer ([SYSTEM_PROMPT] control piece) is not supported"
        )
    if any(is_control(p) for p in ("[IMG]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]")):
        return "v3"
    return "v2"


def _normalize(messages: Sequence[Mapping[str, Any]]) -> tuple[list[_Turn], str | None]:
    """Validate messages and fold them into alternating-ish user/assistant turns.

    Returns the turns (the first one is always a user turn) and the joined
    system prompt (None if there is none). Validation follows mistral-common's
    rules, except that any final role is accepted.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: a conversation needs at least one message")

    roles = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a str, got {type(content).__name__}")
        if role == "assistant" and not content:
            raise ValueError(f"message {i} (assistant): content must not be empty")
        if i > 0 and role == "system" and roles[-1] == "assistant":
            # mistral-common only allows a system message at the start or after a user message.
            raise ValueError(f"message {i}: a system message cannot follow an assistant message")
        roles.append(role)
    if len(messages) == 1 and roles[0] == "assistant":
        # mistral-common only checks this for one-message conversations; longer ones that start
        # with an assistant message get an empty user turn inserted in front (below).
        raise ValueError("message 0: a conversation must start with a user or system message")

    system_parts = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    system_prompt = _JOIN.join(system_parts) if system_parts else None

    # Merge runs of the same role. System messages are dropped here but still end a run,
    # so "user, system, user" stays two user turns (as in mistral-common).
    turns: list[_Turn] = []
    run_role: str | None = None
    run: list[str] = []
    for msg in [*messages, {"role": None, "content": ""}]:  # sentinel flushes the last run
        if msg["role"] != run_role:
            if run_role in ("user", "assistant"):
                turns.append(_Turn(run_role, _JOIN.join(c for c in run if c)))
            run_role, run = msg["role"], []
        run.append(msg["content"])

    if not turns or turns[0].role != "user":
        turns.insert(0, _Turn("user", ""))
    return turns, system_prompt


_MISTRAL_COMMON_FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}


def mistral_common_tokenizer(version: str = "v1") -> str:
    """Path of the real Mistral tokenizer file that the `mistral-common` package ships (no download).

    Found without importing mistral-common, which the library does not need at run time."""
    import importlib.util

    if version not in _MISTRAL_COMMON_FILES:
        raise ValueError(f"version must be one of {sorted(_MISTRAL_COMMON_FILES)}, got {version!r}")
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the mistral-common package is not installed (pip install mistral-common); "
            "it ships the Mistral tokenizer files"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", _MISTRAL_COMMON_FILES[version])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found in the installed mistral-common")
    return path
