"""The fine-tuning loop: data -> jitted train step -> orbax checkpoints, eval, metrics -> an inference checkpoint.

  cfg = TrainConfig.from_yaml("configs/demo.yaml", steps=100)
  Trainer(cfg).run()

A run directory (`output`) holds:
  checkpoints/<step>/   orbax CheckpointManager: `state` (train_step.py's state pytree) and `data` (the data
                        iterator's position). Saved asynchronously every `checkpoint_every` steps; the last
                        `keep_checkpoints` are kept, plus the one with the best eval loss. Orbax writes a step
                        into a temporary directory and renames it when complete, so a crash mid-save leaves
                        the previous step intact (tests/test_trainer.py kills a run mid-save to check).
  metrics.jsonl         one row per logged step: step, loss, lr, grad_norm, tokens_per_s, skipped (+ eval_loss,
                        eval_ppl when evaluated)
  train_config.json     the TrainConfig of the run
  final/                merged (LoRA folded in) inference checkpoint with tokenizer.model: infer.generate,
                        infer.score and infer.convert read it
  final_adapter/        LoRA runs: the adapters alone in the PEFT format (peft_export.py)

Running the same command again resumes from the latest checkpoint: params (or adapters), optimizer state,
step, RNG and data position, so the losses match those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import typing
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from . import checkpoint, distributed
from . import model as model_lib
from . import train_step as ts
from .config import DTYPES, PRESETS, MistralConfig, get_preset
from .data import DataIterator, load_examples, pack
from .model import LORA_TARGETS, LoraSpec
from .tokenizer import Tokenizer, mistral_common_tokenizer

MISTRAL_COMMON_PREFIX = "mistral-common:"


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops instead of skipping batches forever."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. YAML files (configs/*.yaml) hold these keys; command-line flags override them."""

    # ---- model and data
    init: str = ""                  # our checkpoint dir, a transformers / Mistral dir, or a preset (random init)
    train: str = ""                 # JSONL: {"messages": [...]} or {"prompt", "completion"} per row
    eval: str | None = None         # held-out JSONL of the same format: eval loss and perplexity
    output: str = ""                # the run directory (see the module docstring)
    tokenizer: str | None = None    # sentencepiece file; default tokenizer.model in `init`;
                                    # "mistral-common:v1" = the v1 file that the mistral-common package ships
    model: dict = dataclasses.field(default_factory=dict)  # MistralConfig overrides, e.g. {dim: 128} on a preset
    bad_rows: str = "skip"          # bad training rows: "skip" (reported) or "error"
    # ---- batch
    seq_len: int = 2048             # tokens per packed row
    batch_size: int = 8             # rows per optimizer step (global, over all devices)
    grad_accum: int = 1             # microbatches per step (batch_size / grad_accum rows each)
    # ---- numerics
    param_dtype: str = "float32"    # trainable params and optimizer state (master weights)
    dtype: str = "bfloat16"         # compute dtype; LoRA's frozen base weights are kept in it too
    remat: str = "none"             # "none" | "full" | "dots" (MistralConfig.remat)
    # ---- optimizer: AdamW, linear warmup then cosine decay to lr * min_lr_ratio at `steps`
    steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0       # never applied to norm scales
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float = 1.0          # global-norm clipping; 0 = off
    max_bad_steps: int = 10         # abort after this many non-finite losses in a row (each one is skipped)
    # ---- LoRA (lora_rank 0 = full fine-tuning)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    # ---- checkpoints, evaluation, logging
    checkpoint_every: int = 500
    keep_checkpoints: int = 3       # the last K, plus the best by eval loss
    eval_every: int = 500           # 0 = at the end only; evaluate at checkpoint steps to rank them
    log_every: int = 10
    tensorboard: bool = False       # also write OUTPUT/tensorboard (needs tensorboardX or tensorboard)
    progress: bool = True           # tqdm progress bar
    seed: int = 0                   # random init, LoRA init, dropout, data order
    mesh: str | None = None         # e.g. "fsdp=8" or "data=2,fsdp=4" (sharding.py); None = one device

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        for name in ("seq_len", "batch_size", "grad_accum", "steps", "checkpoint_every", "keep_checkpoints",
                     "log_every", "max_bad_steps"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "lora_rank", "seed"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            bad(f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}")
        if self.lr <= 0:
            bad(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            bad(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.lora_dropout < 1:
            bad(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                bad(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in ("none", "full", "dots"):
            bad(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if self.bad_rows not in ("skip", "error"):
            bad(f"bad_rows must be 'skip' or 'error', got {self.bad_rows!r}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            bad(f"lora_targets must be a non-empty subset of {list(LORA_TARGETS)}, got {list(self.lora_targets)}")
        model_fields = {f.name for f in dataclasses.fields(MistralConfig)}
        for k in self.model:
            if k not in model_fields:
                bad(f"model: unknown MistralConfig field {k!r}; known: {', '.join(sorted(model_fields))}")
            if k in ("param_dtype", "dtype", "remat"):
                bad(f"model: set {k!r} at the top level of the run config, not under model")

    def check_required(self) -> None:
        for name, flag in (("init", "--init"), ("train", "--train"), ("output", "--output")):
            if not getattr(self, name):
                raise ValueError(f"TrainConfig: {name!r} is required (set `{name}:` in the YAML or pass {flag})")

    @property
    def lora_spec(self) -> LoraSpec | None:
        if self.lora_rank == 0:
            return None
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def optimizer_config(self) -> ts.OptimizerConfig:
        return ts.OptimizerConfig(lr=self.lr, total_steps=self.steps, warmup_steps=self.warmup_steps,
                                  min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay,
                                  b1=self.adam_b1, b2=self.adam_b2, eps=self.adam_eps, clip_norm=self.clip_norm)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", **overrides) -> "TrainConfig":
        """Keys must be fields (a misspelt key is an error naming it and `source`); values are type-checked."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a mapping of TrainConfig keys, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        kw = {}
        for key, value in d.items():
            if key not in hints:
                close = difflib.get_close_matches(str(key), hints, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{source}: unknown key {key!r}{hint}; known keys: {', '.join(hints)}")
            kw[key] = _coerce(value, hints[key], f"{source}: key {key!r}")
        for key, value in overrides.items():
            if value is not None:
                kw[key] = _coerce(value, hints[key], f"override {key!r}")
        return cls(**kw)

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "TrainConfig":
        import yaml

        try:
            with open(path) as f:
                d = yaml.safe_load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        return cls.from_dict(d or {}, source=path, **overrides)


def _coerce(value, hint, where: str):
    """`value` checked against a TrainConfig annotation (PyYAML reads 1e-4 as a string: floats accept that)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if not isinstance(value, hint):
        raise ValueError(f"{where} must be a {hint.__name__}, got {value!r}")
    return value


# ---- model, tokenizer and base weights -----------------------------------------------------------------------

def resolve_tokenizer(cfg: TrainConfig) -> str:
    """The tokenizer file of the run: `cfg.tokenizer`, else tokenizer.model in the init checkpoint."""
    if cfg.tokenizer:
        if cfg.tokenizer.startswith(MISTRAL_COMMON_PREFIX):
            return mistral_common_tokenizer(cfg.tokenizer[len(MISTRAL_COMMON_PREFIX):])
        if not os.path.isfile(cfg.tokenizer):
            raise FileNotFoundError(f"tokenizer file not found: {cfg.tokenizer}")
        return cfg.tokenizer
    path = os.path.join(cfg.init, "tokenizer.model")
    if os.path.isfile(path):
        return path
    raise ValueError(f"no tokenizer: {cfg.init!r} has no tokenizer.model; pass --tokenizer PATH "
                     f"(or {MISTRAL_COMMON_PREFIX}v1 for the v1 file that mistral-common ships)")


def model_config(cfg: TrainConfig) -> MistralConfig:
    """The MistralConfig of the run: the preset or the checkpoint's, with the run's numerics and overrides."""
    run = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat, **cfg.model)
    if cfg.init in PRESETS:
        return get_preset(cfg.init, **run)
    if not os.path.exists(cfg.init):
        raise FileNotFoundError(f"init {cfg.init!r} is neither a checkpoint directory nor a preset "
                                f"({', '.join(PRESETS)})")
    return checkpoint.load_config(cfg.init, **run)


def load_base(cfg: TrainConfig, config: MistralConfig, dtype: str, shardings=None):
    """The starting weights in `dtype`: random (seeded) for a preset, else read from the checkpoint."""
    if cfg.init in PRESETS:
        init = _jit_init(config) if shardings is None else _jit_init.__wrapped__(config, shardings)
        params = init(jax.random.fold_in(jax.random.key(cfg.seed), 1))
        return jax.tree.map(lambda x: x.astype(dtype), params)
    return checkpoint.load_params(cfg.init, config, dtype=dtype, shardings=shardings)


@functools.lru_cache(maxsize=8)
def _jit_init(config: MistralConfig, shardings=None):
    return jax.jit(functools.partial(model_lib.init_params, config), out_shardings=shardings)


def _jit_init_lora(config: MistralConfig, spec: LoraSpec, shardings=None):
    """rng -> LoRA adapters (created sharded under a mesh); compiled once per process for a config and spec."""
    if shardings is not None:
        return jax.jit(lambda rng: model_lib.init_lora(config, spec, rng), out_shardings=shardings)
    return _jit_init_lora_cached(config, spec)


@functools.lru_cache(maxsize=8)
def _jit_init_lora_cached(config: MistralConfig, spec: LoraSpec):
    return jax.jit(lambda rng: model_lib.init_lora(config, spec, rng))


def checkpoint_manager(directory: str, keep: int):
    """Asynchronous orbax CheckpointManager keeping the last `keep` steps plus the best by eval loss (saves
    given metrics {"eval_loss": x}). Leftover temporary directories of a crashed save are removed."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        # BestN sorts ascending and keeps the tail: reverse=True puts the lowest loss last.
        pp.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


# ---- metrics ------------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (+ TensorBoard): one row per logged step. Loss and tokens/s are over the steps since
    the previous row (the loss over all their loss tokens; skipped steps left out)."""

    def __init__(self, path: str, resume_step: int, tensorboard_dir: str | None, log: Callable[[str], None]):
        self.path = path = distributed.output_path(path)  # os.devnull but on process 0
        if not distributed.is_main():
            tensorboard_dir = None
        elif os.path.exists(path):  # rows past the checkpoint we resume from are redone: drop them
            with open(path) as f:
                rows = [line for line in f if line.strip() and _row_step(line) <= resume_step]
            with open(path, "w") as f:
                f.writelines(rows)
        self.file = open(path, "a")
        self.writer = _tensorboard_writer(tensorboard_dir, log) if tensorboard_dir else None
        self._reset(time.perf_counter())

    def _reset(self, now: float):
        self.nll = self.loss_tokens = self.tokens = 0.0
        self.t0 = now

    def add(self, m: dict) -> None:
        if not m["skipped"]:
            self.nll += float(m["loss"]) * float(m["loss_tokens"])
            self.loss_tokens += float(m["loss_tokens"])
        self.tokens += float(m["tokens"])

    def write(self, step: int, m: dict, skipped_total: int, extra: dict) -> dict:
        now = time.perf_counter()
        row = {"step": step, "loss": self.nll / self.loss_tokens if self.loss_tokens else float("nan"),
               "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens_per_s": self.tokens / max(now - self.t0, 1e-9), "skipped": skipped_total, **extra}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step":
                    self.writer.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k}", v, step)
        self._reset(now)
        return row

    def close(self):
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line: dropped


def _tensorboard_writer(logdir: str, log):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("warning: tensorboard asked for, but neither tensorboardX nor tensorboard is installed; "
                "metrics go to metrics.jsonl only")
            return None
    return SummaryWriter(logdir)


# ---- the trainer ----------------------------------------------------------------------------------------------

def _log_stderr(msg: str) -> None:
    if distributed.is_main():  # one process speaks for a multi-host run
        tqdm.write(msg, file=sys.stderr)


class Trainer:
    """Sets up a run (validates the data first, builds the mesh, the optimizer and the checkpoint manager);
    `run()` trains, resuming from the run directory's latest checkpoint when there is one."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = _log_stderr):
        cfg.check_required()
        self.cfg, self.log = cfg, log
        self.config = model_config(cfg)
        if cfg.seq_len > self.config.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {self.config.max_seq_len}")
        self.lora_spec = cfg.lora_spec
        self.tokenizer_path = resolve_tokenizer(cfg)
        tokenizer = Tokenizer.from_file(self.tokenizer_path)
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"tokenizer {self.tokenizer_path} has {tokenizer.vocab_size} pieces, more than the "
                             f"model's vocab_size {self.config.vocab_size}")

        # The whole data set is validated before any weight is read.
        examples, report = load_examples(cfg.train, tokenizer, cfg.seq_len, on_bad=cfg.bad_rows)
        log(report.summary())
        self.data = DataIterator(pack(examples, cfg.seq_len), cfg.batch_size, cfg.seed)
        self.eval_rows = None
        if cfg.eval:
            eval_examples, eval_report = load_examples(cfg.eval, tokenizer, cfg.seq_len, on_bad=cfg.bad_rows)
            log(eval_report.summary())
            self.eval_rows = pack(eval_examples, cfg.seq_len)

        self.mesh = None
        if cfg.mesh or jax.process_count() > 1:  # several processes: the default mesh spans all their devices
            from . import memory_plan, sharding

            self.mesh = sharding.ModelMesh(sharding.make_mesh(cfg.mesh), self.config)
            for note in self.mesh.notes:
                log(f"note: {note}")
            micro = cfg.batch_size // cfg.grad_accum
            if micro % self.mesh.data_parallel_size:
                raise ValueError(f"batch_size / grad_accum = {micro} rows must be a multiple of the data-parallel "
                                 f"size {self.mesh.data_parallel_size} of mesh {cfg.mesh!r}")
            # Activations are those of one microbatch: the plan gets batch_size / grad_accum rows.
            memory_plan.report(memory_plan.training(
                self.config, self.mesh.mesh, "lora" if self.lora_spec else "full", micro, cfg.seq_len,
                base_dtype=cfg.dtype if self.lora_spec else cfg.param_dtype, compute_dtype=cfg.dtype,
                **({"lora_rank": cfg.lora_rank} if self.lora_spec else {})), print_fn=log)

        self.opt_cfg = cfg.optimizer_config()
        self.optimizer = ts.make_optimizer(self.opt_cfg)
        self.ckpt_dir = os.path.abspath(os.path.join(cfg.output, "checkpoints"))
        self.final_dir = os.path.join(cfg.output, "final")
        self.adapter_dir = os.path.join(cfg.output, "final_adapter")

    # ---- state -----------------------------------------------------------------------------------------------
    def _context(self):
        return self.mesh.activate() if self.mesh is not None else contextlib.nullcontext()

    def _trainable_shapes(self):
        if self.lora_spec is None:
            return model_lib.param_shapes(self.config)
        return jax.eval_shape(lambda: model_lib.init_lora(self.config, self.lora_spec, jax.random.key(0)))

    def _init_trainable(self, shardings):
        if self.lora_spec is None:
            return load_base(self.cfg, self.config, self.cfg.param_dtype, shardings)
        return _jit_init_lora(self.config, self.lora_spec, shardings)(
            jax.random.fold_in(jax.random.key(self.cfg.seed), 2))

    def _param_shardings(self):
        return None if self.mesh is None else self.mesh.param_shardings

    def _trainable_shardings(self):
        return None if self.mesh is None else ts.trainable_shardings(self.mesh, self.config, self.lora_spec)

    def _abstract_state(self):
        return jax.eval_shape(lambda p: ts.init_state(p, self.optimizer, self.cfg.seed), self._trainable_shapes())

    def _state_shardings(self, abstract):
        return None if self.mesh is None else ts.state_shardings(self.mesh, abstract, self._trainable_shardings())

    def _batch_shardings(self):
        return None if self.mesh is None else ts.batch_shardings(self.mesh)

    def _place(self, batch):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        return self.mesh.place(batch)

    def _restore(self, manager, step: int, abstract, shardings):
        import orbax.checkpoint as ocp

        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                              shardings if shardings is not None else jax.tree.map(lambda _: default, abstract))
        got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                            data=ocp.args.JsonRestore()))
        return got["state"], got["data"]

    def _save(self, manager, state, step: int, eval_loss: float | None) -> None:
        import orbax.checkpoint as ocp

        # Returns once the arrays are copied off the device buffers (the next step may donate them); the
        # files are written in a background thread.
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(self.data.state())),
                     metrics=None if eval_loss is None else {"eval_loss": eval_loss}, force=True)

    # ---- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, eval_fn, state, frozen) -> float:
        """Eval loss over every loss token of the eval file (packed rows in file order)."""
        rows = self.eval_rows
        n = next(iter(rows.values())).shape[0]
        bs = self.cfg.batch_size // self.cfg.grad_accum
        total = count = 0.0
        for start in range(0, n, bs):
            batch = {}
            for k, a in rows.items():
                batch[k] = np.zeros((bs, a.shape[1]), a.dtype)
                batch[k][: min(bs, n - start)] = a[start:start + bs]
            s, c = jax.device_get(eval_fn(state["params"], frozen, self._place(batch)))
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    # ---- the loop --------------------------------------------------------------------------------------------
    def run(self, until_step: int | None = None) -> str:
        """Trains to `cfg.steps` and writes OUTPUT/final; returns "done". With `until_step`, stops after that
        step as an interruption would (a checkpoint is saved there) and returns "stopped"; SIGTERM does the same
        at the next step boundary ("preempted"). A run directory that already holds a finished run returns
        "done" at once."""
        cfg = self.cfg
        os.makedirs(cfg.output, exist_ok=True)
        manager = checkpoint_manager(self.ckpt_dir, cfg.keep_checkpoints)
        latest = manager.latest_step()
        if latest is not None and latest >= cfg.steps and os.path.isdir(self.final_dir):
            self.log(f"{cfg.output}: already trained to step {latest} with {self.final_dir} written; nothing to do")
            manager.close()
            return "done"
        self._write_run_config(resuming=latest is not None)

        stop = {"signal": False}
        restore_handler = _on_sigterm(lambda: stop.update(signal=True))
        metrics_log = None
        try:
            # Shapes and shardings are worked out before the mesh context: tracing the model's init under it
            # would apply the activation constraints to unsharded abstract values.
            abstract = self._abstract_state()
            state_sh = self._state_shardings(abstract)
            with self._context():
                frozen = None
                if self.lora_spec is not None:
                    frozen = load_base(cfg, self.config, cfg.dtype, self._param_shardings())
                if latest is None:
                    init = functools.partial(ts.init_state, optimizer=self.optimizer, seed=cfg.seed)
                    if state_sh is not None:  # optimizer state created in place on the mesh
                        init = jax.jit(init, out_shardings=state_sh)
                    state = init(self._init_trainable(None if state_sh is None else state_sh["params"]))
                    start = 0
                else:
                    state, data_state = self._restore(manager, latest, abstract, state_sh)
                    self.data.restore(data_state)
                    start = int(state["step"])
                    self.log(f"resuming from {self.ckpt_dir}/{latest} (step {start}, data {data_state})")
                metrics_log = MetricsLog(os.path.join(cfg.output, "metrics.jsonl"), start,
                                         os.path.join(cfg.output, "tensorboard") if cfg.tensorboard else None,
                                         self.log)
                shardings = None
                if self.mesh is not None:
                    frozen_sh = None if frozen is None else self.mesh.param_shardings
                    shardings = (state_sh, frozen_sh, self._batch_shardings())
                step_fn = ts.jit_train_step(self.config, self.opt_cfg, self.lora_spec, cfg.grad_accum, shardings)
                eval_fn = ts.jit_eval_step(self.config, self.lora_spec) if self.eval_rows is not None else None
                status = self._loop(manager, state, frozen, start, until_step, step_fn, eval_fn, metrics_log,
                                    stop)
            return status
        finally:
            restore_handler()
            manager.wait_until_finished()
            manager.close()
            if metrics_log is not None:
                metrics_log.close()

    def _loop(self, manager, state, frozen, start, until_step, step_fn, eval_fn, metrics_log, stop) -> str:
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
                   disable=not cfg.progress or not distributed.is_main(), file=sys.stderr)
        # Metrics of step s are read after step s+1 is dispatched, so the host prepares the next batch while the
        # device runs; pending = (step, device metrics, eval results) of the step not read yet.
        pending = None
        last_saved = start
        best = None
        status = "done"

        def record(step, m_dev, extra):
            m = jax.device_get(m_dev)
            metrics_log.add(m)
            if m["skipped"]:
                self.log(f"step {step}: non-finite loss ({float(m['loss'])}) or gradient norm "
                         f"({float(m['grad_norm'])}); update skipped ({int(m['bad_streak'])} in a row)")
            abort = int(m["bad_streak"]) >= cfg.max_bad_steps
            if step % cfg.log_every == 0 or extra or step == cfg.steps or abort:
                row = metrics_log.write(step, m, int(m["skipped_total"]), extra)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if abort:
                raise NonFiniteLossError(
                    f"{int(m['bad_streak'])} non-finite losses in a row (max_bad_steps={cfg.max_bad_steps}) at "
                    f"step {step}; params are those of the last finite step. Lower the learning rate, check the "
                    f"data, or use float32")

        try:
            for step in range(start + 1, cfg.steps + 1):
                batch = self._place(next(self.data))
                state, m_dev = step_fn(state, frozen, batch)
                if pending is not None:
                    record(*pending)
                extra = {}
                if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                    loss = self.evaluate(eval_fn, state, frozen)
                    extra = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}
                    if best is None or loss < best[1]:
                        best = (step, loss)
                    self.log(f"step {step}: eval loss {loss:.4f}, perplexity {extra['eval_ppl']:.3f}")
                pending = (step, m_dev, extra)
                bar.update(1)
                interrupted = stop["signal"] or (until_step is not None and step >= until_step)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or interrupted:
                    self._save(manager, state, step, extra.get("eval_loss"))
                    last_saved = step
                if interrupted:
                    status = "preempted" if stop["signal"] else "stopped"
                    break
            if pending is not None:
                record(*pending)
        finally:
            bar.close()
        if status != "done":
            self.log(f"{status} at step {last_saved}; run the same command again to resume")
            return status
        if best is not None:
            self.log(f"best eval loss {best[1]:.4f} at step {best[0]}")
        manager.wait_until_finished()
        self.write_final(state, frozen)
        return status

    # ---- outputs ---------------------------------------------------------------------------------------------
    def write_final(self, state, frozen) -> None:
        """OUTPUT/final (merged, with tokenizer.model) and, for LoRA, OUTPUT/final_adapter (PEFT)."""
        if self.lora_spec is None:
            params = state["params"]
        else:
            merge = _jit_merge if self.mesh is None else jax.jit(model_lib.merge_lora, static_argnums=2,
                                                                 out_shardings=self._param_shardings())
            params = merge(frozen, state["params"], self.lora_spec)
        dtype = jax.tree.leaves(params)[0].dtype.name
        save_config = self.config.replace(param_dtype=dtype, remat="none")
        # Each process writes its own shards (one process: checkpoint.save's atomic write).
        distributed.save_params(self.final_dir, params, save_config, tokenizer=self.tokenizer_path)
        self.log(f"wrote {self.final_dir} ({save_config.num_params / 1e6:.1f}M params, {dtype})")
        if self.lora_spec is not None:
            from .peft_export import save_adapter
            from .sharding import fetch

            adapters = fetch(state["params"])  # gathered from every process: the adapters are small
            if distributed.is_main():
                base = self.cfg.init if self.cfg.init not in PRESETS else None
                save_adapter(self.adapter_dir, adapters, self.lora_spec, self.config, base)
            distributed.barrier("mistral_jax.trainer.adapter")
            self.log(f"wrote {self.adapter_dir} (PEFT LoRA adapters)")

    def _write_run_config(self, resuming: bool) -> None:
        if not distributed.is_main():
            return
        path = os.path.join(self.cfg.output, "train_config.json")
        now = self.cfg.to_dict()
        if resuming and os.path.exists(path):
            with open(path) as f:
                before = json.load(f)
            changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
            if set(changed) - _BOOKKEEPING:
                self.log(f"warning: resuming {self.cfg.output} with changed settings: {', '.join(changed)}; "
                         "the run will not equal an uninterrupted one")
            elif changed:
                self.log(f"note: resuming {self.cfg.output} with changed settings: {', '.join(changed)}")
        with open(path, "w") as f:
            json.dump(now, f, indent=2)
            f.write("\n")


_jit_merge = jax.jit(model_lib.merge_lora, static_argnums=2)


# Settings that do not change what is computed: a resumed run may change them and still equal an uninterrupted one.
_BOOKKEEPING = {"output", "eval", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard",
                "progress", "max_bad_steps", "mesh"}


def _on_sigterm(callback: Callable[[], None]) -> Callable[[], None]:
    """Calls `callback` on SIGTERM (a preemption notice) instead of dying; returns the undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda *_: callback())
    return lambda: signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig, until_step: int | None = None, log: Callable[[str], None] = _log_stderr) -> str:
    return Trainer(cfg, log).run(until_step)
