"""The local launcher (``train --no-ray``): one process, one device, checkpoints written by this process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from byol_ray import session
from byol_ray.checkpoint import CHECKPOINT_DIR_RE, checkpoint_dir_name, remove_stale_temporaries, save_checkpoint
from byol_ray.config import Config, validation_due
from byol_ray.device import pick_device
from byol_ray.engine import Reporter
from byol_ray.history import append_history
from byol_ray.launch import check_start, cleanup_on_failure
from byol_ray.progress import ProgressPrinter, say
from byol_ray.resume import announce_resume, check_new_or_resume, load_resume_state
from byol_ray.run_folder import RunOutcome, checkpoint_dir, run_dir
from byol_ray.signals import sigterm_raises


class LocalReporter(Reporter):
    """Prints progress, appends the history, keeps the newest ``num_to_keep`` checkpoints (older ones of a
    resumed run included)."""

    def __init__(self, folder: Path, checkpoints: Path, printer: ProgressPrinter, num_to_keep: int = 2,
                 cfg: Config | None = None) -> None:
        self.folder, self.checkpoints, self.printer, self.num_to_keep = Path(folder), Path(checkpoints), printer, num_to_keep
        self.cfg = cfg

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.printer(metrics, step)

    def epoch_end(self, metrics: dict[str, float], epoch: int, state: dict[str, Any] | None) -> None:
        append_history(self.folder, metrics)
        if state is not None:
            self._save(checkpoint_dir_name(epoch), metrics, state)
        if state is not None and self.cfg is not None and validation_due(self.cfg, epoch):
            # no Ray here to run it beside training: a --no-ray run validates in line (it pauses training)
            from byol_ray import validation

            result = validation.validate_state(state)
            validation.record(self.cfg, result, state.get("mlflow_run_id"))
            say(f"epoch {epoch}: held-out kNN top-1 {result[validation.METRIC]:.3f}")

    def checkpoint(self, metrics: dict[str, float], state: dict[str, Any], notice: dict[str, Any] | None) -> None:
        """A mid-epoch checkpoint (``train.checkpoint_every_steps``)."""
        self._save(checkpoint_dir_name(state["epoch"], state["step"]), metrics, state)

    def _save(self, name: str, metrics: dict[str, float], state: dict[str, Any]) -> None:
        folder = self.checkpoints / name
        save_checkpoint(state, folder / "state.pt")
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        saved = sorted(p for p in self.checkpoints.glob("epoch_*") if CHECKPOINT_DIR_RE.fullmatch(p.name))
        for old in saved[:-self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)


def train_local(cfg: Config, *, resume: bool = False) -> RunOutcome:
    """Train ``cfg`` in this process; with ``resume``, continue from the run's latest checkpoint.

    The run is tracked in MLflow (``mlflow.enabled``) and its online encoder registered at the end.

    Args:
        cfg: the config as given (relative paths are resolved here).
        resume: continue ``cfg.run_name`` from its newest checkpoint (and MLflow run) instead of starting fresh.

    Returns:
        The run's :class:`~byol_ray.run_folder.RunOutcome`.
    """
    cfg = check_start(cfg, on_ray=False)  # every check before anything is written: a failed start leaves nothing
    check_new_or_resume(cfg, resume)
    device = pick_device(cfg.train.device)
    checkpoints = Path(checkpoint_dir(cfg))
    state = None
    if resume and (removed := remove_stale_temporaries(checkpoints)):
        say(f"removed {len(removed)} partial checkpoint file(s) left by an interrupted save in {checkpoints}")
    if resume and announce_resume(cfg) is not None:
        state = load_resume_state(cfg, map_location=device)
    folder = run_dir(cfg)
    with cleanup_on_failure(cfg, resume=resume, continue_with=f"byol-ray train --no-ray --resume {cfg.run_name} "
                                                               f"output_dir={cfg.output_dir}"), sigterm_raises():
        outcome = session.run(cfg, session.Placement(device), state=state,
                              make_reporter=lambda printer: LocalReporter(folder, checkpoints, printer,
                                                                          num_to_keep=cfg.ray.num_to_keep, cfg=cfg))
    session.print_summary(cfg, outcome)
    return outcome
