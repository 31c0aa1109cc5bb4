"""The product flow on real services: Ray-trained encoder (with a killed worker) → MLflow registry →
promote → a separate process pulls @champion → linear eval, fine-tune, kNN → results on the version."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_runs import STEPS_PER_EPOCH, STRAIGHT, final_state, launch_killing_a_worker, read_history, run_config

pytestmark = pytest.mark.slow


def _cli(*args: str, timeout: int = 600) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "byol-ray"), *args], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout


def test_train_register_promote_pull_evaluate(two_worker_run, mlflow_server, tmp_path):
    """The session's reference run's recipe (tests/ray_runs.py) with MLflow on, and a worker SIGKILLed in epoch 2:
    Ray Train restarts the group from the last checkpoint, and the run ends with the uninterrupted run's weights."""
    from mlflow import MlflowClient

    cfg = run_config(tmp_path, "e2e", *STRAIGHT, "ray.max_failures=1", "train.log_every_steps=5", "mlflow.enabled=true",
                     f"mlflow.tracking_uri={mlflow_server}", "mlflow.register_name=e2e-encoder")
    launch_killing_a_worker(cfg)
    epochs = [h["epoch"] for h in read_history(cfg)]
    assert epochs[-1] == 4 and len(epochs) > len(set(epochs)) or epochs == [1, 2, 3, 4]
    # deterministic resume: the final weights of the uninterrupted run, so the target was restored as saved
    faulty, straight = final_state(cfg), final_state(two_worker_run[0])
    assert faulty["step"] == straight["step"] == 4 * STEPS_PER_EPOCH
    for part in ("online", "target"):
        for key, value in straight[part].items():
            torch.testing.assert_close(faulty[part][key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=f"{part}.{key}": f"{k}: {m}")

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    exp = client.get_experiment_by_name("byol-ray")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'e2e'")
    assert len(runs) == 1, "the restarted worker group must log into the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("resume_count") == "1"
    assert run.data.params["model.encoder"] == "tiny" and run.data.params["derived.world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(steps) == 110  # logged every 5 steps; 4 epochs x 28 steps = 112
    # one step scale: epoch values at each epoch's last global step, no duplicates across the restart
    epoch_steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch_loss")]
    assert sorted(set(epoch_steps)) == [28, 56, 84, 112]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch"))[-1] == (112, 4)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    version = client.get_model_version("e2e-encoder", "1")
    assert version.run_id == run.info.run_id and version.tags["architecture"] == "tiny"

    uri = [f"mlflow.tracking_uri={mlflow_server}"]
    _cli("linear-eval", "--model", "models:/e2e-encoder/1", *uri, "--epochs", "5", "--batch-size", "128")
    print(_cli("promote", "--model", "models:/e2e-encoder/1", "--alias", "champion", *uri))
    # separate processes pull by alias
    _cli("finetune", "--model", "models:/e2e-encoder@champion", *uri, "--epochs", "1", "--label-fraction", "0.1",
         "--batch-size", "64")
    _cli("knn", "--model", "e2e-encoder@champion", *uri, "--batch-size", "256")
    tags = client.get_model_version("e2e-encoder", "1").tags
    for key in ("linear_top1", "linear_top5", "finetune_top1", "knn_top1"):
        assert 0.0 <= float(tags[key]) <= 1.0, key
    assert float(tags["knn_top1"]) > 0.2  # 10 classes: well above chance even after 4 tiny epochs
    assert client.get_registered_model("e2e-encoder").aliases == {"champion": "1"}
