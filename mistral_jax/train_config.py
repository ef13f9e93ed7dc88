"""The run config of a fine-tuning run, by what each part describes:

  TrainConfig     the run: where from and to, the data, the batch, the loop, checkpoints, logging, the mesh
    .optimizer    train_step.OptimizerConfig: AdamW and its schedule
    .lora         lora.LoraConfig, or None for full fine-tuning
    .numerics     config.Numerics: param and compute dtypes, remat, attention kernel

  cfg = TrainConfig.load("configs/demo.yaml", steps=100)    # YAML (configs/*.yaml); keyword overrides

The nested YAML form is what config.from_yaml reads; `load` also reads v0.1's flat keys (lr, lora_rank,
dtype, ...), moving each into its section, so existing run configs keep working.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from . import config as config_lib
from .config import PRESETS, MistralConfig, Numerics, get_preset
from .lora import LoraConfig
from .train_step import OptimizerConfig

MISTRAL_COMMON_PREFIX = "mistral-common:"

# Training computes in bfloat16 over float32 master weights unless told otherwise, with an attention whose
# memory grows linearly in the sequence (splash on TPU, cuDNN on GPU, blockwise elsewhere), never [T, T] scores.
TRAIN_NUMERICS = Numerics(param_dtype="float32", dtype="bfloat16", attention_impl="auto")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. YAML files (configs/*.yaml) hold these keys; command-line flags override them."""

    # ---- model and data
    init: str = ""  # our checkpoint dir, a transformers / Mistral dir, or a preset (random init)
    train: str = ""  # JSONL: {"messages": [...]} or {"prompt", "completion"} per row
    eval: str | None = None  # held-out JSONL of the same format: eval loss and perplexity
    output: str = ""  # the run directory (see trainer.py)
    tokenizer: str | None = None  # sentencepiece file; default tokenizer.model in `init`;
    # "mistral-common:v1" = the v1 file that the mistral-common package ships
    model: dict = dataclasses.field(default_factory=dict)  # MistralConfig overrides, e.g. {dim: 128} on a preset
    bad_rows: str = "skip"  # bad training rows: "skip" (reported) or "error"
    # ---- batch and loop
    seq_len: int = 2048  # tokens per packed row
    batch_size: int = 8  # rows per optimizer step (global, over all devices)
    grad_accum: int = 1  # microbatches per step (batch_size / grad_accum rows each)
    steps: int = 1000  # optimizer steps of the run (and the schedule's length unless it says)
    max_bad_steps: int = 10  # abort after this many non-finite losses in a row (each one is skipped)
    # ---- what is trained, and how
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoraConfig | None = None  # None: full fine-tuning
    numerics: Numerics = TRAIN_NUMERICS  # LoRA's frozen base weights are kept in numerics.dtype
    # ---- checkpoints, evaluation, logging
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # the last K, plus the best by eval loss
    eval_every: int = 500  # 0 = at the end only; evaluate at checkpoint steps to rank them
    log_every: int = 10
    tensorboard: bool = False  # also write OUTPUT/tensorboard (needs tensorboardX or tensorboard)
    progress: bool = True  # tqdm progress bar
    seed: int = 0  # random init, LoRA init, dropout, data order
    mesh: str | None = None  # e.g. "fsdp=8" or "data=2,fsdp=4" (sharding.py); None = every device on fsdp

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "max_bad_steps",
        ):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "seed"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            bad(f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}")
        if self.bad_rows not in ("skip", "error"):
            bad(f"bad_rows must be 'skip' or 'error', got {self.bad_rows!r}")
        if not isinstance(self.model, dict):
            bad(f"model must be a mapping of MistralConfig fields, got {self.model!r}")
        model_fields = {f.name for f in dataclasses.fields(MistralConfig)}
        for k in self.model:
            if k in NUMERICS_FIELDS:
                bad(f"model: set {k!r} under numerics, not under model")
            if k not in model_fields:
                bad(f"model: unknown MistralConfig field {k!r}; known: {', '.join(sorted(model_fields))}")

    def check_required(self) -> None:
        for name, flag in (("init", "--init"), ("train", "--train"), ("output", "--output")):
            if not getattr(self, name):
                raise ValueError(f"TrainConfig: {name!r} is required (set `{name}:` in the YAML or pass {flag})")

    def optimizer_config(self) -> OptimizerConfig:
        """The optimizer with its schedule's length resolved (the run's steps unless it gives its own)."""
        if self.optimizer.total_steps is not None:
            return self.optimizer
        return self.optimizer.replace(total_steps=self.steps)

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """The nested mapping (JSON types) that from_dict reads back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(
        cls, d: dict, where: str = "config", note: Callable[[str], None] | None = None, **overrides
    ) -> TrainConfig:
        """From a nested mapping (v0.1's flat keys are moved into their sections, with a note); `overrides`
        (None = not given) take flat or top-level names, as the command-line flags do."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping of TrainConfig keys, got {type(d).__name__}")
        data = upgrade(d, where, note or _note)
        for key, value in overrides.items():
            if value is not None:
                _set(data, key, value)
        if isinstance(data.get("numerics"), dict):  # a partial section completes the training default
            data["numerics"] = {**dataclasses.asdict(TRAIN_NUMERICS), **data["numerics"]}
        return config_lib.from_mapping(cls, data, where)

    @classmethod
    def load(cls, path: str, **overrides) -> TrainConfig:
        """From a YAML file (see from_dict); errors name the file."""
        return cls.from_dict(config_lib.read_yaml(path), path, **overrides)

    from_yaml = load


NUMERICS_FIELDS = tuple(f.name for f in dataclasses.fields(Numerics))

# v0.1's flat keys -> (section, field).
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    **{k: ("optimizer", k) for k in ("lr", "warmup_steps", "min_lr_ratio", "weight_decay", "clip_norm")},
    "adam_b1": ("optimizer", "b1"),
    "adam_b2": ("optimizer", "b2"),
    "adam_eps": ("optimizer", "eps"),
    "lora_rank": ("lora", "rank"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "lora_targets": ("lora", "targets"),
    **{k: ("numerics", k) for k in NUMERICS_FIELDS},
}


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def upgrade(d: dict, where: str = "config", note: Callable[[str], None] = _note) -> dict[str, Any]:
    """The nested form of a TrainConfig mapping: v0.1's flat keys (and numerics under `model`) moved into
    their sections."""
    data = dict(d)
    nested_lora = isinstance(data.get("lora"), dict)
    moved = []
    for key in [k for k in data if k in LEGACY_KEYS]:
        moved.append(key)
        section, field = LEGACY_KEYS[key]
        if isinstance(data.get(section), dict) and field in data[section]:
            raise ValueError(f"{where}: {key} and {section}.{field} both given; keep {section}.{field}")
        _set(data, key, data.pop(key))
    if isinstance(data.get("model"), dict):
        model = dict(data["model"])
        for key in [k for k in model if k in NUMERICS_FIELDS]:
            moved.append(f"model.{key}")
            data["numerics"] = {**(data.get("numerics") or {}), key: model.pop(key)}
        data["model"] = model
    if not nested_lora and isinstance(data.get("lora"), dict) and "rank" not in data["lora"]:
        data["lora"] = None  # lora_* settings without lora_rank: v0.1 trained the full model
    if moved:
        note(
            f"note: {where}: v0.1 keys {', '.join(moved)} read into optimizer / lora / numerics "
            "(configs/*.yaml show the nested form)"
        )
    return data


def _set(data: dict, key: str, value) -> None:
    """data[key] = value, a flat v0.1 name going to its section (lora_rank 0: no LoRA)."""
    if key not in LEGACY_KEYS:
        data[key] = value
        return
    section, field = LEGACY_KEYS[key]
    if section == "lora":
        if field == "rank" and value == 0:
            data["lora"] = None
            return
        if "lora" in data and data["lora"] is None:
            if field != "rank":
                return  # a setting of adapters that are off
            data["lora"] = {}
    if field == "targets" and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    current = data.get(section) or {}
    if dataclasses.is_dataclass(current):
        current = dataclasses.asdict(current)
    data[section] = {**current, field: value}


# ---- what the config points at ----------------------------------------------------------------------------------


def resolve_tokenizer(cfg: TrainConfig) -> str:
    """The tokenizer file of the run: `cfg.tokenizer`, else tokenizer.model in the init checkpoint."""
    from .tokenizer import mistral_common_tokenizer

    if cfg.tokenizer:
        if cfg.tokenizer.startswith(MISTRAL_COMMON_PREFIX):
            return mistral_common_tokenizer(cfg.tokenizer[len(MISTRAL_COMMON_PREFIX) :])
        if not os.path.isfile(cfg.tokenizer):
            raise FileNotFoundError(f"tokenizer file not found: {cfg.tokenizer}")
        return cfg.tokenizer
    path = os.path.join(cfg.init, "tokenizer.model")
    if os.path.isfile(path):
        return path
    raise ValueError(
        f"no tokenizer: {cfg.init!r} has no tokenizer.model; pass --tokenizer PATH "
        f"(or {MISTRAL_COMMON_PREFIX}v1 for the v1 file that mistral-common ships)"
    )


def model_config(cfg: TrainConfig) -> MistralConfig:
    """The MistralConfig of the run: the preset's or the checkpoint's, with the run's `model` overrides."""
    if cfg.init in PRESETS:
        return get_preset(cfg.init, **cfg.model)
    if not os.path.exists(cfg.init):
        raise FileNotFoundError(
            f"init {cfg.init!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})"
        )
    from . import checkpoint

    return checkpoint.load_config(cfg.init, **cfg.model)
