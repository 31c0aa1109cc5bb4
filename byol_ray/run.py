"""What every way of running shares: absolute paths, run folders, data resolution, progress, checkpoints."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from byol_ray.checkpoint import save_checkpoint
from byol_ray.config import Config, ConfigError


def resolve_paths(cfg: Config) -> Config:
    """Make every path absolute and give the run a name, so Ray workers (which chdir) find them.

    Returns:
        A new config; ``cfg`` is not modified.
    """
    run_name = cfg.run_name or time.strftime("byol-%Y%m%d-%H%M%S")
    output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    train = cfg.data.train
    if train != "demo" and "://" not in train:
        train = str(Path(train).expanduser().resolve())
    storage = cfg.ray.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return dataclasses.replace(
        cfg,
        run_name=run_name,
        output_dir=output_dir,
        data=dataclasses.replace(cfg.data, train=train, cache_dir=str(Path(cfg.data.cache_dir).expanduser().resolve())),
        ray=dataclasses.replace(cfg.ray, storage_path=storage),
    )


def probe_writable(folder: Path, prefix: str = ".write-test") -> None:
    """Create ``folder`` and write/remove a probe file in it; raises ``OSError`` when that fails."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{prefix}-{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()


def run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def check_data_source(cfg: Config) -> None:
    """Fail before any worker starts when the training data cannot be found or read by this backend."""
    train = cfg.data.train
    if train == "demo":
        return
    path = Path(train)
    if not path.exists():
        raise ConfigError(
            f"data.train={train!r} does not exist; point it at an image folder, a CIFAR folder or a .beton "
            "written by `byol-ray prepare`"
        )
    if path.suffix == ".beton" and cfg.data.loader in ("torch", "memory"):
        raise ConfigError(
            f"data.train={train!r} is a .beton file, which only the FFCV loader reads (data.loader="
            f"{cfg.data.loader} reads source images); set data.loader=ffcv or point data.train at the source "
            "image folder"
        )


def training_file(cfg: Config, *, is_main: bool = True, wait_s: float = 600.0) -> str:
    """The path the loader reads: the .beton itself, or one prepared once into the cache.

    With the FFCV loader a non-.beton source is converted on first use into
    ``data.cache_dir/<source>-<fingerprint>-<max side>px.beton``; other ranks wait for it.
    With the torch and memory loaders the source itself is returned.
    """
    from byol_ray.data import prepare as prep
    from byol_ray.data import sources

    check_data_source(cfg)
    train = cfg.data.train
    if cfg.data.loader in ("torch", "memory") or train.endswith(".beton"):
        return train
    fp = sources.fingerprint(train)
    stem = "demo" if train == "demo" else Path(train).name
    max_resolution = max(cfg.data.resolution, 32)
    out = Path(cfg.data.cache_dir) / f"{stem}-{fp['sha256'][:12]}-{max_resolution}px.beton"
    if out.exists():
        return str(out)
    if is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"[byol-ray] preparing {train} -> {out} (once; later runs reuse it)", flush=True)
        prep.prepare(train, str(out), max_resolution=max_resolution, progress=False)
    else:
        deadline = time.monotonic() + wait_s
        while not out.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not finish preparing {out} within {wait_s:.0f}s")
            time.sleep(1.0)
    return str(out)


def data_fingerprint(cfg: Config, path: str) -> dict[str, Any]:
    """What the run trained on, for MLflow tags and the model card (no image is decoded).

    A .beton carries its source's fingerprint in the ``<file>.json`` written by ``byol-ray prepare``.
    """
    sidecar = Path(f"{path}.json")
    if path.endswith(".beton"):
        if not sidecar.exists():
            return {"file": path}
        info = json.loads(sidecar.read_text()).get("source", {})
    else:
        from byol_ray.data import sources

        info = sources.fingerprint(cfg.data.train)
    return {k: v for k, v in info.items() if k != "class_names"}


def read_history(folder: Path) -> list[dict[str, float]]:
    """All epoch rows of a run, across restarts (the last row wins for a repeated epoch)."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["epoch"]] = row
    return [rows[k] for k in sorted(rows)]


def with_history(result, folder: Path):
    """``result`` with every epoch row of the run (across restarts) and, when this process trained no
    epoch (a finished run resumed again), the last row as its final metrics."""
    import dataclasses

    history = read_history(folder)
    return dataclasses.replace(result, history=history, metrics=result.metrics or (history or [{}])[-1])


def build_train_loader(cfg: Config, path: str, device: torch.device, *, rank: int = 0, world_size: int = 1):
    """The two-view loader for one worker, with the per-worker share of the global batch."""
    from byol_ray.data.loaders import build_train_loader as build

    return build(
        path, backend=cfg.data.loader, batch_size=cfg.train.batch_size // world_size,
        resolution=cfg.data.resolution, crop_scale=cfg.data.crop_scale, crop_ratio=cfg.data.crop_ratio,
        flip_prob=cfg.data.flip_prob, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        distributed=world_size > 1, rank=rank, world_size=world_size, device=device,
    )


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressPrinter:
    """Human-readable progress: epoch, step, loss, throughput, ETA."""

    def __init__(self, total_steps: int, epochs: int, stream=sys.stdout, *, start_step: int = 0) -> None:
        """``start_step``: the step training starts from (a resumed run's checkpoint step); the rate behind
        the ETA counts the steps done since then, over the time since this printer was made."""
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
        parts += [f"{metrics.get('images_per_s', 0):.0f} img/s", f"ETA {_fmt_eta(eta)}"]
        return " | ".join(parts)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        print(self.line(metrics, step), file=self.stream, flush=True)


def append_history(folder: Path, metrics: dict[str, float]) -> None:
    """One JSON line per epoch in ``<run folder>/metrics.jsonl``: readable without MLflow or Ray."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(metrics) + "\n")


class LocalReporter:
    """Single-process reporter: prints progress and keeps the newest ``num_to_keep`` checkpoints."""

    def __init__(self, folder: Path, printer: ProgressPrinter, num_to_keep: int = 2) -> None:
        self.folder, self.printer, self.num_to_keep = Path(folder), printer, num_to_keep
        self.checkpoint_dir = self.folder / "checkpoints"
        self.saved: list[Path] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.printer(metrics, step)

    def epoch_end(self, metrics: dict[str, float], epoch: int, state: dict[str, Any] | None) -> None:
        append_history(self.folder, metrics)
        if state is None:
            return
        folder = self.checkpoint_dir / f"epoch_{epoch:04d}"
        save_checkpoint(state, folder / "state.pt")
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self.saved.append(folder)
        while len(self.saved) > self.num_to_keep:
            shutil.rmtree(self.saved.pop(0), ignore_errors=True)
