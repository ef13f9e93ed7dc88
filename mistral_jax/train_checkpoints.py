"""The checkpoints of a training run (OUTPUT/checkpoints/<step>): saved with their record, checked against the
run before a resume, restored newest first with a fallback past damaged ones.

Each step holds three orbax items: `state` (train_state.TrainState as a dict of its fields), `data` (the data
iterator's position) and `run` (run_dir.record: batch size, seq_len, training-data fingerprint, a checksum per
array). A step that does not restore, or whose arrays do not match their checksums, is named with its error and
the previous kept step is tried; once one restores, the damaged ones are moved to OUTPUT/damaged_checkpoints
(so the run can save those steps again). When none restores the run stops with run_dir.ResumeError and moves
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np

from . import distributed, run_dir
from .data import DataIterator
from .run_dir import ResumeError
from .train_config import TrainConfig
from .train_state import TrainState


def checkpoint_manager(directory: str, keep: int):
    """Asynchronous orbax CheckpointManager keeping the last `keep` steps plus the best by eval loss (saves
    given metrics {"eval_loss": x}). Leftover temporary directories of a crashed save are removed."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

    policy = pp.AnyPreservationPolicy(
        [
            pp.LatestN(n=keep),
            # BestN sorts ascending and keeps the tail: reverse=True puts the lowest loss last.
            pp.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process: each process reads only its own shards, and all must agree on the
    step they resume from."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


class RunCheckpoints:
    """OUTPUT/checkpoints of the run `cfg`, whose training file has `fingerprint` (run_dir.data_fingerprint)."""

    def __init__(self, cfg: TrainConfig, fingerprint: dict, log: Callable[[str], None]):
        self.cfg, self.fingerprint, self.log = cfg, fingerprint, log
        self.dir = os.path.abspath(os.path.join(cfg.output, "checkpoints"))
        self.manager = checkpoint_manager(self.dir, cfg.keep_checkpoints)

    def steps(self) -> list[int]:
        """Saved steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def _has_record(self, step: int) -> bool:
        return os.path.isdir(os.path.join(self.dir, str(step), run_dir.RECORD))

    def check_resume(self, steps: list[int]) -> list[str]:
        """Before anything is written: refuses (ResumeError) a resume whose batch size, seq_len or training data
        differ from those of the newest checkpoint with a readable record. Returns the settings that changed
        since the previous start and change what is computed (they may explain a failed restore)."""
        import orbax.checkpoint as ocp

        previous = run_dir.previous_config(self.cfg.output)
        for step in steps:
            if self._has_record(step):
                try:
                    got = self.manager.restore(
                        step, args=ocp.args.Composite(**{run_dir.RECORD: ocp.args.JsonRestore()})
                    )
                except Exception:  # a damaged record: restore_newest names it
                    continue
                run_dir.check_resume(got[run_dir.RECORD], step, self.cfg, self.fingerprint)
                break
        else:
            for note in run_dir.check_legacy_resume(previous, steps[0], self.cfg):
                self.log(note)
        return run_dir.changed_settings(previous, self.cfg)[0]

    def _restore(self, step: int, target: dict, with_record: bool) -> tuple[TrainState, dict]:
        import orbax.checkpoint as ocp

        items = {"state": ocp.args.StandardRestore(target), "data": ocp.args.JsonRestore()}
        if with_record:
            items[run_dir.RECORD] = ocp.args.JsonRestore()
        got = self.manager.restore(step, args=ocp.args.Composite(**items))
        if with_record:
            bad = run_dir.mismatch(got["state"], got[run_dir.RECORD]["checksums"])
            if bad is not None:
                raise ValueError(f"checksum mismatch in state{bad}: its bytes changed after it was saved")
        return TrainState.from_dict(got["state"]), got["data"]

    def restore_newest(
        self, steps: list[int], abstract: TrainState, state_sh: TrainState, data: DataIterator, changed: list[str]
    ) -> tuple[int, TrainState]:
        """(step, state) of the newest checkpoint that restores; `data` continues from its position."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
        # Once one step has a record every later one has it: a step without one is damaged.
        with_record = any(self._has_record(s) for s in steps)
        failed = []
        for i, step in enumerate(steps):
            error = None
            try:
                state, data_state = self._restore(step, target.as_dict(), with_record)
            except Exception as e:  # orbax and TensorStore raise many types for a damaged step
                error = e
            if not _everywhere(error is None):
                error = error or ValueError("another process could not restore its shards")
                then = f"; falling back to step {steps[i + 1]}" if i + 1 < len(steps) else ""
                self.log(f"warning: checkpoint {step} of {self.dir} does not restore ({run_dir.one_line(error)}){then}")
                failed.append((step, error))
                continue
            try:
                data.restore(data_state)
            except ValueError:  # checkpoints from before records: the batch size or the data changed
                raise ResumeError(
                    f"cannot resume {self.cfg.output} from step {step}: its data position "
                    f"{data_state} does not fit {self.cfg.train} in batches of {self.cfg.batch_size}; "
                    "run again with the data and batch size it was saved with, or pass a new --output "
                    "to start a new run"
                ) from None
            if failed:
                self._set_aside([s for s, _ in failed])
            self.log(f"resuming from {self.dir}/{step} (step {int(state.step)}, data {data_state})")
            return step, state
        hint = (
            (f"; settings changed since the previous start: {', '.join(changed)} (run again with the previous ones)")
            if changed
            else ""
        )
        raise ResumeError(
            f"no checkpoint of {self.cfg.output} restores (steps {', '.join(map(str, steps))}; step "
            f"{failed[0][0]}: {run_dir.one_line(failed[0][1], 200)}){hint}; move {self.dir} aside to "
            "start the run over"
        )

    def _set_aside(self, steps: list[int]) -> None:
        if distributed.is_main():
            aside = os.path.join(self.cfg.output, "damaged_checkpoints")
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                dst, n = os.path.join(aside, str(step)), 1
                while os.path.exists(dst):
                    dst, n = os.path.join(aside, f"{step}.{n}"), n + 1
                os.replace(os.path.join(self.dir, str(step)), dst)
                self.log(f"moved checkpoint {step} to {dst}")
        distributed.barrier("mistral_jax.train_checkpoints.set_aside")
        self.manager.reload()

    def save(self, state: TrainState, step: int, data_state: dict, eval_loss: float | None) -> None:
        """Returns once the arrays are copied off the device buffers (the next step may donate them); the files
        are written in a background thread."""
        import orbax.checkpoint as ocp

        tree = state.as_dict()
        record = run_dir.record(self.cfg, self.fingerprint, run_dir.checksums(tree))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    "state": ocp.args.StandardSave(tree),
                    "data": ocp.args.JsonSave(data_state),
                    run_dir.RECORD: ocp.args.JsonSave(record),
                }
            ),
            metrics=None if eval_loss is None else {"eval_loss": eval_loss},
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
