"""What a run directory must agree on to be resumed, and the record of every start.

  checkpoints/<step>/run   JSON saved with each step's state: the batch size, seq_len and training-data
                           fingerprint (row count, SHA-256 of the file) that the saved data position counts in,
                           and a checksum of every array of the state
  train_config.json        the settings the run started with (rewritten only while no checkpoint exists)
  config_history.jsonl     one row per start or resume: {"time", "resumed_from", "config", "changed"}

A resume is checked against the newest checkpoint's record before anything is written: another batch size or
seq_len, or other bytes in the training file, would make the restored data position point at other rows, so it
stops with ResumeError saying what changed and how to go on. The checksums catch a checkpoint whose bytes
changed on disk without breaking its format (a flipped bit decodes to a wrong value); the trainer then falls
back to the previous checkpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import distributed
from .checkpoint import integrity
from .train_config import TrainConfig

RECORD = "run"  # the checkpoint item holding record()
HISTORY = "config_history.jsonl"
CONFIG = "train_config.json"

# Settings that do not change what is computed: a resumed run may change them and still equal an uninterrupted one.
BOOKKEEPING = {
    "output",
    "eval",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "tensorboard",
    "progress",
    "max_bad_steps",
    "mesh",
}


class ResumeError(ValueError):
    """The run directory cannot be resumed as asked (a user error: one line, exit 2 from the CLI)."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters (TensorStore errors run to pages)."""
    while e.__cause__ is not None and "See full TensorStore details" in str(e):
        e = e.__cause__  # orbax wraps TensorStore's error, which says what is wrong, in a dump of the spec
    text = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- what a checkpoint records --------------------------------------------------------------------------------


def data_fingerprint(path: str, rows: int) -> dict:
    """{"path", "rows" (non-blank lines), "sha256" of the file's bytes}."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {"path": path, "rows": rows, "sha256": h.hexdigest()}


def record(cfg: TrainConfig, fingerprint: dict, checksums: dict[str, str]) -> dict:
    return {
        "version": 1,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "train": fingerprint,
        "checksums": checksums,
    }


def _leaf_sum(x: jax.Array) -> jax.Array:
    """uint32 [2]: the checkpoint checksum lanes (order-independent, so the same whatever the sharding)."""
    return jnp.stack(integrity.lanes(x))


_tree_sums = jax.jit(lambda tree: jax.tree.map(_leaf_sum, tree))


def checksums(tree) -> dict[str, str]:
    """{leaf path: 16 hex digits} of a tree of (possibly sharded) arrays; one program for the whole tree."""
    sums = _tree_sums(tree)
    if jax.process_count() > 1:  # each process gets every value, whatever the layout XLA gave the sums
        from jax.experimental import multihost_utils

        sums = multihost_utils.process_allgather(sums, tiled=True)
    sums = jax.device_get(sums)
    return {
        jax.tree_util.keystr(path): f"{int(v[0]):08x}{int(v[1]):08x}"
        for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]
    }


def mismatch(tree, want: dict[str, str]) -> str | None:
    """The first leaf whose checksum differs from `want` (or is missing there), or None."""
    got = checksums(tree)
    for path in sorted(set(got) | set(want)):
        if got.get(path) != want.get(path):
            return path
    return None


# ---- resume checks --------------------------------------------------------------------------------------------


def check_resume(saved: dict, step: int, cfg: TrainConfig, fingerprint: dict) -> None:
    """Raises ResumeError when the checkpoint's record (of `step`) does not fit the run's settings and data."""
    changes = [
        f"{key} {saved[key]} -> {getattr(cfg, key)}"
        for key in ("batch_size", "seq_len")
        if key in saved and saved[key] != getattr(cfg, key)
    ]
    old = saved.get("train")
    if isinstance(old, dict) and (old.get("rows"), old.get("sha256")) != (fingerprint["rows"], fingerprint["sha256"]):
        changes.append(
            f"train data {old.get('path')} ({old.get('rows')} rows, sha256 {str(old.get('sha256'))[:12]}) "
            f"-> {fingerprint['path']} ({fingerprint['rows']} rows, sha256 {fingerprint['sha256'][:12]})"
        )
    if changes:
        _refuse(cfg, step, changes)


def check_legacy_resume(previous: dict | None, step: int, cfg: TrainConfig) -> list[str]:
    """Checkpoints saved before records existed: the batch size and seq_len of the previous start must match
    (raises ResumeError). Returns notes on what cannot be checked."""
    if previous is None:
        return [f"note: {cfg.output}: no record of the settings of checkpoint {step}; batch size and data unchecked"]
    changes = [
        f"{key} {previous[key]} -> {getattr(cfg, key)}"
        for key in ("batch_size", "seq_len")
        if key in previous and previous[key] != getattr(cfg, key)
    ]
    if changes:
        _refuse(cfg, step, changes)
    return [f"note: checkpoint {step} of {cfg.output} predates data fingerprints; the training data is unchecked"]


def _refuse(cfg: TrainConfig, step: int, changes: list[str]) -> None:
    raise ResumeError(
        f"cannot resume {cfg.output} from step {step}: {'; '.join(changes)}; run again with the "
        "settings and data it was saved with, or pass a new --output to start a new run"
    )


# ---- settings history -----------------------------------------------------------------------------------------


def previous_config(output: str) -> dict | None:
    """The settings of the latest start of the run (nested form), or None for a new run directory."""
    rows = []
    path = os.path.join(output, HISTORY)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line)["config"])
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by a crash mid-append
    if rows:
        return rows[-1]
    path = os.path.join(output, CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        # A v0.1 run directory holds the flat form.
        return TrainConfig.from_dict(before, path, note=lambda _: None).to_dict()
    except (ValueError, TypeError, AttributeError):
        return None


def changed_settings(before: dict | None, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(settings that change what is computed, bookkeeping ones) that differ from `before`."""
    if before is None:
        return [], []
    a, b = _flat(cfg.to_dict()), _flat(before)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    computed = [k for k in changed if k.split(".")[0] not in BOOKKEEPING]
    return computed, [k for k in changed if k not in computed]


def record_start(cfg: TrainConfig, resumed_from: int | None, log: Callable[[str], None]) -> None:
    """Appends this start to config_history.jsonl and, for a new run, writes train_config.json; on a resume,
    logs the settings changed since the previous start."""
    if not distributed.is_main():
        return
    computed, other = changed_settings(previous_config(cfg.output) if resumed_from is not None else None, cfg)
    changed = sorted(computed + other)
    if computed:
        log(
            f"warning: resuming {cfg.output} with changed settings: {', '.join(changed)}; "
            "the run will not equal an uninterrupted one"
        )
    elif other:
        log(f"note: resuming {cfg.output} with changed settings: {', '.join(changed)}")
    now = cfg.to_dict()
    path = os.path.join(cfg.output, CONFIG)
    if resumed_from is None or not os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(now, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    row = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": resumed_from,
        "config": now,
        "changed": changed,
    }
    path = os.path.join(cfg.output, HISTORY)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # a row cut short by a crash mid-append stays a line of its own
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row) + "\n").encode("utf-8"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
