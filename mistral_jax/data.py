"""Instruction fine-tuning data: JSONL conversations -> token ids with a loss mask -> packed rows -> batches.

Three steps, each usable alone:

  load_examples  reads and validates a whole JSONL file (mistral-finetune's instruct format, or prompt/completion
                 pairs), reporting every bad row by line number before any training starts.
  pack           puts several examples in each row of `seq_len` tokens. Each example gets its own segment id and
                 positions restarting at 0, so the model's attention mask keeps examples apart and each one gets
                 exactly the logits it would get alone.
  DataIterator   deterministic shuffled batches of packed rows, epoch after epoch, with a small JSON state that
                 checkpoints save so a resumed run sees the same batches as an uninterrupted one.

Packed arrays, all [R, T] (R rows, T = seq_len):
  tokens       int32    input ids
  targets      int32    the next token of the same example (pad_id after an example's last token)
  loss_mask    float32  1.0 where the TARGET carries loss (an assistant content token or the EOS closing its turn)
  positions    int32    0, 1, ... per example
  segment_ids  int32    1..k for the k examples of a row, 0 on padding
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from .jsonl import read_jsonl
from .tokenizer import ROLES, Tokenizer

KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


@dataclasses.dataclass
class Example:
    line: int  # 1-based line of the source file, to trace a batch back to its data
    ids: list[int]  # BOS + the encoded conversation
    mask: list[bool]  # True where the token carries loss: assistant content and the EOS closing each turn


@dataclasses.dataclass
class DataReport:
    path: str
    total: int  # non-blank lines read
    kept: int
    bad: list[tuple[int, str]]  # (line, "category: detail"); the category is what summary() counts

    def summary(self, first: int = 5) -> str:
        head = f"{self.path}: {self.total} rows, {self.kept} kept, {len(self.bad)} bad"
        by_kind: dict[str, list[int]] = collections.defaultdict(list)
        for line, reason in self.bad:
            by_kind[reason.split(":", 1)[0]].append(line)
        parts = []
        for kind, lines in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
            more = ", ..." if len(lines) > first else ""
            parts.append(f"  {kind}: {len(lines)} (lines {', '.join(map(str, lines[:first]))}{more})")
        return "\n".join([head, *parts])


def _messages(data: dict) -> list:
    """The row as a list of messages; raises ValueError("category: detail") for a row of the wrong shape."""
    if "messages" in data:
        if "prompt" in data or "completion" in data:
            raise ValueError("bad format: has both 'messages' and 'prompt'/'completion'")
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("bad format: 'messages' must be a non-empty list")
        return messages
    if "prompt" in data and "completion" in data:
        return [{"role": "user", "content": data["prompt"]}, {"role": "assistant", "content": data["completion"]}]
    raise ValueError("bad format: expected a 'messages' list or 'prompt' and 'completion'")


def _check_messages(messages: list) -> None:
    """Checks the tokenizer would also refuse, made here so the report says which kind of fault it was."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"bad format: message {i} is a {type(m).__name__}, not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"unknown role: message {i} has role {role!r}, expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"bad content: message {i} ({role}) content is a {type(content).__name__}, not a str")
        try:  # JSON's \ud800 escape reads as a lone surrogate, which no tokenizer takes
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"bad content: message {i} ({role}) content is not valid Unicode (lone surrogate at "
                f"character {e.start})"
            ) from None
        # Whitespace-only counts as empty: v2/v3 strip assistant text, and a blank turn teaches nothing.
        if not content.strip():
            raise ValueError(f"bad content: message {i} ({role}) content is empty")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to train on")


def load_examples(
    path: str, tokenizer: Tokenizer, seq_len: int, on_bad: str = "skip"
) -> tuple[list[Example], DataReport]:
    """Reads JSONL rows {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"} into Examples.

    The whole file is validated before returning, so a bad row at line 90 000 fails the job at start-up, not
    hours into training. Bad rows (malformed JSON, wrong shape, unknown roles, non-string or empty content, no
    assistant turn, more than `seq_len` tokens, conversations the tokenizer refuses) are listed in the report.
    on_bad="error" raises ValueError naming the file, the count and the first bad lines; "skip" drops them.
    A file with no usable row is always an error.
    """
    if on_bad not in ("skip", "error"):
        raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    examples, bad, total = [], [], 0
    for row in read_jsonl(path):
        total += 1
        if row.error is not None:
            bad.append((row.line, "malformed JSON: " + row.error.removeprefix(f"{path}:{row.line}: ")))
            continue
        try:
            messages = _messages(row.data)
            _check_messages(messages)
            # Turns after the last assistant turn carry no loss and only take room in the row.
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            messages = messages[: last + 1]
            try:
                ids, mask = tokenizer.encode_chat_with_mask(messages)
            except (ValueError, RuntimeError) as e:  # sentencepiece raises RuntimeError for input it cannot take
                raise ValueError(f"tokenizer error: {e}") from None
            if len(ids) > seq_len:
                raise ValueError(f"too long: {len(ids)} tokens > seq_len {seq_len}")
        except ValueError as e:
            bad.append((row.line, str(e)))
            continue
        examples.append(Example(row.line, ids, mask))

    report = DataReport(path, total, len(examples), bad)
    if not examples:
        raise ValueError(f"{path}: no usable rows\n{report.summary()}")
    if bad and on_bad == "error":
        raise ValueError(f"{path}: {len(bad)} bad rows (pass on_bad='skip' to drop them)\n{report.summary()}")
    return examples, report


def pack(examples: list[Example], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Packs examples into rows of `seq_len` tokens (best-fit decreasing: deterministic, and rows come out
    nearly full). Returns the arrays of the module docstring, each [R, seq_len].

    Why this layout gives each example its lone logits: segment ids stop attention across examples, and
    positions restart at 0 so RoPE sees the same offsets. The loss mask is the example's mask shifted by one
    (the target of token t is token t+1), and 0 on each example's last token, whose "next token" belongs to
    the next example or to padding.
    """
    if not examples:
        raise ValueError("pack: no examples")
    for ex in examples:
        if not 0 < len(ex.ids) <= seq_len or len(ex.mask) != len(ex.ids):
            raise ValueError(
                f"pack: example from line {ex.line} has {len(ex.ids)} ids and {len(ex.mask)} mask "
                f"entries; expected 1..{seq_len} of each"
            )

    # Longest first; each goes to the row with the least room that still fits it (ties: lowest row). `free`
    # holds (room, row) sorted, so the search is a bisect, not a scan of every row.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))  # stable: ties keep file order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in order:
        n = len(examples[i].ids)
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            rows.append([i])
            room, r = seq_len - n, len(rows) - 1
        else:
            room, r = free.pop(j)
            rows[r].append(i)
            room -= n
        if room:
            bisect.insort(free, (room, r))

    shape = (len(rows), seq_len)
    out = {
        "tokens": np.full(shape, pad_id, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
    }
    for r, members in enumerate(rows):
        start = 0
        for seg, i in enumerate(members, 1):
            ids, mask = examples[i].ids, examples[i].mask
            end = start + len(ids)
            out["tokens"][r, start:end] = ids
            out["targets"][r, start : end - 1] = ids[1:]
            out["loss_mask"][r, start : end - 1] = mask[1:]
            out["positions"][r, start:end] = np.arange(len(ids))
            out["segment_ids"][r, start:end] = seg
            start = end
    return out


class DataIterator:
    """Endless batches of packed rows: {key: [batch_size, seq_len]} with the keys of `pack`.

    Rows are shuffled per epoch by a generator seeded with (seed, epoch), so an epoch's order depends only on
    those two numbers (and seeds s and s+1 do not share orders shifted by an epoch). Every row appears exactly
    once per epoch. The last batch of an epoch is padded to `batch_size`, not dropped (small fine-tuning sets
    would lose a noticeable share of rows): pad rows are all zeros, i.e. loss_mask 0 and segment_ids 0, so
    they add nothing to the loss. Normalise the loss by the sum of loss_mask, not by the batch size.
    """

    def __init__(self, packed: dict[str, Any], batch_size: int, seed: int, shuffle: bool = True):
        self._arrays = {k: np.asarray(v) for k, v in packed.items()}
        shapes = {k: a.shape for k, a in self._arrays.items()}
        if not shapes or len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
            raise ValueError(f"DataIterator: packed arrays must all be [rows, seq_len], got {shapes}")
        self.num_rows = next(iter(shapes.values()))[0]
        if self.num_rows == 0:
            raise ValueError("DataIterator: packed data has no rows")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"DataIterator: batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.steps_per_epoch = -(-self.num_rows // batch_size)
        self._order_cache: tuple[int, np.ndarray] | None = None
        self.restore({"epoch": 0, "index": 0, "seed": seed})

    def _order(self) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            order = np.arange(self.num_rows)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
            self._order_cache = (self.epoch, order)
        return self._order_cache[1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self._order()[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        batch = {}
        for k, a in self._arrays.items():
            batch[k] = np.zeros((self.batch_size, *a.shape[1:]), a.dtype)
            batch[k][: len(rows)] = a[rows]
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def state(self) -> dict:
        """Where the next batch comes from: {"epoch", "index" (batches already taken this epoch), "seed"}."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def restore(self, state: dict) -> None:
        """Continue from `state` (from `state()` of an iterator over the same packed data and batch size)."""
        try:
            epoch, index, seed = (int(state[k]) for k in ("epoch", "index", "seed"))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"DataIterator.restore: expected ints 'epoch', 'index', 'seed', got {state!r}") from None
        if epoch < 0 or seed < 0 or not 0 <= index < self.steps_per_epoch:
            raise ValueError(
                f"DataIterator.restore: state {state!r} does not fit this data (epoch and seed >= 0, "
                f"index in [0, {self.steps_per_epoch}))"
            )
        self.epoch, self.index, self.seed = epoch, index, seed
