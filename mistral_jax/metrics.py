"""metrics.jsonl (and TensorBoard) of a training run: one row per logged step, cut back to the resumed step
when a run resumes so that every step appears once; loss.png beside it, drawn from those rows."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

from . import distributed


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
        row = {
            "step": step,
            "loss": self.nll / self.loss_tokens if self.loss_tokens else float("nan"),
            "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]),
            "tokens_per_s": self.tokens / max(now - self.t0, 1e-9),
            "skipped": skipped_total,
            **extra,
        }
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


def plot_loss(metrics_path: str, png_path: str, log: Callable[[str], None]) -> bool:
    """Draws the training and eval loss by step from metrics.jsonl into `png_path` (matplotlib's Agg canvas);
    returns False, with a one-line note, where matplotlib is not installed."""
    try:
        # A Figure of its own, not pyplot: the process's backend (a notebook's inline plots) is left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log(f"note: matplotlib is not installed; {png_path} not drawn (pip install matplotlib)")
        return False
    train, evals = [], []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"]):
                train.append((row["step"], row["loss"]))
            if isinstance(row.get("eval_loss"), (int, float)):
                evals.append((row["step"], row["eval_loss"]))
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp"
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)  # a reader never sees a half-written image
    return True


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
            log(
                "warning: tensorboard asked for, but neither tensorboardX nor tensorboard is installed; "
                "metrics go to metrics.jsonl only"
            )
            return None
    return SummaryWriter(logdir)
