"""`ray job submit` against a real local head, as a platform engineer runs it: outputs outlive the job,
relative outputs are refused, `ray job stop` closes the MLflow run, a resumed job continues it."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_cluster_smoke_command() -> str:
    """The README's `ray job submit ... byol-ray train --config demo ...` command, joined into one line."""
    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            if line.startswith("ray job submit") and "byol-ray train --config demo" in line:
                return line.split("#", 1)[0].strip()
    raise AssertionError("README.md has no `ray job submit ... byol-ray train --config demo` command")


def _as_here(command: str, dashboard: str, shared: Path, mlflow_uri: str) -> list[str]:
    """The README's placeholders filled in for this machine; nothing else of the command changes."""
    command = (command.replace("http://HEAD:8265", dashboard).replace("/mnt/shared", str(shared))
               .replace("http://MLFLOW:5000", mlflow_uri))
    return shlex.split(command)


def _ray(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _job_status(dashboard: str, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(dashboard).get_job_status(job_id).value)


def _wait_job(dashboard: str, job_id: str, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _job_status(dashboard, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    return "TIMEOUT"


def _submit_no_wait(dashboard: str, job_id: str, *entrypoint: str) -> None:
    out = _ray("job", "submit", "--address", dashboard, "--submission-id", job_id, "--no-wait", "--",
               *entrypoint, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _logs(dashboard: str, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard).get_job_logs(job_id)


def test_readme_cluster_command_keeps_every_output(ray_cluster, mlflow_server, tmp_path):
    _, dashboard = ray_cluster
    shared = tmp_path / "shared"
    shared.mkdir()
    command = _as_here(readme_cluster_smoke_command(), dashboard, shared, mlflow_server)
    assert command[:2] == ["ray", "job"]
    out = subprocess.run([str(BIN / "ray"), *command[1:]], capture_output=True, text=True, timeout=900, cwd=REPO)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log, log[-4000:]
    # What the user looks for afterwards, after Ray has cleaned up the job's working-dir copy
    folder = re.search(r"run folder: (\S+)", log)
    assert folder, log[-3000:]
    run = Path(folder.group(1))
    assert run.is_relative_to(shared), run
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*"))[-1] == "epoch_0002"
    assert (run / "checkpoints" / "epoch_0002" / "state.pt").is_file()
    run_id = (run / "mlflow_run_id").read_text().strip()
    client = _client(mlflow_server)
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    tags = mlflow_run.data.tags
    assert tags["ray.submission_id"].startswith("raysubmit_") and len(tags.get("git_commit", "")) == 40
    name, version = tags["registered_model"].split("/")
    assert client.get_model_version(name, version).run_id == run_id

    # `ray job logs`, as its user reads the job again: each progress line once (Ray Train V2's print patch had
    # doubled them), no Ray-internal line, the end once
    import yaml

    from test_console import PROGRESS, RAY_INTERNAL, _progress

    logs = _ray("job", "logs", "--address", dashboard, tags["ray.submission_id"], timeout=120)
    assert logs.returncode == 0, logs.stderr[-2000:]
    console = logs.stdout
    config = yaml.safe_load((run / "config.yaml").read_text())
    every, epochs = config["train"]["log_every_steps"], config["train"]["epochs"]
    last_step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    progress = _progress(console)
    assert {int(PROGRESS.match(line).group(1)) for line in progress} == set(range(every, last_step + 1, every)), \
        console[-4000:]
    assert set(progress.values()) == {1}, progress
    assert not RAY_INTERNAL.findall(console), console[-4000:]
    assert console.count(f"run {config['run_name']} finished: epoch {epochs}") == 1, console[-4000:]


def test_relative_outputs_under_a_job_are_refused_before_any_work(ray_cluster, tmp_path):
    _, dashboard = ray_cluster
    job_id = f"relative-{os.getpid()}-{int(time.time())}"
    # the README's command without its shared paths: output_dir and the MLflow store default to runs/
    _submit_no_wait(dashboard, job_id, "byol-ray", "train", "--config", "demo", "train.epochs=2")
    assert _wait_job(dashboard, job_id, 300) == "FAILED"
    log = _logs(dashboard, job_id)
    assert "byol-ray train: error: output_dir='runs' is a relative path" in log, log[-3000:]
    assert "Traceback" not in log and "epoch " not in log  # refused before training started


def test_job_stop_marks_the_run_killed_and_a_resumed_job_continues_it(ray_cluster, mlflow_server, tmp_path):
    _, dashboard = ray_cluster
    shared = tmp_path / "shared"
    name = "stopped"
    args = ["byol-ray", "train", "--config", "demo", f"run_name={name}", f"output_dir={shared}",
            f"mlflow.tracking_uri={mlflow_server}", f"data.cache_dir={shared}/cache", "train.epochs=4"]
    first = f"stop-{os.getpid()}-{int(time.time())}"
    _submit_no_wait(dashboard, first, *args)
    marker = shared / name / "mlflow_run_id"
    deadline = time.monotonic() + 400
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert marker.exists(), _logs(dashboard, first)[-3000:]
    run_id = marker.read_text().strip()
    # into the second epoch: a new run stopped before its first epoch ends leaves nothing to resume (its folder is
    # removed, so that the name is free again), whatever the machine's load
    epoch_end = shared / name / "metrics.jsonl"
    while not epoch_end.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert epoch_end.exists(), _logs(dashboard, first)[-3000:]
    stop = _ray("job", "stop", "--address", dashboard, first, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert _wait_job(dashboard, first, 120) == "STOPPED"
    client = _client(mlflow_server)
    assert client.get_run(run_id).info.status == "KILLED"

    second = f"resume-{os.getpid()}-{int(time.time())}"
    _submit_no_wait(dashboard, second, "byol-ray", "train", "--resume", name, f"output_dir={shared}")
    assert _wait_job(dashboard, second, 900) == "SUCCEEDED", _logs(dashboard, second)[-4000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.submission_id"] == second
    assert run.data.tags["ray.submission_ids"].split(",") == [first, second]
    experiment_runs = client.search_runs([run.info.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert [r.info.run_id for r in experiment_runs] == [run_id]  # no second MLflow run
    # the curve continues on the global-step axis (an epoch the stop cut short is trained, and logged, again)
    steps = sorted({m.step for m in client.get_metric_history(run_id, "epoch_loss")})
    final = json.loads((shared / name / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["epoch"] == 4 and steps == [final["step"] // 4 * k for k in (1, 2, 3, 4)]
