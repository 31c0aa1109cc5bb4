"""Single-process training (no Ray): the engine on one device, checkpoints in the run folder."""
from __future__ import annotations

from pathlib import Path

from byol_ray.checkpoint import latest_checkpoint, load_checkpoint
from byol_ray.config import Config, derive, save_resolved
from byol_ray.engine import FitResult, fit, pick_device
from byol_ray.run import LocalReporter, ProgressPrinter, build_train_loader, run_dir, training_file


def train_local(cfg: Config, *, resume: bool = False) -> FitResult:
    """Train ``cfg`` in this process; with ``resume``, continue from the run folder's latest checkpoint.

    Args:
        cfg: a config whose paths are already resolved (:func:`byol_ray.run.resolve_paths`).
        resume: continue ``cfg.run_name`` from its newest checkpoint instead of starting fresh.

    Returns:
        The engine's :class:`FitResult`.
    """
    device = pick_device(cfg.train.device)
    loader = build_train_loader(cfg, training_file(cfg), device)
    derived = derive(cfg, loader.num_samples, world_size=1)
    folder = run_dir(cfg)
    state = None
    if resume:
        latest = latest_checkpoint(folder / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"no checkpoint to resume under {folder / 'checkpoints'}")
        state = load_checkpoint(latest, map_location=device)
    save_resolved(cfg, derived, folder / "config.yaml")
    reporter = LocalReporter(Path(folder), ProgressPrinter(derived.total_steps, cfg.train.epochs),
                             num_to_keep=cfg.ray.num_to_keep)
    return fit(cfg, derived, loader, device, reporter=reporter, state=state)
