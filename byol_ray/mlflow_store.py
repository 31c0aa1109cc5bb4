"""The MLflow store: which tracking URI a run uses, whether it answers, and the experiment it files into."""
from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlparse

from byol_ray.config import ConfigError
from byol_ray.progress import verbose

# Schemes MLflow's own store registry understands (plus databricks/uc, which need their own auth).
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_KNOWN_SCHEMES = ("http", "https", "file", "databricks", "databricks-uc", "uc", *_DB_SCHEMES)


def probe_writable(folder: Path, prefix: str = ".write-test") -> None:
    """Create ``folder`` and write/remove a probe file in it; raises ``OSError`` when that fails."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{prefix}-{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()


def resolve_tracking_uri(uri: str, output_dir: str) -> str:
    """The absolute tracking URI every process (driver and Ray workers, which chdir) can use.

    Args:
        uri: ``mlflow.tracking_uri`` from the config: '' (the environment's ``MLFLOW_TRACKING_URI``, else
            the default store), ``sqlite:///...``, ``http(s)://...``, ``file:...``/a plain folder, or any
            other MLflow store URI.
        output_dir: the run's output folder; the default store is ``<output_dir>/mlflow.db``.

    Returns:
        '' → ``$MLFLOW_TRACKING_URI`` when set (as MLflow's own tools do), else
        ``sqlite:///<abs output_dir>/mlflow.db``; relative sqlite and file paths made absolute against the
        current directory; everything else unchanged.
    """
    uri = uri.strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        if "://" in output_dir and not output_dir.startswith("file://"):
            raise ConfigError(f"output_dir={output_dir!r} is an object-store URI, where the default sqlite MLflow "
                              "store cannot live; set mlflow.tracking_uri=http://MLFLOW-HOST:5000 (a tracking "
                              "server; --artifacts-destination s3://... keeps its artifacts in the bucket) or export "
                              "MLFLOW_TRACKING_URI, or mlflow.enabled=false")
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


def is_local_store(uri: str) -> bool:
    """True for a store that lives in this machine's files (sqlite, file): other nodes cannot reach it."""
    return uri.startswith(("sqlite:", "file:"))


def _fix_hint(uri: str) -> str:
    port = (urlparse(uri).port if uri.startswith("http") else None) or 5000
    return (f"start one with `mlflow server --backend-store-uri sqlite:///ABS/mlflow.db --artifacts-destination "
            f"ABS/artifacts --host 127.0.0.1 --port {port}`, or set mlflow.tracking_uri=... to a reachable server "
            f"(mlflow.tracking_uri='' keeps a local sqlite file; mlflow.enabled=false turns tracking off)")


def _http_get(url: str, timeout_s: float) -> tuple[int | None, str, bytes]:
    """(HTTP status, description, body start) of one GET; status None when no server answered at all."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s) as resp:
            return resp.status, f"HTTP {resp.status}", resp.read(4096)
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code}", b""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, f"{type(reason).__name__}: {reason}", b""


def _check_http(uri: str, timeout_s: float) -> None:
    # MLflow's client would retry for minutes; one short probe of the REST API says more, sooner. The
    # experiments API answers JSON on an MLflow server; any other web server answers HTML or 404.
    base = uri.rstrip("/")
    status, why, body = _http_get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout_s)
    if status is None or status >= 500:
        raise ConfigError(f"MLflow tracking server {uri} is not reachable ({why}); {_fix_hint(uri)}")
    if status in (401, 403):
        return  # up, and wants MLFLOW_TRACKING_USERNAME/PASSWORD or a token: MLflow's client sends those
    try:
        is_mlflow = 200 <= status < 300 and isinstance(json.loads(body), dict)
    except ValueError:
        is_mlflow = False
    if not is_mlflow:
        raise ConfigError(f"{uri} answers HTTP ({why}) but is not an MLflow tracking server (its experiments API "
                          f"gave no MLflow JSON); check the host and port in mlflow.tracking_uri")


def check_tracking(uri: str, timeout_s: float = 5.0, *, must_exist: bool = False) -> None:
    """Fail before training starts when the tracking store cannot be used.

    Checks the scheme; an http(s) server with one short request to its REST API (a server that answers
    but is not MLflow is refused too); that a sqlite store's folder exists or can be created and is
    writable; refuses the plain file store that MLflow 3.17 disables by default.

    Args:
        uri: a resolved tracking URI (:func:`resolve_tracking_uri`).
        timeout_s: seconds for the HTTP probe.
        must_exist: a job that only reads what others logged (a registered encoder): a sqlite file that does
            not exist yet is a mistyped path, refused before anything is created.

    Returns:
        None; raises :class:`ConfigError` naming the URI, the cause and the fix.
    """
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else uri.split(":", 1)[0]
    if scheme not in _KNOWN_SCHEMES:
        raise ConfigError(f"mlflow.tracking_uri={uri!r}: unknown scheme {scheme!r}; use http(s)://HOST:PORT for a "
                          f"tracking server or sqlite:////abs/path/mlflow.db for a local file")
    if uri.startswith(("http://", "https://")):
        _check_http(uri, timeout_s)
        return
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise ConfigError(f"mlflow.tracking_uri={uri!r} is not a sqlite file URI (it needs three slashes "
                              f"before a relative path, four before an absolute one: sqlite:////abs/mlflow.db)")
        path = uri[len("sqlite:///"):]
        if not path or path == ":memory:":
            return
        folder = Path(path).parent
        if must_exist and not Path(path).is_file():
            raise ConfigError(f"MLflow store {uri}: no such file ({path}); this command reads encoders registered "
                              f"there, so check the path in mlflow.tracking_uri / MLFLOW_TRACKING_URI (the "
                              f"training run's store is <output_dir>/mlflow.db unless it named another)")
        try:
            probe_writable(folder, prefix=".mlflow-write-test")
        except OSError as exc:
            raise ConfigError(f"MLflow store {uri}: folder {folder} is not writable ({exc.strerror}); "
                              f"set mlflow.tracking_uri=sqlite:////a/writable/folder/mlflow.db, or "
                              f"{_fix_hint(uri)}") from None
        return
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise ConfigError(f"MLflow tracking store {uri} is a plain file store, which MLflow 3.17 refuses unless "
                          f"MLFLOW_ALLOW_FILE_STORE=true; use mlflow.tracking_uri='' (local sqlite) or a server")


def answers(uri: str, timeout_s: float = 5.0) -> bool:
    """Whether the store answers now (one short probe for a server; True for local stores). MLflow's client
    retries a lost server for minutes per call: the end of a run asks this first."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        _check_http(uri, timeout_s)
    except ConfigError:
        return False
    return True


def client(uri: str):
    """An ``MlflowClient`` whose registry calls go to the same store (MLflow's own default for the
    registry is ``./mlflow.db`` in the current directory, which Ray workers chdir away from).

    A sqlite store is created (or its schema upgraded) under a file lock the first time this process uses it:
    MLflow's own set-up is not safe when two processes open a new file at once (``table experiments already
    exists``, or an alembic "expected to match one row" error, when two first runs start together)."""
    from mlflow import MlflowClient

    quiet_mlflow_console()
    if uri not in _READY:
        with _sqlite_lock(uri):
            made = MlflowClient(tracking_uri=uri, registry_uri=uri)
            if uri.startswith("sqlite:"):  # the tracking and registry stores each create their tables on first use
                made.search_experiments(max_results=1)
                made.search_registered_models(max_results=1)
        _READY.add(uri)
        return made
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_READY: set[str] = set()  # stores this process has opened (and, for sqlite, set up) once


@contextlib.contextmanager
def _sqlite_lock(uri: str):
    """An exclusive lock on ``.<db name>.lock`` beside a sqlite store's file (no lock for anything else, or where
    the folder cannot take the lock file: a read-only store is never created, so it cannot race)."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    db = Path(path)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)  # where MLflow would create the file anyway
        handle = open(db.with_name(f".{db.name}.lock"), "a")  # noqa: SIM115 - held for the block
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite file (MLflow's default is ``./mlruns`` in the
    current directory, which Ray workers chdir away from); the server's own choice for anything else."""
    if uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(mlflow_client, name: str, uri: str) -> str:
    """The id of experiment ``name`` in the client's store, created (race-safely) when missing.

    Args:
        mlflow_client: an ``MlflowClient``.
        name: experiment name.
        uri: the client's tracking URI (decides the artifact location of a new experiment).

    Returns:
        The experiment id.
    """
    from mlflow.exceptions import MlflowException

    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=default_artifact_location(uri))
    except MlflowException:  # another process created it between the lookup and the create
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class _DeliberatePickle:
    """Drops mlflow.pytorch's caution about the pickle format, which the registry chooses on purpose (a pt2 model
    cannot switch BatchNorm to training mode for fine-tuning; registry.SERIALIZATION_FORMAT) and whose files its
    own loaders open knowing so. Any other MLflow warning passes."""

    @staticmethod
    def filter(record) -> bool:
        return not record.getMessage().startswith("Saving pytorch model by Pickle or CloudPickle format")


def quiet_mlflow_console() -> None:
    """Unless ``--verbose``: MLflow's INFO lines (database set-up, system-metrics monitor start and stop) stay out
    of a run's console, and the registry's deliberate pickle format is not warned about at every registration.
    MLflow's warnings and errors still show."""
    import logging

    if verbose():
        return
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    pytorch = logging.getLogger("mlflow.pytorch")
    if not any(isinstance(f, _DeliberatePickle) for f in pytorch.filters):
        pytorch.addFilter(_DeliberatePickle())
