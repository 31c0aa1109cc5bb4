"""The BYOL training loop in plain PyTorch: build, step, epoch, state. No Ray, MLflow or FFCV imports."""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from byol_ray import dist
from byol_ray.augment import augment_view
from byol_ray.byol import build_networks, update_target
from byol_ray.cadence import Cadence
from byol_ray.config import Config, Derived, to_dict, validation_due
from byol_ray.dist import batch_share
from byol_ray.lars import LARS, param_groups
from byol_ray.loss import byol_loss
from byol_ray.progress import say
from byol_ray.schedules import learning_rate, target_decay


class TwoViewLoader(Protocol):
    """What the loop needs from a loader (see ``byol_ray.data.loaders``)."""

    num_samples: int

    def __iter__(self) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...


class Reporter:
    """Where the loop sends metrics and checkpoint state: a local printer, Ray Train, MLflow, or nothing.

    Every reporter subclasses this one and overrides what it handles; each method is a no-op here. The loop
    calls them directly, in this order within an epoch: ``log`` and ``poll`` after steps, ``checkpoint``
    inside the epoch, ``epoch_end`` at its end.
    """

    def log(self, metrics: dict[str, float], step: int) -> None:
        """A step row (loss, lr, throughput...), every ``train.log_every_steps`` global steps."""

    def epoch_end(self, metrics: dict[str, float], epoch: int, state: dict[str, Any] | None) -> None:
        """The epoch's metrics; ``state`` (a :meth:`BYOLEngine.state_dict`) when a checkpoint is due, else None."""

    def checkpoint(self, metrics: dict[str, float], state: dict[str, Any], notice: dict[str, Any] | None) -> None:
        """A mid-epoch checkpoint (``train.checkpoint_every_steps``, or the ``notice`` that ``poll`` returned);
        ``metrics`` are the epoch's so far. Called only for a reporter that :attr:`writes_checkpoints`."""

    def poll(self, step: int) -> dict[str, Any] | None:
        """Called after every step on every rank: a notice (a dict, e.g. an imminent preemption) when a
        checkpoint must be written at once, else None. It must return the same on every rank."""
        return None

    def replay(self, metrics: dict[str, float]) -> None:
        """A run resumed from its last epoch's checkpoint is not retrained: its final ``metrics`` are reported
        again instead (``session.run``, on every rank), for a launcher that must see them (Ray Train, Tune)."""

    @property
    def writes_checkpoints(self) -> bool:
        """Whether this reporter keeps mid-epoch checkpoints: it overrides :meth:`checkpoint`. For one that
        does not, the loop builds none (no state_dict, no collective epoch means, no stall measurement)."""
        return type(self).checkpoint is not Reporter.checkpoint


class NullReporter(Reporter):
    """Discards everything (tests, benchmarks)."""


def place_networks(online: nn.Module, target: nn.Module, device: torch.device, *, sync_bn: bool, ddp: bool,
                   memory_format: torch.memory_format = torch.contiguous_format) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Ready BYOL's two networks for training on ``device``, in this order: BatchNorm → SyncBatchNorm in both
    networks (``sync_bn``), then onto the device, then DDP around the online network alone (``ddp``), so that
    the module DDP wraps already holds the SyncBatchNorm layers.

    Returns:
        (online, target, online_ddp): the step calls ``online_ddp`` (the DDP wrapper, or ``online`` itself
        without ``ddp``); the EMA and checkpoints read the unwrapped ``online`` (``online_ddp.module``).
    """
    if sync_bn:
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    online = online.to(device, memory_format=memory_format)
    target = target.to(device, memory_format=memory_format)
    online_ddp: nn.Module = online
    if ddp:
        online_ddp = nn.parallel.DistributedDataParallel(
            online, device_ids=[device.index] if device.type == "cuda" else None
        )
    return online, target, online_ddp


class BYOLEngine:
    """Online + target networks, LARS, schedules and the augmentation generator of one worker."""

    def __init__(self, cfg: Config, derived: Derived, device: torch.device) -> None:
        self.cfg, self.derived, self.device = cfg, derived, device
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        online, target = build_networks(cfg.model)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        # A group of one (Ray Train with 1 worker) is not wrapped: DDP would only add hooks and a self-all-reduce
        self.online, self.target, self.online_ddp = place_networks(
            online, target, device, sync_bn=self.sync_bn, ddp=dist.world_size() > 1, memory_format=memory_format)
        # what the step calls for the target's projections; the EMA and checkpoints read self.target
        self.target_forward: nn.Module = self.target
        if cfg.train.compile:  # inductor; compiled wrappers only, so state_dict keys and the EMA are unchanged
            self.online_ddp = torch.compile(self.online_ddp)
            self.target_forward = torch.compile(self.target)
        self.optimizer = LARS(
            param_groups([self.online], cfg.optim.weight_decay), lr=0.0,
            momentum=cfg.optim.momentum, eta=cfg.optim.eta,
        )
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        if device.type != "cuda" and not cfg.train.cpu_autocast:
            self.autocast_dtype = None  # CPU runs fp32: CPU autocast is slower, not faster, here
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype is torch.float16)
        self.generator = torch.Generator(device=device)
        self.memory_format = memory_format
        self.step = 0
        self.epoch = 0

    def reseed_augment(self) -> None:
        """Seed this step's augmentation draws from (seed, global step) alone. The draws are made for the whole
        global batch and each rank keeps its samples' rows (``augment_view(share=...)``), so a run resumed
        at any step, mid-epoch or with another number of workers, draws what an uninterrupted run draws."""
        self.generator.manual_seed(self.cfg.train.seed * 1_000_000_007 + self.step)

    @property
    def sync_bn(self) -> bool:
        """Cross-worker BatchNorm (the paper's); torch's SyncBatchNorm runs on CUDA only, so CPU
        multi-worker runs normalise per worker (``auto``), and ``on`` without CUDA is an error."""
        mode = self.cfg.model.sync_bn
        if mode == "on" and self.device.type != "cuda":
            raise RuntimeError("model.sync_bn=on needs CUDA workers (torch SyncBatchNorm is CUDA-only); "
                               "use model.sync_bn=auto or off on CPU")
        return mode != "off" and dist.world_size() > 1 and self.device.type == "cuda"

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, view1_u8: torch.Tensor, view2_u8: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One BYOL step: augment → forward → symmetric loss → backward → LARS → τ update.

        Each phase is a ``torch.profiler.record_function`` range (``byol.augment``, ``byol.forward``,
        ``byol.backward``, ``byol.optimizer``, ``byol.ema``) that a profiler attributes time to
        (scripts/bench_gpu.py); without an active profiler a range costs about a microsecond.

        Args:
            view1_u8, view2_u8: uint8 [B, 3, H, W] crops of the same images, on the device.
            labels: int64 [B], used only by the online linear probe.

        Returns:
            Detached metric tensors (no host sync here, so the GPU never waits for logging).
        """
        d, aug = self.derived, self.cfg.augment
        lr = learning_rate(self.step, peak_lr=d.peak_lr, warmup_steps=d.warmup_steps, total_steps=d.total_steps)
        tau = target_decay(self.step, tau_base=self.cfg.train.tau_base, total_steps=d.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        self.reseed_augment()
        global_batch = self.cfg.train.batch_size
        share = (batch_share(global_batch, dist.world_size(), dist.rank())[0], global_batch)
        with torch.no_grad(), record_function("byol.augment"):
            view1 = augment_view(view1_u8, aug.view1, self.generator, share=share)
            view2 = augment_view(view2_u8, aug.view2, self.generator, share=share)
            view1 = view1.contiguous(memory_format=self.memory_format)
            view2 = view2.contiguous(memory_format=self.memory_format)
        with record_function("byol.forward"), self._autocast():
            online = self.online_ddp(view1, view2)
            target_projection1, target_projection2 = self.target_forward(view1), self.target_forward(view2)
            loss = byol_loss(online["prediction1"], online["prediction2"], target_projection1, target_projection2)
            total = loss
            if "logits" in online:
                classifier_loss = F.cross_entropy(online["logits"].float(), labels)
                total = total + classifier_loss

        # DDP averages the ranks' gradients; with unequal shares (a world size that does not divide the global
        # batch) each rank's mean is weighted by its share so that the result is the global batch's mean
        weight = view1_u8.shape[0] * dist.world_size() / global_batch
        with record_function("byol.backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total * weight if weight != 1.0 else total).backward()
        with record_function("byol.optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with record_function("byol.ema"):
            update_target(self.target, self.online, tau)
        self.step += 1

        with torch.no_grad():
            z = F.normalize(online["projection1"].float(), dim=-1)
            metrics = {"loss": loss.detach(), "projection_std": z.std(dim=0).mean()}
            if "logits" in online:
                metrics["classifier_loss"] = classifier_loss.detach()
                metrics["classifier_acc"] = (online["logits"].argmax(dim=-1) == labels).float().mean()
        metrics["lr"] = torch.tensor(lr)
        metrics["tau"] = torch.tensor(tau)
        return metrics

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything a restarted worker needs to continue bit-identically (docs/design.md)."""
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "config": to_dict(self.cfg, self.derived),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the target is loaded as saved, never re-copied from online."""
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        rng = state["rng"]
        # RNG states are CPU byte tensors, wherever map_location put the rest of the checkpoint
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])


@dataclass
class FitResult:
    """What a finished (or resumed-and-finished) run reports."""

    steps: int
    epochs: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    engine: BYOLEngine | None = None


def _host(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _epoch_means(sums: dict[str, torch.Tensor], steps: int, batch: int) -> dict[str, float]:
    """Epoch means over the WHOLE group, weighted by each rank's samples (not rank 0's shard alone); with
    several ranks, also the spread of the loss over ranks (``epoch_loss_rank_min/max``). A collective call."""
    keys = sorted(sums)
    # the step's metrics live on the device, except lr and tau (host floats, never copied to the GPU per step)
    device = next((v.device for v in sums.values() if v.device.type != "cpu"), torch.device("cpu"))
    local = torch.stack([sums[k].detach().float().to(device) / max(steps, 1) for k in keys]
                        + [torch.tensor(float(steps * batch), device=device)])
    table = dist.gather(local)  # [world, keys + 1]
    weights = table[:, -1]
    means = (table[:, :-1] * weights[:, None]).sum(0) / weights.sum().clamp_min(1.0)
    out = {f"epoch_{k}": float(v) for k, v in zip(keys, means)}
    if table.shape[0] > 1 and "loss" in sums:
        losses = table[:, keys.index("loss")]
        out.update(epoch_loss_rank_min=float(losses.min()), epoch_loss_rank_max=float(losses.max()))
    return out


def _with_prefix(prefix: dict[str, Any] | None, means: dict[str, float], steps: int) -> dict[str, float]:
    """The epoch's means when its first ``prefix['steps']`` steps ran before a mid-epoch resume (step-weighted;
    the loss spread over ranks is that of the steps run since)."""
    if not prefix or not prefix.get("steps"):
        return means
    before, total = int(prefix["steps"]), int(prefix["steps"]) + steps
    out = dict(means)
    for key, value in prefix["means"].items():
        if key.startswith("epoch_loss_rank_"):
            continue
        out[key] = (value * before + means.get(key, value) * steps) / total if steps else value
    return out


def _measure_stall(cadence: Cadence, step: int, stall_from: float, since: tuple[float, int],
                   device: torch.device) -> dict | None:
    """Feed an ``auto`` cadence one checkpoint: its stall and the step time since the previous one, each the
    slowest rank's (a collective call, at a step where every rank checkpoints), so that every rank picks the
    same next step. Returns the new choice, said once and logged with the next step row."""
    if not cadence.auto or step <= since[1]:
        return None
    measured = torch.tensor([time.perf_counter() - stall_from, (stall_from - since[0]) / (step - since[1])],
                            dtype=torch.float64, device=device)  # on the device: NCCL moves only GPU tensors
    measured = dist.gather(measured).max(dim=0).values.cpu()
    choice = cadence.measured(step, float(measured[0]), float(measured[1]))
    if choice is not None and dist.is_main() and not choice["checkpoint_interval_steps"]:
        say(f"checkpoint cadence (auto): none inside epochs (train.interruptions_per_node_hour=0); measured stall "
            f"{choice['checkpoint_stall_s']:.2f} s")
    elif choice is not None and dist.is_main():
        steps = int(choice["checkpoint_interval_steps"])
        say(f"checkpoint cadence (auto): every {steps} steps (~{choice['checkpoint_interval_s']:.0f} s) for a "
            f"{choice['checkpoint_stall_s']:.2f} s stall at {cadence.interruptions_per_hour:g} interruptions/hour; "
            f"an interruption without notice loses ~{choice['checkpoint_lost_s_per_interruption']:.0f} s of work, "
            f"checkpoints cost {100 * choice['checkpoint_overhead_share']:.1f} %")
    return choice


class _CheckpointClock:
    """When the next mid-epoch checkpoint is due (every N steps, or ``auto``: Young-Daly from the stall measured
    at each checkpoint; cadence.py) and the cadence choice that goes out with the next step row."""

    def __init__(self, cadence: Cadence, step: int) -> None:
        self.cadence = cadence
        self.since = (time.perf_counter(), step)  # the end of the last checkpoint (or the start): time, step
        self.choice: dict[str, float] | None = None  # a new cadence choice, logged with the next step row

    def due(self, step: int, notice: dict[str, Any] | None) -> bool:
        return notice is not None or self.cadence.due(step)

    def checkpointed(self, step: int, stall_from: float, device: torch.device) -> None:
        """A checkpoint whose stall began at ``stall_from`` has been handed over (a collective call)."""
        self.choice = _measure_stall(self.cadence, step, stall_from, self.since, device) or self.choice
        self.since = (time.perf_counter(), step)

    def take_choice(self) -> dict[str, float] | None:
        choice, self.choice = self.choice, None
        return choice


def _step_row(metrics: dict[str, torch.Tensor], *, window_s: float, window_steps: int, global_batch: int,
              epoch: float, world_size: int, choice: dict[str, float] | None, device: torch.device) -> dict[str, float]:
    """A step's log row: its metrics, the throughput over the steps since the previous row, where in the run it
    lies (``epoch`` as a fraction), a new cadence choice if any, and the peak GPU memory."""
    row = _host(metrics)
    row["images_per_s"] = window_steps * global_batch / window_s
    row["step_time_s"] = window_s / window_steps
    row["epoch"] = epoch
    row["world_size"] = world_size
    if choice is not None:
        row.update(choice)
    if device.type == "cuda":
        row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _mid_epoch_state(engine: BYOLEngine, prefix: dict[str, Any] | None, sums: dict[str, torch.Tensor], done: int,
                     skip: int, local_batch: int) -> dict[str, Any]:
    """The state of a mid-epoch checkpoint: the engine's, and the epoch's metrics so far (``epoch_prefix``: its
    steps and means, those before a mid-epoch resume included), which a resume continues. A collective call."""
    state_now = engine.state_dict()
    state_now["epoch_prefix"] = {"steps": skip + done, "means": _with_prefix(
        prefix, _epoch_means(sums, done, local_batch), done)}
    return state_now


def fit(cfg: Config, derived: Derived, loader: TwoViewLoader, device: torch.device, *,
        reporter: Reporter | None = None, state: dict[str, Any] | None = None) -> FitResult:
    """Train from ``state`` (or from scratch) to ``cfg.train.epochs``; checkpoints at epoch ends and, with
    ``train.checkpoint_every_steps`` or a notice from ``reporter.poll``, inside epochs.

    Args:
        cfg, derived: the config and its derived values (``derived.world_size`` must match the group).
        loader: a two-view loader yielding uint8 views on ``device``.
        device: where the networks live.
        reporter: a :class:`Reporter`: receives step logs, epoch-end metrics and checkpoint state.
        state: an :meth:`BYOLEngine.state_dict` to resume from, taken at an epoch end or inside an epoch
            (then the epoch continues at the next global batch; the world size may differ from the one
            that wrote it: the global batches, crops and augmentations do not depend on it).

    Returns:
        A :class:`FitResult`; ``history`` holds one row per epoch.
    """
    reporter = reporter or NullReporter()
    if not isinstance(reporter, Reporter):
        raise TypeError(f"reporter {type(reporter).__name__} must subclass byol_ray.engine.Reporter")
    steps_per_epoch = derived.steps_per_epoch
    if len(loader) < steps_per_epoch:
        raise RuntimeError(
            f"loader yields {len(loader)} batches per epoch but the schedule expects {steps_per_epoch}; "
            "the data set or the world size changed since the run was configured"
        )
    engine = BYOLEngine(cfg, derived, device)
    prefix: dict[str, Any] | None = None  # the metrics of the epoch's steps before a mid-epoch resume
    if state is not None:
        engine.load_state_dict(state)
        prefix = state.get("epoch_prefix")
    clock = _CheckpointClock(Cadence.from_config(cfg.train.checkpoint_every_steps, cfg.train.interruptions_per_node_hour,
                                                 derived.world_size, engine.step), engine.step)
    writes_checkpoints = reporter.writes_checkpoints
    history: list[dict[str, float]] = []
    epoch_metrics: dict[str, float] = {}
    global_batch = cfg.train.batch_size
    local_batch = getattr(loader, "batch_size", derived.per_worker_batch)  # this rank's share
    for epoch in range(engine.epoch, cfg.train.epochs):
        skip = engine.step - epoch * steps_per_epoch  # > 0: resumed inside this epoch
        if not 0 <= skip < steps_per_epoch:
            raise RuntimeError(f"checkpoint at step {engine.step} does not lie in epoch {epoch} of "
                               f"{steps_per_epoch} steps: it was written with another data set or batch size")
        loader.set_epoch(epoch, skip_batches=skip)
        sums: dict[str, torch.Tensor] = {}
        start, window_start, window_steps, done = time.perf_counter(), time.perf_counter(), 0, 0
        notice: dict[str, Any] | None = None
        for i, (view1, view2, labels) in enumerate(loader, start=skip):
            if i == steps_per_epoch:
                break
            metrics = engine.train_step(view1, view2, labels)
            done += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            window_steps += 1
            progress = epoch + (i + 1) / steps_per_epoch
            if engine.step % cfg.train.log_every_steps == 0:
                now = time.perf_counter()
                reporter.log(_step_row(metrics, window_s=now - window_start, window_steps=window_steps,
                                       global_batch=global_batch, epoch=progress, world_size=derived.world_size,
                                       choice=clock.take_choice(), device=device), engine.step)
                window_start, window_steps = now, 0
            notice = reporter.poll(engine.step) or notice
            if i + 1 == steps_per_epoch:
                break  # the epoch-end checkpoint below serves a step or notice that falls here
            if writes_checkpoints and clock.due(engine.step, notice):
                state_now = _mid_epoch_state(engine, prefix, sums, done, skip, local_batch)
                partial = {**state_now["epoch_prefix"]["means"], "epoch": progress, "step": engine.step,
                           "world_size": derived.world_size}
                stall_from = time.perf_counter()
                reporter.checkpoint(partial, state_now, notice)
                notice = None
                clock.checkpointed(engine.step, stall_from, device)
        engine.epoch = epoch + 1
        elapsed = time.perf_counter() - start
        epoch_metrics = _with_prefix(prefix, _epoch_means(sums, done, local_batch), done)
        prefix = None
        epoch_metrics.update(epoch=engine.epoch, step=engine.step, epoch_time_s=elapsed,
                             images_per_s=done * global_batch / elapsed, world_size=derived.world_size,
                             global_batch=global_batch, torch_threads=torch.get_num_threads())
        history.append(epoch_metrics)
        last = engine.epoch == cfg.train.epochs
        due = (last or engine.epoch % cfg.train.checkpoint_every_epochs == 0 or clock.due(engine.step, notice)
               or validation_due(cfg, engine.epoch))
        stall_from = time.perf_counter()
        reporter.epoch_end(epoch_metrics, engine.epoch, engine.state_dict() if due else None)
        if due and writes_checkpoints:
            clock.checkpointed(engine.step, stall_from, device)
    return FitResult(steps=engine.step, epochs=engine.epoch, metrics=epoch_metrics, history=history, engine=engine)
