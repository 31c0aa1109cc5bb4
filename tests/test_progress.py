"""The driver's progress line: its ETA comes from the steps done since training (re)started."""
from __future__ import annotations

import io

from byol_ray import progress as run

METRICS = {"epoch": 1.0, "loss": 1.5, "lr": 0.1, "tau": 0.99, "projection_std": 0.04, "images_per_s": 100.0}


def _eta(line: str) -> str:
    return line.rsplit("ETA ", 1)[1]


def test_eta_of_the_first_line_counts_every_step_since_start(monkeypatch):
    clock = iter([0.0, 100.0])
    monkeypatch.setattr(run.time, "perf_counter", lambda: next(clock))
    printer = run.ProgressPrinter(total_steps=2000, epochs=50, stream=io.StringIO())
    # 1000 steps in 100 s, 1000 to go: 100 s left (the first line may come after many steps)
    assert _eta(printer.line(METRICS, 1000)) == "0:01:40"


def test_eta_of_a_resumed_run_counts_only_the_steps_it_trained(monkeypatch):
    clock = iter([0.0, 50.0])
    monkeypatch.setattr(run.time, "perf_counter", lambda: next(clock))
    printer = run.ProgressPrinter(total_steps=2000, epochs=50, stream=io.StringIO(), start_step=1500)
    # resumed at step 1500; 100 steps in 50 s, 400 to go: 200 s
    assert _eta(printer.line(METRICS, 1600)) == "0:03:20"
