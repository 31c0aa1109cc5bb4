"""One downstream job = one MLflow run tagged with the model version it pulled; results go back on the version."""
from __future__ import annotations

import contextlib
import time
from typing import Any

from byol_ray.registry import EncoderInfo
from byol_ray.mlflow_store import client, ensure_experiment
from byol_ray.run_tags import flatten, git_commit


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class JobRecord:
    """Context manager around a downstream job's run: FAILED when the block raises, FINISHED after
    :meth:`finish`. Tags ``model_name``/``model_version``/``model_uri`` say which encoder it evaluated."""

    def __init__(self, tracking_uri: str, experiment: str, job: str, info: EncoderInfo, requested: str,
                 params: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        """Args:
            tracking_uri: store URI (the registry's).
            experiment: experiment of the downstream runs.
            job: ``linear-eval``, ``finetune`` or ``knn``.
            info: the pulled version.
            requested: the reference as the user gave it (``models:/name@champion``).
            params: the job's settings, logged as params.
            data: data descriptions and fingerprints, logged as ``data.*`` tags.
        """
        self.client = client(tracking_uri)
        self.tracking_uri, self.experiment, self.job, self.info = tracking_uri, experiment, job, info
        self.requested, self.params, self.data = requested, params, data or {}
        self.run_id: str | None = None
        self._finished = False

    def __enter__(self) -> JobRecord:
        from mlflow.entities import Param

        experiment_id = ensure_experiment(self.client, self.experiment, self.tracking_uri)
        tags = {"job": self.job, "model_name": self.info.name, "model_version": self.info.version,
                "model_uri": self.requested, "model_aliases": ",".join(self.info.aliases),
                "model_architecture": self.info.architecture, "source_run_id": self.info.run_id or "",
                **git_commit(), **flatten(self.data, "data.")}
        run = self.client.create_run(experiment_id, run_name=f"{self.job}-{self.info.name}-v{self.info.version}",
                                     tags=tags)
        self.run_id = run.info.run_id
        params = flatten(self.params)
        self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        return self

    def finish(self, result: dict[str, Any], version_tags: dict[str, Any]) -> None:
        """Log the numeric results as metrics (strings as tags), write ``version_tags`` plus
        ``<job>_run_id`` onto the model version, and close the run FINISHED.

        Args:
            result: the job's result dict.
            version_tags: results that belong on the model version (``linear_top1``, ...).
        """
        from mlflow.entities import Metric, RunTag

        numbers = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        texts = {k: str(v) for k, v in result.items() if k not in numbers}
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in numbers.items()],
                              tags=[RunTag(f"result.{k}", v) for k, v in texts.items()])
        tags = {**{k: _fmt(v) for k, v in version_tags.items()}, f"{self.job.replace('-', '_')}_run_id": self.run_id}
        for key, value in tags.items():
            self.client.set_model_version_tag(self.info.name, self.info.version, key, value)
        self.client.set_terminated(self.run_id, status="FINISHED")
        self._finished = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is not None and not self._finished:
            with contextlib.suppress(Exception):
                self.client.set_tag(self.run_id, "error", f"{exc_type.__name__ if exc_type else 'unfinished'}: {exc}")
                stopped = exc_type is None or issubclass(exc_type, (KeyboardInterrupt, SystemExit))  # Ctrl-C, SIGTERM
                self.client.set_terminated(self.run_id, status="KILLED" if stopped else "FAILED")
