"""MLflow tracking edge: resolve and check the store, a Tracker interface, a reporter that feeds it."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from byol_ray.config import Config, ConfigError, Derived, to_dict
from byol_ray.run import probe_writable

if TYPE_CHECKING:
    from byol_ray.engine import Reporter

_MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000
_MAX_TAG_CHARS = 5000  # model-version tags allow 5000 characters, run tags 8000: one limit for both
_STOP = object()  # queue sentinel: the metrics thread ends after sending what came before it


# ----------------------------------------------------------------------------- the store


def resolve_tracking_uri(uri: str, output_dir: str) -> str:
    """The absolute tracking URI every process (driver and Ray workers, which chdir) can use.

    Args:
        uri: ``mlflow.tracking_uri`` from the config: '' (default store), ``sqlite:///...``,
            ``http(s)://...``, ``file:...``/a plain folder, or any other MLflow store URI.
        output_dir: the run's output folder; the default store is ``<output_dir>/mlflow.db``.

    Returns:
        '' → ``sqlite:///<abs output_dir>/mlflow.db``; relative sqlite and file paths made absolute
        against the current directory; everything else unchanged.
    """
    uri = uri.strip()
    if not uri:
        return f"sqlite:///{Path(output_dir).expanduser().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{Path(path).expanduser().resolve()}"
        return uri
    if uri.startswith("file:"):
        path = uri[len("file:"):].removeprefix("//")
        return Path(path).expanduser().resolve().as_uri()
    if "://" not in uri:  # a bare folder is MLflow's file store
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def _fix_hint(uri: str) -> str:
    from urllib.parse import urlparse

    port = (urlparse(uri).port if uri.startswith("http") else None) or 5000
    return (f"start one with `mlflow server --backend-store-uri sqlite:///ABS/mlflow.db --artifacts-destination "
            f"ABS/artifacts --host 127.0.0.1 --port {port}`, or set mlflow.tracking_uri=... to a reachable server "
            f"(mlflow.tracking_uri='' keeps a local sqlite file; mlflow.enabled=false turns tracking off)")


def _http_status(url: str, timeout_s: float) -> tuple[int | None, str]:
    """(HTTP status, description) of one GET; status None when no server answered at all."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s) as resp:
            return resp.status, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, f"{type(reason).__name__}: {reason}"


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before training starts when the tracking store cannot be used.

    Checks an http(s) server with one short request (``/health``, then the experiments API for
    servers behind a proxy that hides it); checks that a sqlite store's folder exists or can be
    created and is writable; refuses the plain file store that MLflow 3.17 disables by default.

    Args:
        uri: a resolved tracking URI (:func:`resolve_tracking_uri`).
        timeout_s: seconds per HTTP probe; MLflow's own client would retry for minutes instead.

    Returns:
        None; raises :class:`ConfigError` naming the URI, the cause and the fix.
    """
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        status, why = _http_status(f"{base}/health", timeout_s)
        if status is not None and status >= 400:  # a proxy may hide /health: ask the API itself
            status, why2 = _http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout_s)
            why = f"/health {why}, experiments API {why2}"
        if status is None or status >= 500:
            raise ConfigError(f"MLflow tracking server {uri} is not reachable ({why}); {_fix_hint(uri)}")
        return  # 2xx, or 401/403 (up, needs MLFLOW_TRACKING_USERNAME/PASSWORD or a token)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path or path == ":memory:":
            return
        folder = Path(path).parent
        try:
            probe_writable(folder, prefix=".mlflow-write-test")
        except OSError as exc:
            raise ConfigError(f"MLflow store {uri}: folder {folder} is not writable ({exc.strerror}); "
                              f"set mlflow.tracking_uri=sqlite:////a/writable/folder/mlflow.db, or "
                              f"{_fix_hint(uri)}") from None
        return
    if uri.startswith("file:") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise ConfigError(f"MLflow tracking store {uri} is a plain file store, which MLflow 3.17 refuses unless "
                          f"MLFLOW_ALLOW_FILE_STORE=true; use mlflow.tracking_uri='' (local sqlite) or a server")


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite file (MLflow's default is ``./mlruns`` in the
    current directory, which Ray workers chdir away from); the server's own choice for anything else."""
    if uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment ``name`` in ``client``'s store, created (race-safely) when missing.

    Args:
        client: an ``MlflowClient``.
        name: experiment name.
        uri: the client's tracking URI (decides the artifact location of a new experiment).

    Returns:
        The experiment id.
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(uri))
    except MlflowException:  # another process created it between the lookup and the create
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# ----------------------------------------------------------------------------- run metadata


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{'model': {'encoder': 'tiny'}}`` → ``{'model.encoder': 'tiny'}``; lists become JSON text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = str(value)
    return out


def git_commit(folder: str | Path | None = None) -> dict[str, str]:
    """``{'git_commit': sha, 'git_dirty': 'true'|'false'}`` for the code's checkout; {} outside git."""
    folder = Path(folder or Path(__file__).parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5)
        return {"git_commit": sha.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


def ray_tags(cfg: Config) -> dict[str, str]:
    """``ray.run_name`` / ``ray.job_id`` (/ ``ray.submission_id``) when this process runs under Ray, else {}.

    Never imports Ray: it is asked only when the process already uses it.
    """
    import sys

    job_id = os.environ.get("RAY_JOB_ID", "")
    if not job_id and "ray" in sys.modules:
        try:
            import ray

            if ray.is_initialized():
                job_id = ray.get_runtime_context().get_job_id() or ""
        except Exception:  # noqa: BLE001 - metadata only, never fail a run for it
            job_id = ""
    if not job_id:
        return {}
    tags = {"ray.job_id": job_id, "ray.run_name": cfg.run_name}
    submission = os.environ.get("RAY_JOB_SUBMISSION_ID", "")
    if submission:
        tags["ray.submission_id"] = submission
    return tags


# ----------------------------------------------------------------------------- trackers


class Tracker(Protocol):
    """Where one run's params, metrics, tags and artifacts go. Call it on rank 0 only: the caller
    decides (every other rank gets a :class:`NullTracker`), so workers never race on one run."""

    @property
    def run_id(self) -> str | None: ...
    def start(self, cfg: Config, *, derived: Derived | None = None, run_id: str | None = None,
              tags: dict[str, Any] | None = None, data_fingerprint: dict[str, Any] | None = None) -> str | None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def tags(self) -> dict[str, str]: ...
    def metric_history(self, key: str) -> list[tuple[int, float]]: ...
    def flush(self) -> None: ...
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

    def log_dict(self, data, artifact_file) -> None:
        pass

    def log_text(self, text, artifact_file) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def tags(self) -> dict[str, str]:
        return {}

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []

    def flush(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """One MLflow run. Metrics go through a queue to a background thread (``log_batch``), so a slow or
    briefly unreachable server never stalls a training step; :meth:`flush`/:meth:`finish` drain it."""

    def __init__(self, tracking_uri: str, experiment: str = "byol-ray") -> None:
        """Args:
            tracking_uri: a resolved URI (:func:`resolve_tracking_uri`); no global MLflow state is touched.
            experiment: experiment name, created when missing.
        """
        from mlflow import MlflowClient

        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.dropped_batches = 0  # batches the server refused after MLflow's own retries

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # ---------------------------------------------------------------- start / resume

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

        all_tags = {**git_commit(), **ray_tags(cfg), **flatten(data_fingerprint or {}, "data."), **(tags or {})}
        if cfg.mlflow.parent_run_id:  # a Tune trial: shown nested under the search's parent run
            all_tags["mlflow.parentRunId"] = cfg.mlflow.parent_run_id
        if "git_commit" in all_tags:
            all_tags["mlflow.source.git.commit"] = all_tags["git_commit"]
        params = flatten(to_dict(cfg, derived))
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
        else:
            experiment_id = ensure_experiment(self.client, self.experiment, self.tracking_uri)
            run = self.client.create_run(experiment_id, run_name=cfg.run_name or None)
            run_id = run.info.run_id
        self._run_id = run_id
        items = [Param(k, v[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + _MAX_PARAMS_PER_BATCH])
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_TAG_CHARS]) for k, v in all_tags.items()])
        self._thread = threading.Thread(target=self._drain, name="mlflow-metrics", daemon=True)
        self._thread.start()
        return run_id

    # ---------------------------------------------------------------- metrics (non-blocking)

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

    # ---------------------------------------------------------------- artifacts, tags, end

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (or a folder's files) into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self._run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self._run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self._run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self._run_id, tags=[RunTag(k, str(v)[:_MAX_TAG_CHARS]) for k, v in tags.items()])

    def tags(self) -> dict[str, str]:
        """The run's tags as stored on the server now."""
        return dict(self.client.get_run(self._run_id).data.tags) if self._run_id else {}

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of ``key`` stored in the run so far (after a :meth:`flush`)."""
        self.flush()
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self._run_id, key))

    def finish(self, status: str = "FINISHED") -> None:
        """Flush the metric queue, stop the thread and close the run with ``status``
        (FINISHED, FAILED or KILLED). A run left RUNNING by a crash is reopened by ``start(run_id=...)``."""
        if self._run_id is None:
            return
        self.flush()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
        self.client.set_terminated(self._run_id, status=status)
        if self.dropped_batches:
            warnings.warn(f"MLflow run {self._run_id}: {self.dropped_batches} metric batch(es) could not be sent",
                          RuntimeWarning, stacklevel=2)


RUN_ID_FILE = "mlflow_run_id"  # in the run folder: the MLflow run this training run logs into


def unfinished_run_id(tracker: Tracker, run_folder: str | Path) -> str | None:
    """The MLflow run a restarted training run should continue when no checkpoint names one.

    A worker group that dies before its first checkpoint (a crash, or a Tune driver killed mid-trial)
    restarts from scratch; it logs into the run it had opened (recorded in ``<run folder>/mlflow_run_id``)
    instead of leaving that one RUNNING forever beside a second run. A FINISHED run is never reopened.
    """
    marker = Path(run_folder) / RUN_ID_FILE
    client = getattr(tracker, "client", None)
    if client is None or not marker.is_file():
        return None
    try:
        run = client.get_run(marker.read_text().strip())
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
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
    check_tracking(uri)
    return MlflowTracker(uri, cfg.mlflow.experiment)


# ----------------------------------------------------------------------------- the engine's reporter


class TrackingReporter:
    """Wraps a :class:`Reporter`: every log and epoch end also goes to the tracker."""

    def __init__(self, inner: Reporter, tracker: Tracker) -> None:
        self.inner, self.tracker = inner, tracker

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)  # step = global step, so restarts continue the curves
        self.inner.log(metrics, step)

    def epoch_end(self, metrics: dict[str, float], epoch: int, state: dict[str, Any] | None) -> None:
        # Epoch curves use the epoch as their x axis; keys get an epoch_ prefix so that they never share
        # a series with the per-step values of the same name (images_per_s).
        self.tracker.log_metrics({k if k.startswith("epoch") else f"epoch_{k}": v for k, v in metrics.items()}, epoch)
        if state is not None and self.tracker.run_id is not None:
            state["mlflow_run_id"] = self.tracker.run_id  # a restarted worker logs into the same run
        self.inner.epoch_end(metrics, epoch, state)


# ----------------------------------------------------------------------------- end-of-run artifacts


def _series(tracker: Tracker, history: list[dict[str, float]], key: str) -> list[tuple[float, float]]:
    """A curve from the tracker (complete across restarts) or, when shorter, from this process's history."""
    local = [(row["epoch"], row[key]) for row in history if key in row and "epoch" in row]
    stored = tracker.metric_history(key)
    return [(float(s), v) for s, v in stored] if len(stored) > len(local) else local


def plot_curves(tracker: Tracker, history: list[dict[str, float]], out_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` and ``probe_accuracy.png`` (vs epoch) under ``out_dir``; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title, name in (("epoch_loss", "BYOL loss (2 − 2cos, symmetrised)", "loss.png"),
                             ("epoch_classifier_acc", "online linear probe accuracy (train)", "probe_accuracy.png")):
        points = _series(tracker, history, key)
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def log_run_artifacts(tracker: Tracker, run_dir: str | Path, history: list[dict[str, float]]) -> list[Path]:
    """Attach the resolved config and the loss/probe-accuracy plots to the run.

    Args:
        tracker: a started tracker (a :class:`NullTracker` makes this a no-op apart from the plots).
        run_dir: the run folder; ``config.yaml`` there is uploaded, plots are written to ``plots/``.
        history: ``FitResult.history`` (rows with ``epoch``, ``epoch_loss``, ``epoch_classifier_acc``).

    Returns:
        The plot files written.
    """
    run_dir = Path(run_dir)
    if isinstance(tracker, NullTracker):
        return []
    config = run_dir / "config.yaml"
    if config.is_file():
        tracker.log_artifact(config)
    plots = plot_curves(tracker, history, run_dir / "plots")
    for plot in plots:
        tracker.log_artifact(plot, "plots")
    return plots


def finish_run(tracker: Tracker, cfg: Config, derived: Derived, result, run_dir: str | Path, *,
               data_fingerprint: dict[str, Any] | None = None):
    """The end of a successful run on rank 0: config + plots as artifacts, the online encoder registered
    as ``mlflow.register_name`` (skipped when '' or not tracking, or when this run already registered one:
    a finished run resumed again adds no duplicate version), the run closed FINISHED.

    A registration failure is tagged on the run (``registration_error``) and re-raised after the run is
    closed: training succeeded and its checkpoint can be registered later (``byol-ray register``).

    Args:
        tracker: the started tracker.
        cfg, derived: the run's config and derived values.
        result: the engine's ``FitResult`` (``engine.online.encoder``, ``history``, ``metrics``, ``epochs``).
        run_dir: the run folder holding ``config.yaml``.
        data_fingerprint: the training data's fingerprint, copied onto the model card.

    Returns:
        The registered ``ModelVersion``, or None.
    """
    version = None
    try:
        log_run_artifacts(tracker, run_dir, result.history)
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the encoder matters more
        warnings.warn(f"MLflow: run artifacts not logged ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=2)
    try:
        registered = tracker.tags().get("registered_model") if tracker.run_id is not None else None
        if registered:  # a resumed run that had already finished: keep its version, add no duplicate
            print(f"[byol-ray] encoder already registered by this run: models:/{registered}")
        elif cfg.mlflow.register_name and tracker.run_id is not None:
            from byol_ray.registry import register_encoder

            version = register_encoder(
                result.engine.online.encoder, name=cfg.mlflow.register_name, cfg_dict=to_dict(cfg, derived),
                run_id=tracker.run_id, tracking_uri=tracker.tracking_uri,
                metadata={"epochs": result.epochs, "step": result.steps, "metrics": result.metrics,
                          "data_fingerprint": data_fingerprint or {}},
            )
            tracker.set_tags({"registered_model": f"{version.name}/{version.version}"})
    except Exception as exc:
        with contextlib.suppress(Exception):
            tracker.set_tags({"registration_error": f"{type(exc).__name__}: {exc}"})
        tracker.finish("FINISHED")
        raise
    tracker.finish("FINISHED")
    return version
