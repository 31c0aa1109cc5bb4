"""The progress line of a training run: epoch, step, loss, throughput and an ETA, on stderr."""
from __future__ import annotations

import os
import sys
import time

VERBOSE_ENV = "BYOL_RAY_VERBOSE"  # set by `byol-ray --verbose`: Ray's, Tune's and MLflow's own output comes back


def verbose() -> bool:
    """``byol-ray --verbose`` (or ``BYOL_RAY_VERBOSE=1``) in this process or the one that started it."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def write_line(text: str, stream=None) -> None:
    """``text`` and a newline on ``stream`` (default stderr), flushed: written directly, never through ``print``.

    In its workers Ray Train V2 replaces ``builtins.print`` (``RAY_TRAIN_ENABLE_PRINT_PATCH``, on by default) with
    one that logs the text and, since a Ray worker's ``sys.stderr`` is a wrapper, prints it as well: every line
    twice on the driver and under ``ray job logs``. A write is one line in any process.
    """
    stream = stream or sys.stderr
    stream.write(f"{text}\n")
    stream.flush()


def say(message: str) -> None:
    """One line for a person: stderr, prefixed (stdout is kept for a command's ``--json`` result)."""
    write_line(f"[byol-ray] {message}")


def fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressPrinter:
    """Human-readable progress: epoch, step, loss, throughput, ETA."""

    def __init__(self, total_steps: int, epochs: int, stream=None, *, start_step: int = 0) -> None:
        """``start_step``: the step training starts from (a resumed run's checkpoint step); the rate behind
        the ETA counts the steps done since then, over the time since this printer was made. ``stream``:
        default stderr (stdout carries only a command's ``--json`` result)."""
        self.total_steps, self.epochs, self.stream = total_steps, epochs, stream
        self.start = time.perf_counter()
        self.start_step = start_step

    def line(self, metrics: dict[str, float], step: int) -> str:
        done = step - self.start_step
        rate = done / (time.perf_counter() - self.start)
        eta = (self.total_steps - step) / rate if rate > 0 else 0.0
        parts = [f"epoch {metrics.get('epoch', 0):6.2f}/{self.epochs}", f"step {step}/{self.total_steps}",
                 f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.4g}", f"tau {metrics['tau']:.5f}",
                 f"proj_std {metrics['projection_std']:.4f}"]
        if "classifier_acc" in metrics:
            parts.append(f"probe_acc {metrics['classifier_acc']:.3f}")
        parts += [f"{metrics.get('images_per_s', 0):.0f} img/s", f"ETA {fmt_eta(eta)}"]
        return " | ".join(parts)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        write_line(self.line(metrics, step), self.stream)
