"""How often a run checkpoints inside an epoch: a fixed number of steps, or ``auto`` by the Young–Daly rule.

A checkpoint stalls training for ``C`` seconds; an interruption that comes without a notice (a node that
dies, a notice that never reached Ray) loses the work since the last checkpoint, on average half an
interval. Checkpointing every ``T`` seconds costs ``C / T`` of the run and loses ``T / 2`` per interruption;
with interruptions every ``M`` seconds on average, the total waste is smallest at

    T = sqrt(2 * C * M)                 (Young 1974; Daly 2006, first order in C / M)

``train.checkpoint_every_steps=auto`` measures ``C`` (the slowest rank's checkpoint stall) and the step time in
this run, takes ``M`` from ``train.interruptions_per_node_hour`` and the number of nodes, and checkpoints every
``round(T / step time)`` steps. The first measurement is a checkpoint ``AUTO_FIRST_STEPS`` steps after the
start (or the resume); every later checkpoint, epoch ends included, refines it. All ranks use the same
interval (the measurements are reduced over the group), since a checkpoint is a collective call.

A notice that reaches Ray in time (``byol-ray spot-watch``) loses nothing whatever the interval: the run
checkpoints at the notice's step. The interval bounds the loss for the interruptions that come without one.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

AUTO_FIRST_STEPS = 20  # the measuring checkpoint, this many steps after the start or resume


def young_daly_interval_s(stall_s: float, interruptions_per_hour: float) -> float:
    """The checkpoint interval (seconds) that minimises expected waste: ``sqrt(2 * C * M)``."""
    if interruptions_per_hour <= 0:
        return math.inf
    return math.sqrt(2.0 * stall_s * 3600.0 / interruptions_per_hour)


def expected_waste(interval_s: float, stall_s: float, interruptions_per_hour: float) -> dict[str, float]:
    """Per hour of training at this interval: checkpoint overhead, and the work lost per interruption
    without notice (half an interval on average, plus the stall of the checkpoint it falls into)."""
    overhead = stall_s / interval_s if math.isfinite(interval_s) and interval_s > 0 else 0.0
    lost = interval_s / 2 if math.isfinite(interval_s) else math.inf
    return {"overhead_share": overhead, "lost_s_per_interruption": lost,
            "waste_s_per_hour": 3600.0 * overhead + interruptions_per_hour * lost}


def nodes_in_group(world_size: int) -> int:
    """Nodes the worker group spans (Ray Train sets LOCAL_WORLD_SIZE per node; without it every worker
    counts as a node, the pessimistic reading)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, math.ceil(world_size / max(local, 1)))


@dataclass
class Cadence:
    """Decides at which steps the engine writes a mid-epoch checkpoint (epoch ends are decided apart)."""

    every_steps: int  # the interval in force (0 = none inside epochs)
    auto: bool = False
    interruptions_per_hour: float = 0.0  # the group's: per node-hour x nodes
    next_step: int = 0  # auto: the step of the next checkpoint
    stall_s: float = math.nan
    step_time_s: float = math.nan
    interval_s: float = math.nan

    @classmethod
    def from_config(cls, setting: int | str, interruptions_per_node_hour: float, world_size: int,
                    start_step: int) -> "Cadence":
        if setting != "auto":
            return cls(every_steps=int(setting))
        rate = interruptions_per_node_hour * nodes_in_group(world_size)
        return cls(every_steps=0, auto=True, interruptions_per_hour=rate, next_step=start_step + AUTO_FIRST_STEPS)

    def due(self, step: int) -> bool:
        if self.auto:
            return step >= self.next_step
        return bool(self.every_steps) and step % self.every_steps == 0

    def measured(self, step: int, stall_s: float, step_time_s: float) -> dict[str, float] | None:
        """Record one checkpoint's stall and the step time around it (already reduced over the group, so
        every rank computes the same interval). Returns the new choice (to log) when it changed."""
        if not self.auto or not (stall_s >= 0 and step_time_s > 0):
            return None
        # the stall: the most recent measurement weighs most, a single slow one does not dominate
        first = math.isnan(self.stall_s)  # the first choice is always said, even "none inside epochs"
        self.stall_s = stall_s if first else 0.5 * (self.stall_s + stall_s)
        self.step_time_s = step_time_s
        self.interval_s = young_daly_interval_s(self.stall_s, self.interruptions_per_hour)
        steps = max(1, round(self.interval_s / step_time_s)) if math.isfinite(self.interval_s) else 0
        changed = first or steps != self.every_steps
        self.every_steps = steps
        self.next_step = step + steps if steps else math.inf
        if not changed:
            return None
        waste = expected_waste(self.interval_s, self.stall_s, self.interruptions_per_hour)
        choice = {"checkpoint_interval_steps": float(steps), "checkpoint_interval_s": self.interval_s,
                  "checkpoint_stall_s": self.stall_s, "checkpoint_lost_s_per_interruption":
                  waste["lost_s_per_interruption"], "checkpoint_overhead_share": waste["overhead_share"]}
        return {k: v for k, v in choice.items() if math.isfinite(v)}  # metrics: no infinities (rate 0)
