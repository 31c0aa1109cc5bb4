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

from byol_ray import dist
from byol_ray.augment import augment_view
from byol_ray.byol import build_byol, update_target
from byol_ray.cadence import Cadence
from byol_ray.config import Config, Derived, to_dict, validation_due
from byol_ray.dist import batch_share
from byol_ray.encoders import build_encoder
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


class Reporter(Protocol):
    """Where the loop sends metrics and checkpoint state: a local printer, Ray Train, or nothing.

    ``epoch_end`` gets the state when a checkpoint is due at an epoch end; ``checkpoint`` a mid-epoch one
    (``train.checkpoint_every_steps``, or a notice from ``poll``). ``poll(step)`` is called after every step
    on every rank and returns a notice (a dict, e.g. an imminent preemption) when a checkpoint must be
    written at once; it must return the same on every rank.
    """

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def epoch_end(self, metrics: dict[str, float], epoch: int, state: dict[str, Any] | None) -> None: ...
    def checkpoint(self, metrics: dict[str, float], state: dict[str, Any], notice: dict[str, Any] | None) -> None: ...
    def poll(self, step: int) -> dict[str, Any] | None: ...


class NullReporter:
    """Discards everything (tests, benchmarks)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def epoch_end(self, metrics: dict[str, float], epoch: int, state: dict[str, Any] | None) -> None:
        pass

    def checkpoint(self, metrics: dict[str, float], state: dict[str, Any], notice: dict[str, Any] | None) -> None:
        pass

    def poll(self, step: int) -> dict[str, Any] | None:
        return None


def pick_device(requested: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; asking for CUDA without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; set train.device=cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class BYOLEngine:
    """Online + target networks, LARS, schedules and the augmentation generator of one worker."""

    def __init__(self, cfg: Config, derived: Derived, device: torch.device) -> None:
        self.cfg, self.derived, self.device = cfg, derived, device
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        m = cfg.model
        encoder = build_encoder(m.encoder, cifar_stem=m.cifar_stem, bn_momentum=m.bn_momentum, bn_eps=m.bn_eps)
        online, target = build_byol(
            encoder, projector_hidden_dim=m.projector_hidden_dim, projector_dim=m.projector_dim,
            predictor_hidden_dim=m.predictor_hidden_dim, use_predictor=m.use_predictor,
            num_classes=m.num_classes if m.online_classifier else 0, bn_momentum=m.bn_momentum, bn_eps=m.bn_eps,
        )
        if self.sync_bn:
            online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
            target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.online = online.to(device, memory_format=memory_format)
        self.target = target.to(device, memory_format=memory_format)
        # Only the online network is wrapped; the EMA reads self.online, never the wrapper. A group of one
        # (Ray Train with 1 worker) is not wrapped: DDP would only add hooks and a self-all-reduce per step.
        self.online_ddp: nn.Module = self.online
        if dist.world_size() > 1:
            self.online_ddp = nn.parallel.DistributedDataParallel(
                self.online, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = LARS(
            param_groups([self.online], cfg.optim.weight_decay), lr=0.0,
            momentum=cfg.optim.momentum, eta=cfg.optim.eta,
        )
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        if device.type != "cuda":
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

    def _phase(self, name: str):
        """A timed section when a benchmark set ``self.phase_timer`` (a callable name -> context manager)."""
        timer = getattr(self, "phase_timer", None)
        return contextlib.nullcontext() if timer is None else timer(name)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, view1_u8: torch.Tensor, view2_u8: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One BYOL step: augment → forward → symmetric loss → backward → LARS → τ update.

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
        with torch.no_grad(), self._phase("augment"):
            view1 = augment_view(view1_u8, aug.view1, self.generator, share=share)
            view2 = augment_view(view2_u8, aug.view2, self.generator, share=share)
            view1 = view1.contiguous(memory_format=self.memory_format)
            view2 = view2.contiguous(memory_format=self.memory_format)
        with self._phase("forward"), self._autocast():
            online = self.online_ddp(view1, view2)
            target_projection1, target_projection2 = self.target(view1), self.target(view2)
            loss = byol_loss(online["prediction1"], online["prediction2"], target_projection1, target_projection2)
            total = loss
            if "logits" in online:
                classifier_loss = F.cross_entropy(online["logits"].float(), labels)
                total = total + classifier_loss

        # DDP averages the ranks' gradients; with unequal shares (a world size that does not divide the global
        # batch) each rank's mean is weighted by its share so that the result is the global batch's mean
        weight = view1_u8.shape[0] * dist.world_size() / global_batch
        with self._phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total * weight if weight != 1.0 else total).backward()
        with self._phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with self._phase("ema"):
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


def fit(cfg: Config, derived: Derived, loader: TwoViewLoader, device: torch.device, *,
        reporter: Reporter | None = None, state: dict[str, Any] | None = None) -> FitResult:
    """Train from ``state`` (or from scratch) to ``cfg.train.epochs``; checkpoints at epoch ends and, with
    ``train.checkpoint_every_steps`` or a notice from ``reporter.poll``, inside epochs.

    Args:
        cfg, derived: the config and its derived values (``derived.world_size`` must match the group).
        loader: a two-view loader yielding uint8 views on ``device``.
        device: where the networks live.
        reporter: receives step logs and epoch-end metrics with checkpoint state.
        state: an :meth:`BYOLEngine.state_dict` to resume from, taken at an epoch end or inside an epoch
            (then the epoch continues at the next global batch; the world size may differ from the one
            that wrote it: the global batches, crops and augmentations do not depend on it).

    Returns:
        A :class:`FitResult`; ``history`` holds one row per epoch.
    """
    reporter = reporter or NullReporter()
    steps_per_epoch = derived.steps_per_epoch
    if len(loader) < steps_per_epoch:
        raise RuntimeError(
            f"loader yields {len(loader)} batches per epoch but the schedule expects {steps_per_epoch}; "
            "the data set or the world size changed since the run was configured"
        )
    engine = BYOLEngine(cfg, derived, device)
    prefix: dict[str, Any] | None = None
    if state is not None:
        engine.load_state_dict(state)
        prefix = state.get("epoch_prefix")
    # mid-epoch checkpoints: every N steps, or 'auto' (Young-Daly from the stall measured here; cadence.py)
    cadence = Cadence.from_config(cfg.train.checkpoint_every_steps, cfg.train.interruptions_per_node_hour,
                                  derived.world_size, engine.step)
    since = (time.perf_counter(), engine.step)  # the end of the last checkpoint (or the start): time, step
    choice: dict[str, float] | None = None  # a new cadence choice, logged with the next step row
    # optional on a reporter (the Protocol's two older methods are all a simple one needs)
    poll = getattr(reporter, "poll", None) or (lambda step: None)
    checkpoint = getattr(reporter, "checkpoint", None)
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
            if engine.step % cfg.train.log_every_steps == 0:
                now = time.perf_counter()
                row = _host(metrics)
                row["images_per_s"] = window_steps * global_batch / (now - window_start)
                row["step_time_s"] = (now - window_start) / window_steps
                row["epoch"] = epoch + (i + 1) / steps_per_epoch
                row["world_size"] = derived.world_size
                if choice is not None:
                    row.update(choice)
                    choice = None
                if device.type == "cuda":
                    row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                reporter.log(row, engine.step)
                window_start, window_steps = now, 0
            notice = poll(engine.step) or notice
            if i + 1 == steps_per_epoch:
                break  # the epoch-end checkpoint below serves a step or notice that falls here
            if checkpoint is not None and (notice is not None or cadence.due(engine.step)):
                # a mid-epoch checkpoint: the epoch's metrics so far travel with it (a collective call)
                state_now = engine.state_dict()
                state_now["epoch_prefix"] = {"steps": skip + done, "means": _with_prefix(
                    prefix, _epoch_means(sums, done, local_batch), done)}
                partial = {**state_now["epoch_prefix"]["means"], "epoch": epoch + (i + 1) / steps_per_epoch,
                           "step": engine.step, "world_size": derived.world_size}
                stall_from = time.perf_counter()
                checkpoint(partial, state_now, notice)
                notice = None
                choice, since = _measure_stall(cadence, engine.step, stall_from, since, device) or choice, \
                    (time.perf_counter(), engine.step)
        engine.epoch = epoch + 1
        elapsed = time.perf_counter() - start
        epoch_metrics = _with_prefix(prefix, _epoch_means(sums, done, local_batch), done)
        prefix = None
        epoch_metrics.update(epoch=engine.epoch, step=engine.step, epoch_time_s=elapsed,
                             images_per_s=done * global_batch / elapsed, world_size=derived.world_size,
                             global_batch=global_batch)
        history.append(epoch_metrics)
        last = engine.epoch == cfg.train.epochs
        due = (last or engine.epoch % cfg.train.checkpoint_every_epochs == 0 or notice is not None
               or cadence.due(engine.step) or validation_due(cfg, engine.epoch))
        stall_from = time.perf_counter()
        reporter.epoch_end(epoch_metrics, engine.epoch, engine.state_dict() if due else None)
        if due and checkpoint is not None:
            choice = _measure_stall(cadence, engine.step, stall_from, since, device) or choice
            since = (time.perf_counter(), engine.step)
    return FitResult(steps=engine.step, epochs=engine.epoch, metrics=epoch_metrics, history=history, engine=engine)
