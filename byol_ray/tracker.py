"""The tracker a training run logs into (MLflow on rank 0, nothing elsewhere) and the reporter that feeds it."""
from __future__ import annotations

import json
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

from byol_ray import mlflow_store
from byol_ray.config import Config, ConfigError, Derived, to_dict
from byol_ray.engine import Reporter
from byol_ray.run_tags import code_version, flatten, ray_tags
from byol_ray.storage import Location

_MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000
_MAX_TAG_CHARS = 5000  # model-version tags allow 5000 characters, run tags 8000: one limit for both
_STOP = object()  # queue sentinel: the metrics thread ends after sending what came before it


class Tracker(Protocol):
    """Where one run's params, metrics, tags and artifacts go. Call it on rank 0 only: the caller
    decides (every other rank gets a :class:`NullTracker`), so workers never race on one run."""

    @property
    def run_id(self) -> str | None: ...
    def start(self, cfg: Config, *, derived: Derived | None = None, run_id: str | None = None,
              tags: dict[str, Any] | None = None, data_fingerprint: dict[str, Any] | None = None) -> str | None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def tags(self) -> dict[str, str]: ...
    def flush(self) -> None: ...
    def reachable(self) -> bool: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Records nothing: tests, benchmarks, ``mlflow.enabled=false`` and every rank but 0."""

    run_id: str | None = None
    tracking_uri: str = ""

    def start(self, cfg, *, derived=None, run_id=None, tags=None, data_fingerprint=None) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def tags(self) -> dict[str, str]:
        return {}

    def flush(self) -> None:
        pass

    def reachable(self) -> bool:
        return True

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """One MLflow run. Metrics go through a queue to one background thread that sends everything queued in
    one ``log_batch``, so a slow or briefly unreachable server never stalls a training step;
    :meth:`flush`/:meth:`finish` drain it. (MLflow's own ``synchronous=False`` logging was measured slower:
    ~0.2 ms per call in the caller instead of ~3 us, and 12x the total time; docs/benchmarks.md.)"""

    def __init__(self, tracking_uri: str, experiment: str = "byol-ray") -> None:
        """Args:
            tracking_uri: a resolved URI (:func:`mlflow_store.resolve_tracking_uri`); no global MLflow state.
            experiment: experiment name, created when missing.
        """
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.client = mlflow_store.client(tracking_uri)
        self._run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._system = None  # MLflow's SystemMetricsMonitor, when on
        self.dropped_batches = 0  # batches the server refused after MLflow's own retries
        self.lost = False  # the server stopped answering: the end of the run sends nothing more

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def start(self, cfg: Config, *, derived: Derived | None = None, run_id: str | None = None,
              tags: dict[str, Any] | None = None, data_fingerprint: dict[str, Any] | None = None) -> str:
        """Create a run (or reopen ``run_id``) and log the resolved config as params plus tags.

        Args:
            cfg: the resolved config; flattened into params (``model.encoder``, ``optim.base_lr``, ...).
            derived: derived values, logged as ``derived.*`` params.
            run_id: an existing run to continue (a restarted worker passes ``state["mlflow_run_id"]``).
            tags: extra run tags.
            data_fingerprint: the training data's fingerprint, logged as ``data.<key>`` tags.

        Returns:
            The run id; raises :class:`ConfigError` when ``run_id`` is not in this store.
        """
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        all_tags = {**code_version(), **ray_tags(cfg.run_name), **flatten(data_fingerprint or {}, "data."),
                    **(tags or {})}
        if cfg.mlflow.parent_run_id:  # a Tune trial: shown nested under the search's parent run
            all_tags["mlflow.parentRunId"] = cfg.mlflow.parent_run_id
        if "git_commit" in all_tags:
            all_tags["mlflow.source.git.commit"] = all_tags["git_commit"]
        params = flatten(to_dict(cfg, derived))
        existing_run = bool(run_id)
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as exc:
                raise ConfigError(f"cannot resume MLflow run {run_id}: not found in {self.tracking_uri} "
                                  f"({exc.message}); set mlflow.tracking_uri to the store the run started in"
                                  ) from None
            self.client.update_run(run_id, status="RUNNING")
            existing = run.data.params
            changed = {k: v for k, v in params.items()
                       if k in existing and existing[k][:_MAX_PARAM_CHARS] != v[:_MAX_PARAM_CHARS]}
            params = {k: v for k, v in params.items() if k not in existing}  # MLflow params are write-once
            all_tags.update({f"resume.changed.{k}": v for k, v in changed.items()})
            all_tags["resumed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            all_tags["resume_count"] = str(int(run.data.tags.get("resume_count", "0")) + 1)
            # every Ray job that worked on this run, oldest first (ray.submission_id is the newest)
            seen = [s for s in run.data.tags.get("ray.submission_ids", run.data.tags.get("ray.submission_id", ""))
                    .split(",") if s]
            new = all_tags.get("ray.submission_id")
            if new and new not in seen:
                all_tags["ray.submission_ids"] = ",".join([*seen, new])
        else:
            experiment_id = mlflow_store.ensure_experiment(self.client, self.experiment, self.tracking_uri)
            run = self.client.create_run(experiment_id, run_name=cfg.run_name or None)
            run_id = run.info.run_id
            if all_tags.get("ray.submission_id"):
                all_tags["ray.submission_ids"] = all_tags["ray.submission_id"]
        self._run_id = run_id
        items = [Param(k, v[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + _MAX_PARAMS_PER_BATCH])
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_TAG_CHARS]) for k, v in all_tags.items()])
        self._thread = threading.Thread(target=self._drain, name="mlflow-metrics", daemon=True)
        self._thread.start()
        if cfg.mlflow.system_metrics_every_s > 0:
            self._start_system_metrics(cfg.mlflow.system_metrics_every_s, resume=bool(existing_run))
        return run_id

    def _start_system_metrics(self, every_s: float, resume: bool) -> None:
        """MLflow's own monitor (an idle GPU shows beside the loss curve); its series use their own sample
        counter as the step, which the MLflow UI plots against time."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self._run_id, sampling_interval=every_s, resume_logging=resume,
                                                tracking_uri=self.tracking_uri)
            self._system.start()
        except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
            warnings.warn(f"MLflow system metrics off ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=3)
            self._system = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; returns at once (the background thread sends them)."""
        if self._run_id is None:
            raise RuntimeError("MlflowTracker.log_metrics before start()")
        self._queue.put((dict(metrics), int(step), int(time.time() * 1000)))

    def _drain(self) -> None:
        """Background thread: take everything queued, send it in batches, then release waiting flushes."""
        from mlflow.entities import Metric

        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch, events = [], []
            for item in items:
                if isinstance(item, threading.Event):
                    events.append(item)
                elif item is not _STOP:
                    metrics, step, ts = item
                    batch += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
            for i in range(0, len(batch), _MAX_METRICS_PER_BATCH):
                chunk = batch[i:i + _MAX_METRICS_PER_BATCH]
                try:
                    self.client.log_batch(self._run_id, metrics=chunk)
                except Exception as exc:  # noqa: BLE001 - tracking must never kill training
                    self.dropped_batches += 1
                    warnings.warn(f"MLflow: dropped {len(chunk)} metric values ({type(exc).__name__}: {exc})",
                                  RuntimeWarning, stacklevel=1)
            for event in events:  # everything queued before the flush request has been sent
                event.set()
            if any(item is _STOP for item in items):
                return

    def flush(self, timeout_s: float = 120.0) -> None:
        """Block until every metric queued so far has been sent (or dropped with a warning)."""
        if self._thread is None or not self._thread.is_alive():
            return
        event = threading.Event()
        self._queue.put(event)
        if not event.wait(timeout_s):
            warnings.warn(f"MLflow: metrics not flushed within {timeout_s:.0f}s", RuntimeWarning, stacklevel=2)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (or a folder's files) into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self._run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self._run_id, tags=[RunTag(k, str(v)[:_MAX_TAG_CHARS]) for k, v in tags.items()])

    def tags(self) -> dict[str, str]:
        """The run's tags as stored on the server now."""
        return dict(self.client.get_run(self._run_id).data.tags) if self._run_id else {}

    def reachable(self) -> bool:
        """Whether the tracking store answers now (a short probe; MLflow's own client would retry for minutes)."""
        if self.lost:
            return False
        self.lost = not mlflow_store.answers(self.tracking_uri)
        return not self.lost

    def finish(self, status: str = "FINISHED") -> None:
        """Drain the metric queue, stop the thread and close the run with ``status`` (FINISHED, FAILED or KILLED).
        A run left RUNNING by a crash is reopened by ``start(run_id=...)``. When the server does not answer,
        nothing more is sent (the run's own files hold everything) and this returns at once."""
        if self._run_id is None or not self.reachable():
            return
        if self._system is not None:
            self._system.finish()
            self._system = None
        self.flush()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
        self.client.set_terminated(self._run_id, status=status)
        if self.dropped_batches:
            warnings.warn(f"MLflow run {self._run_id}: {self.dropped_batches} metric batch(es) could not be sent",
                          RuntimeWarning, stacklevel=2)


def unfinished_run_id(tracker: Tracker, run_folder: str | Path | Location) -> str | None:
    """The MLflow run a restarted training run should continue when no checkpoint names one.

    A worker group that dies before its first checkpoint (a crash, or a Tune driver killed mid-trial)
    restarts from scratch; it logs into the run it had opened (recorded in ``<run folder>/mlflow_run_id``)
    instead of leaving that one RUNNING forever beside a second run. A FINISHED run is never reopened.
    """
    from byol_ray.run_folder import read_run_id

    client = getattr(tracker, "client", None)
    recorded = read_run_id(run_folder) if client is not None else None
    if not recorded:
        return None
    try:
        run = client.get_run(recorded)
    except Exception:  # noqa: BLE001 - another store or a deleted run: start a new one
        return None
    return run.info.run_id if run.info.status != "FINISHED" else None


def build_tracker(cfg: Config, *, is_main: bool = True) -> Tracker:
    """An :class:`MlflowTracker` on the main process when ``mlflow.enabled``, else a :class:`NullTracker`.

    Args:
        cfg: a config with resolved paths; ``mlflow.tracking_uri`` is resolved and checked here.
        is_main: rank 0 (``byol_ray.dist.is_main()``); other ranks never track.

    Returns:
        The tracker (not started).
    """
    if not (cfg.mlflow.enabled and is_main):
        return NullTracker()
    uri = mlflow_store.resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
    mlflow_store.check_tracking(uri)
    return MlflowTracker(uri, cfg.mlflow.experiment)


def logged_through(tracker: Tracker) -> int:
    """The highest global step the tracker's run already holds training metrics for (-1: none).

    A restarted worker group resumes from its latest checkpoint, which may lie a few steps before what the
    lost group had already logged; those steps are trained again but not logged again, so the run never
    holds a step twice.
    """
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if client is None or run_id is None:
        return -1
    steps = [-1]
    for key in ("loss", "epoch_loss"):
        try:
            steps += [m.step for m in client.get_metric_history(run_id, key)]
        except Exception:  # noqa: BLE001 - no history: nothing to skip
            pass
    return max(steps)


class TrackingReporter(Reporter):
    """Wraps a :class:`Reporter`: every log and epoch end also goes to the tracker, all on one step scale
    (the global step), so the curves of a restarted run continue where they left off. Steps up to
    ``logged_through`` (what a lost attempt had logged) are not sent again."""

    def __init__(self, inner: Reporter, tracker: Tracker, logged_through: int = -1) -> None:
        self.inner, self.tracker, self.logged_through = inner, tracker, logged_through
        self.pending_notice: dict[str, Any] | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step > self.logged_through:
            self.tracker.log_metrics(metrics, step)
        self.inner.log(metrics, step)

    def epoch_end(self, metrics: dict[str, float], epoch: int, state: dict[str, Any] | None) -> None:
        # Epoch values get an epoch_ prefix so they never share a series with the per-step value of the
        # same name (images_per_s); `epoch` itself is a metric on the step scale, like every other.
        values = {k if k.startswith("epoch") else f"epoch_{k}": v for k, v in metrics.items() if k != "step"}
        if int(metrics["step"]) > self.logged_through:
            self.tracker.log_metrics(values, int(metrics["step"]))
        if state is not None and self.tracker.run_id is not None:
            state["mlflow_run_id"] = self.tracker.run_id  # a restarted worker logs into the same run
        self.inner.epoch_end(metrics, epoch, state)
        if state is not None:
            self._record_commit(int(metrics["step"]))

    def replay(self, metrics: dict[str, float]) -> None:
        self.inner.replay(metrics)

    def poll(self, step: int) -> dict[str, Any] | None:
        notice = self.inner.poll(step)
        if notice is not None:  # the event itself, at the step it was seen (rank 0's tracker; others are null)
            self.pending_notice = notice
            self.tracker.log_metrics({f"{notice['event']}_notice": 1.0,
                                      **{f"{notice['event']}_{k}": float(v) for k, v in notice.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)
                                         and not k.endswith("_at")}}, step)  # clock times go in the tag
            self.tracker.set_tags({f"{notice['event']}.last_notice_step": str(step),
                                   f"{notice['event']}.last_notice": json.dumps(notice, default=str)[:4000]})
        return notice

    def checkpoint(self, metrics: dict[str, float], state: dict[str, Any], notice: dict[str, Any] | None) -> None:
        if self.tracker.run_id is not None:
            state["mlflow_run_id"] = self.tracker.run_id
        self.inner.checkpoint(metrics, state, notice)
        self._record_commit(int(state["step"]))

    def _record_commit(self, step: int) -> None:
        """The moment the pending notice's checkpoint was committed (the launcher's reporter sets
        ``committed_at`` on the notice once it is): from then on the notice's step is safe."""
        notice = self.pending_notice
        if notice is None or "committed_at" not in notice:
            return
        self.pending_notice = None
        self.tracker.set_tags({f"{notice['event']}.last_committed_at": f"{notice['committed_at']:.3f}"})
        self.tracker.log_metrics({f"{notice['event']}_commit_s": notice["committed_at"] - notice["seen_at"]}, step)
