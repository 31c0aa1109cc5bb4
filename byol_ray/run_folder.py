"""The run folder's layout: where a run's files live, and the files themselves.

``<output_dir>/<run_name>/`` holds ``config.yaml`` (the run's recipe, what ``--resume`` continues with),
``metrics.jsonl`` and ``validation.jsonl`` (history), ``plots/``, ``mlflow_run_id`` (the MLflow run it logs
into) and ``outcome.json`` (what a finished run left: the summary a launcher prints and ``--json`` returns).
Checkpoints live in ``<storage root>/<run_name>/checkpoints/epoch_NNNN[-step_SSSSSSSS]/``, the storage root being
``ray.storage_path`` or else ``output_dir``. Any of these may be an object-store URI (:class:`Location`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from byol_ray.config import Config, Derived, to_dict
from byol_ray.progress import say
from byol_ray.storage import Location, is_uri, location

CONFIG_FILE = "config.yaml"
RUN_ID_FILE = "mlflow_run_id"  # the MLflow run this training run logs into
OUTCOME_FILE = "outcome.json"


def resolve_paths(cfg: Config) -> Config:
    """Make every path absolute and give the run a name, so Ray workers (which chdir) find them.

    Returns:
        A new config; ``cfg`` is not modified.
    """
    run_name = cfg.run_name or time.strftime("byol-%Y%m%d-%H%M%S")
    train, val = cfg.data.train, cfg.data.val
    if train != "demo" and not is_uri(train):
        train = str(Path(train).expanduser().resolve())
    if val and val != "demo" and not is_uri(val):
        val = str(Path(val).expanduser().resolve())
    storage = cfg.ray.storage_path
    if storage and not is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    output_dir = cfg.output_dir if is_uri(cfg.output_dir) else str(Path(cfg.output_dir).expanduser().resolve())
    return dataclasses.replace(
        cfg, run_name=run_name, output_dir=output_dir,
        data=dataclasses.replace(cfg.data, train=train, val=val, cache_dir=str(Path(cfg.data.cache_dir).expanduser().resolve())),
        ray=dataclasses.replace(cfg.ray, storage_path=storage),
    )


def run_dir(cfg: Config) -> Location:
    """``<output_dir>/<run_name>``: config.yaml, metrics.jsonl, plots, the MLflow run id (a local folder, or a
    prefix in an object store when ``output_dir`` is a URI)."""
    return Location(cfg.output_dir) / cfg.run_name


def storage_root(cfg: Config) -> str:
    """Where checkpoints are kept: ``ray.storage_path``, or ``output_dir`` when that is ''."""
    return cfg.ray.storage_path or cfg.output_dir


def checkpoint_dir(cfg: Config) -> Location:
    """``<storage root>/<run_name>/checkpoints``: the one place every launcher writes ``epoch_NNNN/`` (joined as a
    path, so an object-store URI keeps its query, e.g. ``?endpoint_override=...``, at the end)."""
    return Location(storage_root(cfg)) / cfg.run_name / "checkpoints"


def checkpoints_newest_first(cfg: Config) -> list[Location]:
    """The run's ``epoch_NNNN[-step_SSSSSSSS]`` folders, on disk or in the object store, newest first."""
    from byol_ray.checkpoint import CHECKPOINT_DIR_RE

    folder = checkpoint_dir(cfg)
    found = sorted((int(m.group(1)), int(m.group(2) or -1), name) for name in folder.children()
                   if (m := CHECKPOINT_DIR_RE.fullmatch(name)))
    return [folder / name for *_, name in reversed(found)]


def latest_checkpoint(cfg: Config) -> "Path | Location | None":
    """The run's newest ``epoch_NNNN[-step_SSSSSSSS]/state.pt``, on disk or in the object store, or None."""
    from byol_ray.checkpoint import CHECKPOINT_NAME

    for folder in checkpoints_newest_first(cfg):
        if (folder / CHECKPOINT_NAME).is_file():
            return Path(folder / CHECKPOINT_NAME) if not folder.remote else folder / CHECKPOINT_NAME
    return None


def run_exists(cfg: Config) -> bool:
    """A run of this name already started here (its config or checkpoints exist, on disk or in the bucket)."""
    return (run_dir(cfg) / CONFIG_FILE).exists() or checkpoint_dir(cfg).exists()


# ----------------------------------------------------------------------------- the files


def write_config(cfg: Config, derived: Derived | None = None) -> None:
    """``config.yaml``: the run's recipe (with its derived values once the data size is known)."""
    (run_dir(cfg) / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg, derived), sort_keys=False))


def saved_config(output_dir: str, name: str) -> dict[str, Any] | None:
    """The ``config.yaml`` of run ``name`` in ``output_dir`` as a dict, or None when there is none."""
    saved = Location(output_dir) / name / CONFIG_FILE
    return yaml.safe_load(saved.read_text()) if saved.is_file() else None


def write_run_id(cfg: Config, run_id: str) -> None:
    (run_dir(cfg) / RUN_ID_FILE).write_text(run_id)


def read_run_id(folder: "str | Path | Location") -> str | None:
    """The MLflow run id recorded in a run folder, or None."""
    marker = location(folder) / RUN_ID_FILE
    return marker.read_text().strip() if marker.is_file() else None


def forget_run_id(cfg: Config) -> None:
    """A new run never reopens an older run's MLflow run (a folder reused after a failed start)."""
    (run_dir(cfg) / RUN_ID_FILE).unlink()


@dataclass
class RunOutcome:
    """What a finished run leaves behind (rank 0): for the summary and a ``--json`` result."""

    run_name: str
    folder: str
    checkpoints: str
    metrics: dict[str, float]
    run_id: str | None = None
    tracking_uri: str = ""
    registered: str | None = None  # "name/version"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_outcome(cfg: Config, outcome: RunOutcome) -> None:
    """``outcome.json``, written by the run's rank 0 as it finishes; a launcher on another machine (the Ray
    driver) reads it back with :func:`read_outcome`."""
    (run_dir(cfg) / OUTCOME_FILE).write_text(json.dumps(outcome.as_dict(), indent=2))


def read_outcome(cfg: Config) -> RunOutcome:
    """The outcome a finished run wrote (:func:`write_outcome`)."""
    path = run_dir(cfg) / OUTCOME_FILE
    if not path.is_file():
        raise RuntimeError(f"the run {cfg.run_name} ended without writing {path}; its history is in "
                           f"{run_dir(cfg) / 'metrics.jsonl'} and its checkpoints in {checkpoint_dir(cfg)}")
    return RunOutcome(**json.loads(path.read_text()))


def discard_failed_start(cfg: Config) -> None:
    """Remove the folder of a new run that failed before it finished an epoch, so the name is free again."""
    ckpts = checkpoint_dir(cfg)
    try:
        if any(n.startswith("epoch_") for n in ckpts.children()) or (run_dir(cfg) / "metrics.jsonl").exists():
            return
        run_dir(cfg).remove_tree()
        ckpts.parent.remove_tree()
    except OSError as exc:  # best effort: the original error matters more
        say(f"could not remove the failed run's folder {run_dir(cfg)} ({exc})")
