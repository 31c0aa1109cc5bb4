"""Ray Tune: search files are checked up front; a CPU smoke search prunes, stops NaN trials, logs, restores."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from byol_ray.config import ConfigError
from byol_ray.tune import load_search

TINY = ["train.batch_size=64", "train.checkpoint_every_epochs=1", "model.projector_hidden_dim=128",
        "model.predictor_hidden_dim=128", "model.projector_dim=64", "data.loader=torch"]


def _search(tmp: Path, name: str, **fields) -> Path:
    spec = {"base_config": ["demo"], "overrides": TINY, "space": {"optim.base_lr": {"loguniform": [0.1, 2.0]}},
            **fields}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("fields,pattern", [
    ({"metrc": "epoch_loss"}, r"unknown search key 'metrc'"),
    ({"space": {"optim.base_lr": {"loguniform": [2.0, 0.1]}}}, r"impossible range"),
    ({"space": {"optim.base_lr": {"loguniform": [0.0, 1.0]}}}, r"impossible range \(need low < high, low > 0\)"),
    ({"space": {"optim.learning_rate": {"uniform": [0.1, 1.0]}}}, r"unknown config key 'optim.learning_rate'"),
    ({"space": {"train.tau_base": {"uniform": [0.9, 1.5]}}}, r"'train.tau_base' = 1.5 is out of range"),
    ({"space": {"optim.base_lr": {"normal": [0, 1]}}}, r"must be one of"),
    ({"metric": "val_accuracy"}, r"metric 'val_accuracy' is not reported by training"),
    ({"metric": "epoch_loss", "mode": "min"}, r"not comparable across trials and would pick the lowest τ"),
    ({"metric": "val_knn_top1"}, r"val_knn_top1 needs a held-out split: set data.val"),
    ({"scheduler": {"type": "hyperband"}}, r"hyperband"),
])
def test_bad_search_files_fail_before_any_trial(tmp_path, fields, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_search(str(_search(tmp_path, "bad", **fields)))


def test_shipped_search_spaces_load():
    for name in ("cpu_smoke", "cifar10_resnet18", "imagenet_resnet50"):
        spec, base = load_search(f"{Path(__file__).parents[1]}/tune_configs/{name}.yaml")
        assert {"optim.base_lr", "optim.weight_decay", "train.tau_base"} <= set(spec.space)
        assert spec.metric not in ("epoch_loss", "loss")


def test_selection_metric_defaults_to_held_out_knn_when_data_val_is_set(tmp_path, cifar_small):
    train, val = cifar_small
    spec, _ = load_search(str(_search(tmp_path, "auto", overrides=[*TINY, f"data.train={train}", f"data.val={val}"])))
    assert (spec.metric, spec.mode) == ("val_knn_top1", "max")
    spec, _ = load_search(str(_search(tmp_path, "probe")))
    assert (spec.metric, spec.mode) == ("epoch_classifier_acc", "max")


def _common(tmp: Path, uri: str) -> list[str]:
    return [f"output_dir={tmp}/runs", f"ray.storage_path={tmp}/ray", f"data.cache_dir={tmp}/cache",
            f"mlflow.tracking_uri={uri}"]


@pytest.mark.slow
def test_trial_larger_than_cluster_fails_fast(ray_cluster, tmp_path):
    from byol_ray.tune import run_search

    path = _search(tmp_path, "big")
    with pytest.raises(ConfigError, match="more than the cluster has"):
        run_search(str(path), name="big", overrides=["ray.num_workers=8", "mlflow.enabled=false",
                                                      f"output_dir={tmp_path}/runs", f"ray.storage_path={tmp_path}/ray"])


@pytest.mark.slow
def test_cpu_smoke_search_selects_on_held_out_knn_stops_nan_and_registers_best(ray_cluster, mlflow_server, tmp_path,
                                                                               cifar_small):
    from mlflow import MlflowClient

    from byol_ray.tune import run_search

    # 3 trials on real CIFAR-10 images with a held-out split, 2 at a time: two sane learning rates and one so
    # large that the loss turns NaN at once. No metric in the file: held-out kNN top-1 (val_knn_top1) is used.
    train, val = cifar_small
    path = _search(tmp_path, "smoke", overrides=[*TINY, "train.epochs=3", f"data.train={train}", f"data.val={val}"],
                   space={"optim.base_lr": {"grid": [1.0, 1.0e5, 0.3]}}, num_samples=1,
                   max_concurrent_trials=2, scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2})
    before = signal.getsignal(signal.SIGINT)
    summary = run_search(str(path), name="smoke", overrides=_common(tmp_path, mlflow_server))
    # Tune's own Ctrl-C handler is gone once the search is over (a Ctrl-C while the best is registered interrupts)
    assert signal.getsignal(signal.SIGINT) is before
    assert summary["metric"] == "val_knn_top1"
    rows = {r["params"]["optim.base_lr"]: r for r in summary["rows"]}
    assert len(rows) == 3
    assert rows[1.0e5]["stopped_by"] == "nan_loss" and rows[1.0e5]["epochs"] < 3
    finished = [r for r in summary["rows"] if r["stopped_by"] == "completed"]
    assert finished and all(0.0 <= r["val_knn_top1"] <= 1.0 for r in finished)
    best = summary["best"]
    assert best["params"]["optim.base_lr"] != 1.0e5
    assert best["val_knn_top1"] == max(r["val_knn_top1"] for r in summary["rows"] if r["stopped_by"] in ("completed", "asha")
                                       and r["val_knn_top1"] == r["val_knn_top1"])
    # registered under the search's own name (not the demo preset's), with a training run's card + search tags
    assert summary["registered"]["name"] == "smoke-encoder"
    assert (tmp_path / "ray" / "smoke" / "summary.md").read_text().count("| ") >= 4

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    exp = client.get_experiment_by_name("byol-ray")
    parents = client.search_runs([exp.experiment_id], "tags.`byol_ray.search` = 'smoke'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(children) == 3
    by_lr = {float(c.data.params["optim.base_lr"]): c for c in children}
    assert by_lr[1.0e5].data.tags["stop_reason"] == "nan_loss"
    assert all(c.info.status != "RUNNING" for c in children)
    assert client.get_metric_history(by_lr[best["params"]["optim.base_lr"]].info.run_id, "val_knn_top1")
    versions = client.search_model_versions("name = 'smoke-encoder'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["search.name"] == "smoke" and tags["search.trial_id"] == best["trial_id"]
    assert tags["search.metric"] == "val_knn_top1" and float(tags["search.val_knn_top1"]) == best["val_knn_top1"]
    assert tags["search.parent_run_id"] == parents[0].info.run_id
    for key in ("architecture", "eval_transform", "training", "final_metrics"):
        assert key in tags, sorted(tags)
    assert json.loads(tags["final_metrics"])["val_knn_top1"] == pytest.approx(best["val_knn_top1"], rel=1e-5)


@pytest.mark.slow
def test_killed_driver_restores_from_the_bucket_without_rerunning_finished_trials(ray_cluster, mlflow_server,
                                                                                  s3_server, tmp_path):
    """Tune's state, every trial's checkpoints and the summary live in an object store (no shared disk); a
    driver killed mid-search is restored from the bucket and the best trial's encoder registered from it."""
    from mlflow import MlflowClient

    cluster, _ = ray_cluster
    bucket = s3_server.bucket("tune")
    path = _search(tmp_path, "restore", overrides=[*TINY, "train.epochs=2"],
                   space={"optim.base_lr": {"grid": [0.3, 1.0]}}, num_samples=1, max_concurrent_trials=1,
                   scheduler={"type": "fifo"})
    cmd = [str(Path(sys.executable).parent / "byol-ray"), "tune", "--search", str(path), "--search-name", "restore",
           *_common(tmp_path, mlflow_server), f"ray.storage_path={s3_server.uri(bucket, 'ray')}"]

    def trials() -> dict[str, set[str]]:
        """trial folder -> its checkpoint names, from the bucket"""
        found: dict[str, set[str]] = {}
        for key in s3_server.keys(bucket, "ray/restore-"):
            parts = key.split("/")
            if len(parts) == 5 and parts[2] == "checkpoints" and parts[4] == "state.pt":
                found.setdefault(parts[1], set()).add(parts[3])
        return found

    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    log = open(tmp_path / "first.log", "w")
    # two trials, one at a time: the driver is killed once trial 1 has finished and trial 2 has checkpointed its
    # first epoch. The first driver saves Tune's experiment state every second (Tune's own period is at least 10 s),
    # so by then the saved state knows trial 1 ended: trial 2 starts only after trial 1, and its group's start and
    # first epoch take several seconds. (Every step, TUNE_GLOBAL_CHECKPOINT_S=0, was some 14,000 requests to the
    # object store in this case alone: most of its CPU time.)
    driver = subprocess.Popen(cmd, env={**env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    finished: set[str] = set()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and driver.poll() is None:
        now = trials()
        running = [t for t, ckpts in now.items() if "epoch_0001" in ckpts and "epoch_0002" not in ckpts]
        if len(now) >= 2 and running:
            finished = {t for t, ckpts in now.items() if "epoch_0002" in ckpts}
            break
        time.sleep(0.5)
    assert finished and driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-search
    driver.wait()

    out = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    summary = json.loads(s3_server.client().get_object(Bucket=bucket, Key="ray/restore/summary.json")["Body"].read())
    assert len(summary["rows"]) == 2 and all(r["stopped_by"] == "completed" for r in summary["rows"])

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    exp = client.get_experiment_by_name("byol-ray")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], "tags.`byol_ray.search` != ''")
            if r.info.run_name}
    children = client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'restore-%'")
    assert len(children) == 2, [c.info.run_name for c in children]
    for child in children:
        if child.info.run_name in finished:  # finished before the kill: never started again
            assert "resume_count" not in child.data.tags, child.info.run_name
    assert "restore" in runs
    # the best trial's encoder was registered from its checkpoint in the bucket
    registered = summary["registered"]
    assert registered and registered["checkpoint"].startswith(f"s3://{bucket}/ray/restore-"), registered
    assert client.get_model_version(registered["name"], registered["version"]).tags["search.name"] == "restore"
    assert not list(tmp_path.glob("s3:*")) and not (tmp_path / "ray").exists()  # nothing local under a URI's name
