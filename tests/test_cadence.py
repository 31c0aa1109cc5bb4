"""train.checkpoint_every_steps=auto: the Young-Daly interval from the checkpoint stall measured in the run."""
from __future__ import annotations

import math
import time

import pytest
import torch

from byol_ray.cadence import AUTO_FIRST_STEPS, Cadence, expected_waste, young_daly_interval_s
from byol_ray.config import ConfigError, derive, load_config
from byol_ray.engine import Reporter, fit
from byol_ray.data.loaders import run_loader
from byol_ray.run_folder import resolve_paths

TINY = ["model.projector_hidden_dim=128", "model.predictor_hidden_dim=128", "model.projector_dim=64",
        "data.loader=memory", "data.num_workers=1", "train.batch_size=64", "train.log_every_steps=1"]


def test_young_daly_interval_is_the_minimum_of_the_expected_waste():
    stall, rate = 12.0, 0.5  # a 12 s checkpoint, an interruption every two hours
    best = young_daly_interval_s(stall, rate)
    assert best == pytest.approx(math.sqrt(2 * 12.0 * 7200.0))  # 415.7 s
    waste = {t: expected_waste(t, stall, rate)["waste_s_per_hour"] for t in (best / 2, best * 0.9, best, best * 1.1,
                                                                              best * 2)}
    assert min(waste, key=waste.get) == best
    assert expected_waste(best, stall, rate)["lost_s_per_interruption"] == pytest.approx(best / 2)
    assert young_daly_interval_s(stall, 0.0) == math.inf  # never interrupted: no mid-epoch checkpoints
    never = Cadence.from_config("auto", 0.0, world_size=1, start_step=0)
    assert never.measured(20, 1.0, 0.1)["checkpoint_interval_steps"] == 0  # said once, though nothing changed
    assert not any(never.due(s) for s in range(21, 10_000))


def test_fixed_cadence_is_unchanged():
    cadence = Cadence.from_config(5, 0.01, world_size=2, start_step=0)
    assert [s for s in range(1, 21) if cadence.due(s)] == [5, 10, 15, 20]
    assert cadence.measured(5, 3.0, 0.1) is None and cadence.every_steps == 5
    assert not any(Cadence.from_config(0, 0.01, 1, 0).due(s) for s in range(1, 50))


def test_auto_measures_first_then_checkpoints_every_young_daly_steps(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    cadence = Cadence.from_config("auto", 0.05, world_size=16, start_step=100)  # 16 workers on 2 nodes
    assert cadence.interruptions_per_hour == pytest.approx(0.1)
    assert not cadence.due(100 + AUTO_FIRST_STEPS - 1) and cadence.due(100 + AUTO_FIRST_STEPS)
    choice = cadence.measured(120, stall_s=5.0, step_time_s=0.5)
    interval = math.sqrt(2 * 5.0 * 36000.0)  # 600 s
    assert cadence.every_steps == round(interval / 0.5) == 1200
    assert choice["checkpoint_interval_steps"] == 1200 and choice["checkpoint_lost_s_per_interruption"] == 300
    assert not cadence.due(1319) and cadence.due(1320)
    # a later, slower checkpoint lengthens the interval (the stall is averaged, the latest weighing half)
    assert cadence.measured(1320, stall_s=15.0, step_time_s=0.5)["checkpoint_stall_s"] == 10.0
    assert cadence.every_steps == round(math.sqrt(2 * 10.0 * 36000.0) / 0.5)
    assert cadence.measured(cadence.next_step, 10.0, 0.5) is None  # unchanged: nothing to log


@pytest.mark.parametrize("value, message", [("sometimes", "must be an integer or 'auto'"),
                                            (-3, ">= 0 (0 = off) or 'auto'")])
def test_bad_setting_is_one_line_naming_the_key(value, message):
    with pytest.raises(ConfigError, match="train.checkpoint_every_steps") as err:
        load_config(["demo"], [f"train.checkpoint_every_steps={value}"])
    assert message in str(err.value)


class SlowCheckpoints(Reporter):
    """A reporter whose checkpoints stall like a slow disk: each takes ``stall_s``."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s, self.steps, self.rows = stall_s, [], []

    def log(self, metrics, step):
        self.rows.append((step, metrics))

    def epoch_end(self, metrics, epoch, state):
        if state is not None:
            time.sleep(self.stall_s)

    def checkpoint(self, metrics, state, notice):
        self.steps.append(state["step"])
        time.sleep(self.stall_s)


def test_a_run_with_auto_cadence_measures_its_stall_and_logs_the_choice(tmp_path, capsys):
    """The real loop: the measuring checkpoint comes AUTO_FIRST_STEPS steps in, the next ones at the interval the
    measured stall and step time give, and the choice reaches the step rows (MLflow's metrics)."""
    cfg = resolve_paths(load_config(["demo"], [*TINY, f"output_dir={tmp_path}", "run_name=t", "train.epochs=1",
                                               "train.checkpoint_every_steps=auto",
                                               "train.interruptions_per_node_hour=20000"]))
    loader = run_loader(cfg, "demo", torch.device("cpu"))
    derived = derive(cfg, loader.num_samples, 1)
    reporter = SlowCheckpoints(stall_s=0.05)
    fit(cfg, derived, loader, torch.device("cpu"), reporter=reporter)
    assert reporter.steps[0] == AUTO_FIRST_STEPS
    chosen = [m for _, m in reporter.rows if "checkpoint_interval_steps" in m]
    assert chosen, "the choice was never logged"
    first = chosen[0]
    assert first["checkpoint_stall_s"] >= 0.05
    # sqrt(2 x stall x 0.18 s) at 20,000 interruptions an hour: a few steps, inside the first epoch
    assert first["checkpoint_interval_s"] == pytest.approx(math.sqrt(2 * first["checkpoint_stall_s"] * 0.18), rel=1e-6)
    interval = int(first["checkpoint_interval_steps"])
    assert derived.steps_per_epoch > AUTO_FIRST_STEPS + interval, (derived.steps_per_epoch, interval)
    assert interval >= 1 and reporter.steps[1] - reporter.steps[0] == interval
    assert "checkpoint cadence (auto): every" in capsys.readouterr().err


def test_the_lost_work_simulation_agrees_with_young_daly():
    """scripts/bench_spot.py's simulation (its figures are labelled as simulated): checkpoints alone cost
    stall/interval, and the Young-Daly interval wastes less than a quarter or four times of it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_spot", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "bench_spot.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    quiet = bench.simulate(stall_s=2.0, restart_s=30.0, rate_per_hour=0.0, interval_s=100.0, work_h=10, seeds=1)
    assert quiet["waste_share"] == pytest.approx(0.02, rel=1e-3) and quiet["lost_s_per_interruption"] == 0
    best = young_daly_interval_s(2.0, 2.0)
    waste = {f: bench.simulate(2.0, 30.0, 2.0, best * f, work_h=50, seeds=40)["waste_share"] for f in (0.25, 1, 4)}
    assert waste[1] < waste[0.25] and waste[1] < waste[4], waste
