"""The fine-tuning loop: data -> jitted train step -> orbax checkpoints, eval, metrics -> an inference checkpoint.

  cfg = TrainConfig.load("configs/demo.yaml", steps=100)
  Trainer(cfg).run()

A run directory (`output`) holds:
  checkpoints/<step>/   orbax checkpoints: train state, data position, and the record a resume is checked
                        against (train_checkpoints.py). Saved asynchronously every `checkpoint_every` steps; the
                        last `keep_checkpoints` are kept, plus the one with the best eval loss. Orbax writes a
                        step into a temporary directory and renames it when complete, so a crash mid-save leaves
                        the previous step intact (tests/test_trainer.py kills a run mid-save).
  damaged_checkpoints/  steps that failed to restore (or to match their checksums), moved aside on resume
  metrics.jsonl         one row per logged step (metrics.py)
  loss.png              training and eval loss by step, redrawn from metrics.jsonl when a run ends or stops
                        (needs matplotlib; skipped with a note without it)
  train_config.json     the TrainConfig the run started with
  config_history.jsonl  one row per start or resume: the settings, and which changed (run_dir.py)
  final/                merged (LoRA folded in) inference checkpoint with tokenizer.model: infer.generate,
                        infer.score and infer.convert read it
  final_adapter/        LoRA runs: the adapters alone in the PEFT format (checkpoint/peft.py)

The trainable tree is the params (full fine-tuning) or the LoRA adapters over a frozen base kept in the compute
dtype. Every run is laid out on a sharding.ModelMesh (default: every device on fsdp; one device is a mesh of
one). Running the same command again resumes from the latest checkpoint: trainable tree, optimizer state,
step, RNG and data position, so the losses match those of an uninterrupted run. A resume is checked before
anything is written: the batch size, seq_len and training data must be those the checkpoint was saved with
(run_dir.ResumeError otherwise). A checkpoint that does not restore is named with its error, and the run falls
back to the previous kept one; ResumeError when none restores.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import threading
from collections.abc import Callable

import jax
import numpy as np
from tqdm import tqdm

from . import checkpoint, distributed, memory_plan, run_dir, sharding
from . import lora as lora_lib
from . import train_step as ts
from .config import PRESETS, MistralConfig
from .data import DataIterator, load_examples, pack
from .metrics import MetricsLog, plot_loss
from .run_dir import ResumeError
from .tokenizer import Tokenizer
from .train_checkpoints import RunCheckpoints, checkpoint_manager
from .train_config import TrainConfig, model_config, resolve_tokenizer
from .train_state import TrainState

__all__ = ["NonFiniteLossError", "ResumeError", "TrainConfig", "Trainer", "checkpoint_manager", "load_base", "train"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops instead of skipping batches forever."""


def load_base(cfg: TrainConfig, config: MistralConfig, dtype: str, mm: sharding.ModelMesh):
    """The starting weights in `dtype`, laid out on `mm`: random (seeded) for a preset, else the checkpoint's."""
    if cfg.init in PRESETS:
        return mm.init_params(jax.random.fold_in(jax.random.key(cfg.seed), 1), dtype)
    return checkpoint.load_params(cfg.init, config, dtype=dtype, shardings=mm.param_shardings)


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
        self.numerics = cfg.numerics
        self.lora_spec = cfg.lora
        if cfg.seq_len > self.config.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {self.config.max_seq_len}")
        self.tokenizer_path = resolve_tokenizer(cfg)
        tokenizer = Tokenizer.from_file(self.tokenizer_path)
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"tokenizer {self.tokenizer_path} has {tokenizer.vocab_size} pieces, more than the "
                f"model's vocab_size {self.config.vocab_size}"
            )

        # The whole data set is validated before any weight is read.
        examples, report = self._load_examples(cfg.train, tokenizer)
        self.train_fingerprint = run_dir.data_fingerprint(cfg.train, report.total)
        self.data = DataIterator(pack(examples, cfg.seq_len), cfg.batch_size, cfg.seed)
        self.eval_rows = None
        if cfg.eval:
            self.eval_rows = pack(self._load_examples(cfg.eval, tokenizer)[0], cfg.seq_len)

        self.mm = sharding.ModelMesh.build(self.config, cfg.mesh)
        for note in self.mm.notes:
            log(f"note: {note}")
        micro = cfg.batch_size // cfg.grad_accum
        if micro % self.mm.data_parallel_size:
            mesh_name = cfg.mesh or sharding.describe(self.mm.mesh)
            raise ValueError(
                f"batch_size / grad_accum = {micro} rows must be a multiple of the data-parallel "
                f"size {self.mm.data_parallel_size} of mesh {mesh_name!r}"
            )
        # Activations are those of one microbatch: the plan gets batch_size / grad_accum rows.
        lora = self.lora_spec
        memory_plan.report(
            memory_plan.training(
                self.config,
                self.mm.mesh,
                "lora" if lora else "full",
                micro,
                cfg.seq_len,
                base_dtype=self.numerics.dtype if lora else self.numerics.param_dtype,
                compute_dtype=self.numerics.dtype,
                numerics=self.numerics,
                grad_accum=cfg.grad_accum,
                mu_dtype=cfg.optimizer.mu_dtype,
                **({"lora_rank": lora.rank} if lora else {}),
            ),
            print_fn=log,
        )

        self.opt_cfg = cfg.optimizer_config()
        self.optimizer = ts.make_optimizer(self.opt_cfg)
        self.final_dir = os.path.join(cfg.output, "final")
        self.adapter_dir = os.path.join(cfg.output, "final_adapter")

    def _load_examples(self, path: str, tokenizer: Tokenizer):
        """Every row validated; the report logged; bad rows refused in one line when bad_rows is "error"."""
        examples, report = load_examples(path, tokenizer, self.cfg.seq_len, on_bad="skip")
        self.log(report.summary())
        if report.bad and self.cfg.bad_rows == "error":
            raise ValueError(
                f"{path}: {len(report.bad)} bad rows (the first on line {report.bad[0][0]}); fix "
                "them, or set bad_rows: skip to train without them"
            )
        return examples, report

    # ---- state -----------------------------------------------------------------------------------------------
    def _init_trainable(self, shardings):
        """Full fine-tuning: the base weights in param_dtype. LoRA: fresh adapters (B = 0)."""
        if self.lora_spec is None:
            return load_base(self.cfg, self.config, self.numerics.param_dtype, self.mm)
        init = jax.jit(functools.partial(lora_lib.init_lora, self.config, self.lora_spec), out_shardings=shardings)
        return init(jax.random.fold_in(jax.random.key(self.cfg.seed), 2))

    def _init_state(self, state_sh: TrainState) -> TrainState:
        init = jax.jit(
            functools.partial(TrainState.create, optimizer=self.optimizer, seed=self.cfg.seed), out_shardings=state_sh
        )  # optimizer state created in place on the mesh
        return init(self._init_trainable(state_sh.params))

    # ---- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, eval_fn, state: TrainState, frozen) -> float:
        """Eval loss over every loss token of the eval file (packed rows in file order)."""
        rows = self.eval_rows
        n = next(iter(rows.values())).shape[0]
        bs = self.cfg.batch_size // self.cfg.grad_accum
        total = count = 0.0
        for start in range(0, n, bs):
            batch = {}
            for k, a in rows.items():
                batch[k] = np.zeros((bs, a.shape[1]), a.dtype)
                batch[k][: min(bs, n - start)] = a[start : start + bs]
            s, c = jax.device_get(eval_fn(state.params, frozen, self.mm.place(batch)))
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
        ckpts = RunCheckpoints(cfg, self.train_fingerprint, self.log)
        steps = ckpts.steps()
        if steps and steps[0] >= cfg.steps and os.path.isdir(self.final_dir):
            self.log(f"{cfg.output}: already trained to step {steps[0]} with {self.final_dir} written; nothing to do")
            ckpts.close()
            return "done"
        try:
            changed = ckpts.check_resume(steps) if steps else []  # before anything is written
        except BaseException:
            ckpts.close()
            raise

        stop = {"signal": False}
        restore_handler = _on_sigterm(lambda: stop.update(signal=True))
        metrics_log = None
        try:
            abstract, state_sh = ts.layout(self.mm, self.config, self.numerics, self.opt_cfg, self.lora_spec)
            with self.mm.activate():
                frozen = None
                if self.lora_spec is not None:
                    frozen = load_base(cfg, self.config, self.numerics.dtype, self.mm)
                if not steps:
                    state, start = self._init_state(state_sh), 0
                    run_dir.record_start(cfg, None, self.log)
                else:
                    step, state = ckpts.restore_newest(steps, abstract, state_sh, self.data, changed)
                    start = int(state.step)
                    run_dir.record_start(cfg, step, self.log)
                metrics_log = MetricsLog(
                    os.path.join(cfg.output, "metrics.jsonl"),
                    start,
                    os.path.join(cfg.output, "tensorboard") if cfg.tensorboard else None,
                    self.log,
                )
                step_fn = ts.jit_train_step(
                    self.config,
                    self.opt_cfg,
                    numerics=self.numerics,
                    lora_spec=self.lora_spec,
                    grad_accum=cfg.grad_accum,
                    mm=self.mm,
                )
                eval_fn = None
                if self.eval_rows is not None:
                    eval_fn = ts.jit_eval_step(self.config, self.numerics, self.lora_spec)
                return self._loop(ckpts, state, frozen, start, until_step, step_fn, eval_fn, metrics_log, stop)
        finally:
            restore_handler()
            ckpts.close()
            if metrics_log is not None:
                metrics_log.close()
                self._plot_loss()

    def _loop(
        self, ckpts: RunCheckpoints, state, frozen, start, until_step, step_fn, eval_fn, metrics_log, stop
    ) -> str:
        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc="train",
            unit="step",
            disable=not cfg.progress or not distributed.is_main(),
            file=sys.stderr,
        )
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
                self.log(
                    f"step {step}: non-finite loss ({float(m['loss'])}) or gradient norm "
                    f"({float(m['grad_norm'])}); update skipped ({int(m['bad_streak'])} in a row)"
                )
            abort = int(m["bad_streak"]) >= cfg.max_bad_steps
            if step % cfg.log_every == 0 or extra or step == cfg.steps or abort:
                row = metrics_log.write(step, m, int(m["skipped_total"]), extra)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if abort:
                raise NonFiniteLossError(
                    f"{int(m['bad_streak'])} non-finite losses in a row (max_bad_steps={cfg.max_bad_steps}) at "
                    f"step {step}; params are those of the last finite step. Lower the learning rate, check the "
                    f"data, or use float32"
                )

        try:
            for step in range(start + 1, cfg.steps + 1):
                batch = self.mm.place(next(self.data))
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
                    ckpts.save(state, step, self.data.state(), extra.get("eval_loss"))
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
        ckpts.wait()
        self.write_final(state, frozen)
        return status

    # ---- outputs ---------------------------------------------------------------------------------------------
    def _plot_loss(self) -> None:
        """OUTPUT/loss.png on process 0; a failure to draw it is a warning, never the run's failure."""
        if not distributed.is_main():
            return
        path = os.path.join(self.cfg.output, "loss.png")
        try:
            plot_loss(os.path.join(self.cfg.output, "metrics.jsonl"), path, self.log)
        except (OSError, ValueError, RuntimeError) as e:
            self.log(f"warning: {path} not drawn: {run_dir.one_line(e)}")

    def write_final(self, state: TrainState, frozen) -> None:
        """OUTPUT/final (merged, with tokenizer.model) and, for LoRA, OUTPUT/final_adapter (PEFT)."""
        if self.lora_spec is None:
            params = state.params
        else:
            merge = jax.jit(lora_lib.merge_lora, static_argnums=2, out_shardings=self.mm.param_shardings)
            params = merge(frozen, state.params, self.lora_spec)
        dtype = jax.tree.leaves(params)[0].dtype.name
        # Each process writes its own shards (one process: an atomic write).
        checkpoint.save(self.final_dir, params, self.config, tokenizer=self.tokenizer_path)
        self.log(f"wrote {self.final_dir} ({self.config.num_params / 1e6:.1f}M params, {dtype})")
        if self.lora_spec is not None:
            adapters = self.mm.fetch(state.params)  # gathered from every process: the adapters are small
            if distributed.is_main():
                base = self.cfg.init if self.cfg.init not in PRESETS else None
                checkpoint.save_adapter(self.adapter_dir, adapters, self.lora_spec, self.config, base)
            distributed.barrier("mistral_jax.trainer.adapter")
            self.log(f"wrote {self.adapter_dir} (PEFT LoRA adapters)")


def _on_sigterm(callback: Callable[[], None]) -> Callable[[], None]:
    """Calls `callback` on SIGTERM (a preemption notice) instead of dying; returns the undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda *_: callback())
    return lambda: signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig, until_step: int | None = None, log: Callable[[str], None] = _log_stderr) -> str:
    return Trainer(cfg, log).run(until_step)
