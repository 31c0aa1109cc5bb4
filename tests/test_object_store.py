"""Object stores without a shared disk: paths that are URIs, staging data to the node, bad stores refused early.

Everything runs against the session's real S3-compatible server on loopback (``fixtures_s3.py``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from byol_ray.config import ConfigError
from byol_ray.storage import Location, check_writable
from disks import tmpfs

BYOL_RAY = Path(sys.executable).with_name("byol-ray")


def test_paths_join_before_the_query_and_files_round_trip(s3_server):
    bucket = s3_server.bucket()
    root = Location(s3_server.uri(bucket, "runs"))
    run = root / "my-run" / "checkpoints"
    assert run.uri == f"s3://{bucket}/runs/my-run/checkpoints?endpoint_override={s3_server.hostport}&scheme=http"
    assert run.parent == root / "my-run" and run.parent.parent == root and run.name == "checkpoints"
    assert run.path == f"{bucket}/runs/my-run/checkpoints"
    history = root / "my-run" / "metrics.jsonl"
    assert not history.exists()
    history.append_line('{"epoch": 1}')
    history.append_line('{"epoch": 2}')
    assert history.read_text().splitlines() == ['{"epoch": 1}', '{"epoch": 2}']
    (run / "epoch_0001" / "state.pt").write_bytes(b"x" * 10)
    assert run.children() == ["epoch_0001"] and (run / "epoch_0001" / "state.pt").size() == 10
    assert s3_server.keys(bucket) == ["runs/my-run/checkpoints/epoch_0001/state.pt", "runs/my-run/metrics.jsonl"]
    (root / "my-run").remove_tree()
    assert not [k for k in s3_server.keys(bucket) if k.startswith("runs/my-run")]  # pyarrow keeps a "runs/" marker
    # a local location is an os.PathLike; an object-store one is not
    assert Path(Location("/tmp/x") / "y") == Path("/tmp/x/y")
    with pytest.raises(TypeError, match="object-store URI"):
        Path(run)


@pytest.mark.parametrize("case,pattern", [
    ("missing bucket", r"ray.storage_path='s3://no-such-bucket-\w+/runs.*' is not writable: the bucket "
                       r"'no-such-bucket-\w+' does not exist \(create it first\)"),
    ("unreachable", r"is not writable: the endpoint cannot be reached \(check AWS_ENDPOINT_URL"),
    ("unknown scheme", r"ray.storage_path='nosuch://bucket/runs': no filesystem for nosuch:// URIs here"),
    ("credentials in the URI", r"carries credentials in the URI"),
])
def test_unusable_stores_are_refused_in_one_line(s3_server, case, pattern):
    uri = {"missing bucket": s3_server.uri(f"no-such-bucket-{os.getpid()}", "runs"),
           "unreachable": "s3://bucket/runs?endpoint_override=127.0.0.1:1&scheme=http",
           "unknown scheme": "nosuch://bucket/runs",
           "credentials in the URI": "s3://AKIAEXAMPLE:hunter2@bucket/runs"}[case]
    with pytest.raises(ConfigError, match=pattern) as err:
        check_writable(uri, "ray.storage_path")
    assert "\n" not in str(err.value) and "hunter2" not in str(err.value)


def test_train_refuses_a_missing_bucket_before_ray_starts_and_writes_nothing(s3_server, tmp_path):
    """The CLI a user types: one line, exit 2, within seconds, no run folder, no Ray started."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([str(BYOL_RAY), "train", "--config", "demo", "run_name=r", f"output_dir={tmp_path / 'runs'}",
                          f"ray.storage_path={s3_server.uri('missing-bucket-x', 'runs')}"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("byol-ray train: error: ray.storage_path=") \
        and "bucket 'missing-bucket-x' does not exist" in lines[0], lines
    assert not (tmp_path / "runs" / "r").exists()


def test_no_ray_keeps_its_local_refusal(s3_server, tmp_path):
    from byol_ray.config import load_config
    from byol_ray.train import train_local

    bucket = s3_server.bucket()
    for key in ("ray.storage_path", "output_dir"):
        cfg = load_config(["demo"], [f"{key}={s3_server.uri(bucket, 'runs')}", "run_name=x"])
        with pytest.raises(ConfigError, match=rf"{key}=.* is an object-store URI, which only Ray Train writes to"):
            train_local(cfg)
    assert s3_server.keys(bucket) == []


@pytest.fixture(scope="module")
def demo_beton(tmp_path_factory):
    from byol_ray.data.prepare import prepare

    out = tmp_path_factory.mktemp("beton") / "demo.beton"
    prepare("demo", str(out), progress=False, num_workers=1)
    return out


def test_data_from_the_bucket_is_staged_once_verified_and_reused(s3_server, demo_beton, tmp_path):
    from byol_ray.data.cache import stage
    from byol_ray.data.check import check_remote_beton

    bucket = s3_server.bucket("data")
    s3_server.upload(demo_beton, bucket, "sets/demo.beton")
    s3_server.upload(Path(f"{demo_beton}.json"), bucket, "sets/demo.beton.json")
    uri = s3_server.uri(bucket, "sets/demo.beton")
    assert check_remote_beton(uri, "data.train") == 1797  # the header, read in place
    local = Path(stage(uri, tmp_path / "cache", "data.train", progress=False))
    assert local.read_bytes() == demo_beton.read_bytes()
    stamp = json.loads(local.with_name(f"{local.name}.source.json").read_text())
    assert stamp["verified_against"] == "prepare manifest" and stamp["size"] == demo_beton.stat().st_size
    assert json.loads(Path(f"{local}.json").read_text())["checksums"]["demo.beton"]["sha256"] == stamp["sha256"]
    before = local.stat().st_mtime_ns
    assert Path(stage(uri, tmp_path / "cache", "data.train", progress=False)) == local  # reused, not copied again
    assert local.stat().st_mtime_ns == before and not list(local.parent.glob(".*.tmp-*"))

    # an upload that does not match what prepare recorded is refused, and nothing half-copied is left
    damaged = bytearray(demo_beton.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in the data region
    s3_server.client().put_object(Bucket=bucket, Key="sets/bad.beton", Body=bytes(damaged))
    manifest = json.loads(Path(f"{demo_beton}.json").read_text())
    manifest["checksums"] = {"bad.beton": manifest["checksums"]["demo.beton"]}
    s3_server.client().put_object(Bucket=bucket, Key="sets/bad.beton.json", Body=json.dumps(manifest).encode())
    with pytest.raises(ConfigError, match=r"data.train=.*bad.beton.*does not match .* recorded by `byol-ray prepare`"):
        stage(s3_server.uri(bucket, "sets/bad.beton"), tmp_path / "cache", "data.train", progress=False)
    assert not [p for p in (tmp_path / "cache").rglob("bad.beton*") if not p.name.endswith(".lock")]

    # a truncated upload is refused from its header, before anything is copied
    s3_server.client().put_object(Bucket=bucket, Key="sets/cut.beton", Body=demo_beton.read_bytes()[:5000])
    with pytest.raises(ConfigError, match=r"data.val=.*cut.beton.* is truncated"):
        check_remote_beton(s3_server.uri(bucket, "sets/cut.beton"), "data.val")
    with pytest.raises(ConfigError, match=r"data.train=.*nothing.beton.* does not exist \(no such object\)"):
        check_remote_beton(s3_server.uri(bucket, "sets/nothing.beton"), "data.train")
    with pytest.raises(ConfigError, match=r"must be a .beton file"):
        check_remote_beton(s3_server.uri(bucket, "sets/"), "data.train")


def test_staging_refuses_a_node_disk_that_cannot_hold_the_file(s3_server, demo_beton, tmp_path):
    from byol_ray.data.cache import stage

    small = tmp_path / "small-disk"
    with tmpfs(small, "size=1m"):
        bucket = s3_server.bucket("data")
        s3_server.upload(demo_beton, bucket, "demo.beton")
        with pytest.raises(ConfigError, match=r"data.train=.*demo.beton.* GiB but the node's cache disk .* set "
                                              r"data.cache_dir=\.\.\. to a larger local disk"):
            stage(s3_server.uri(bucket, "demo.beton"), small, "data.train", progress=False)
        assert not [p for p in small.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


# ----------------------------------------------------------------------------- on the loopback cluster

REPO = Path(__file__).resolve().parents[1]


def _readme_object_store_commands() -> list[str]:
    """The README's commands that name s3://BUCKET, each joined into one line."""
    import re

    text = (REPO / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            # embed's and knn's bucket commands are run by tests/test_embed.py
            if "s3://BUCKET" in line and not line.lstrip().startswith("#") and "byol-ray embed" not in line \
                    and "byol-ray knn" not in line:
                found.append(line.split(" #", 1)[0].strip())
    return found


def _as_here(command: str, s3_server, bucket: str, dashboard: str, mlflow_uri: str, run: str = "RUN") -> list[str]:
    """The README's placeholders filled in for this machine: the endpoint goes into each URI, nothing else changes."""
    import re
    import shlex

    command = command.replace("http://HEAD:8265", dashboard).replace("http://MLFLOW:5000", mlflow_uri)
    command = command.replace("/RUN/", f"/{run}/")
    command = re.sub(r"s3://BUCKET/(\S+)", lambda m: shlex.quote(s3_server.uri(bucket, m.group(1))), command)
    return shlex.split(command)


@pytest.mark.slow
def test_readme_object_store_commands_on_the_cluster(ray_cluster, mlflow_server, s3_server, cifar_small, tmp_path):
    """The README's `ray job submit` with data, run folder and checkpoints in the bucket and the MLflow server's
    artifacts there too: SUCCEEDED; everything a user looks for afterwards is in the bucket; the encoder is pulled
    by alias downstream; `register --checkpoint s3://...` works; the credentials are written nowhere."""
    import re

    from mlflow import MlflowClient

    from byol_ray.data.prepare import prepare
    from fixtures_mlflow import MLFLOW_ARTIFACTS_BUCKET
    from fixtures_s3 import TEST_SECRET

    _, dashboard = ray_cluster
    train, _ = cifar_small
    prepare(str(train), str(tmp_path / "train.beton"), val_fraction=0.25, progress=False, num_workers=1)
    bucket = s3_server.bucket("readme")
    for name in ("train.beton", "train.beton.json", "train.val.beton"):
        s3_server.upload(tmp_path / name, bucket, f"cifar10/{name}")
    submit, register = _readme_object_store_commands()
    command = _as_here(submit, s3_server, bucket, dashboard, mlflow_server)
    assert command[:3] == ["ray", "job", "submit"]
    out = subprocess.run([str(BYOL_RAY.with_name("ray")), *command[1:]], capture_output=True, text=True,
                         timeout=900, cwd=tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log, log[-4000:]
    run = re.search(r"run (\S+) finished", log).group(1)

    # what the user looks for afterwards, all in the bucket
    keys = s3_server.keys(bucket, f"byol-ray/{run}/")
    for key in ("config.yaml", "metrics.jsonl", "validation.jsonl", "mlflow_run_id", "plots/loss.png",
                "checkpoints/epoch_0002/state.pt", "checkpoints/epoch_0001/state.pt"):
        assert f"byol-ray/{run}/{key}" in keys, keys
    assert f"run folder: s3://{bucket}/byol-ray/{run}?endpoint_override=" in log
    body = s3_server.client().get_object(Bucket=bucket, Key=f"byol-ray/{run}/metrics.jsonl")["Body"].read()
    assert [json.loads(line)["epoch"] for line in body.decode().splitlines()] == [1, 2]
    run_id = s3_server.client().get_object(Bucket=bucket, Key=f"byol-ray/{run}/mlflow_run_id")["Body"].read().decode()
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.metrics["val_knn_top1"] >= 0
    name, version = mlflow_run.data.tags["registered_model"].split("/")
    # the registered encoder's files are in the artifact bucket, served by the tracking server
    artifacts = s3_server.keys(MLFLOW_ARTIFACTS_BUCKET)
    assert any(k.endswith("data/model.pth") or k.endswith("MLmodel") for k in artifacts), artifacts[:20]
    assert any(run_id in k and k.endswith("loss.png") for k in artifacts)
    # the credentials were written nowhere: not in the bucket's run folder, MLflow, or the job's output
    texts = [s3_server.client().get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys if not k.endswith(".pt")
             and not k.endswith(".png")]
    assert not [t for t in texts if TEST_SECRET.encode() in t]
    assert TEST_SECRET not in json.dumps({**mlflow_run.data.params, **mlflow_run.data.tags}) and TEST_SECRET not in log

    # downstream pulls the encoder by alias through the server (artifacts from the bucket)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    promote = subprocess.run([str(BYOL_RAY), "promote", "--model", f"models:/{name}/{version}", "--force"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert promote.returncode == 0, promote.stderr[-2000:]
    evaluate = subprocess.run([str(BYOL_RAY), "linear-eval", "--model", f"{name}@champion", "--train", str(train),
                               "--epochs", "2", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert 0.0 <= json.loads(evaluate.stdout)["linear_top1"] <= 1.0

    # the README's register command, from a checkpoint in the bucket
    reg = _as_here(register, s3_server, bucket, dashboard, mlflow_server, run=run)
    done = subprocess.run([str(BYOL_RAY), *reg[1:], "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    registered = json.loads(done.stdout)
    assert registered["name"] == name and int(registered["version"]) == int(version) + 1
    card = client.get_model_version(name, registered["version"])
    assert "checkpoints/epoch_0002" in card.tags.get("checkpoint", json.dumps(card.tags))

    # the run-name rule holds in the bucket: a new run of the same name is refused, nothing overwritten
    before = s3_server.client().head_object(Bucket=bucket, Key=f"byol-ray/{run}/config.yaml")["ETag"]
    again = subprocess.run([str(BYOL_RAY), "train", "--config", "cifar10_cpu", f"run_name={run}",
                            f"data.train={s3_server.uri(bucket, 'cifar10/train.beton')}",
                            f"output_dir={s3_server.uri(bucket, 'byol-ray')}", f"mlflow.tracking_uri={mlflow_server}",
                            f"ray.address={ray_cluster[0].address}"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and f"a run named '{run}' already exists" in again.stderr, again.stderr[-2000:]
    assert s3_server.client().head_object(Bucket=bucket, Key=f"byol-ray/{run}/config.yaml")["ETag"] == before


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_from_the_bucket_with_the_same_losses(ray_cluster, mlflow_server, s3_server,
                                                                             cifar_small, tmp_path):
    """Checkpoints only in the bucket: a driver killed (SIGKILL) after a mid-epoch checkpoint, then `--resume`,
    logs exactly the loss sequence of an uninterrupted run of the same config."""
    import signal
    import time

    from mlflow import MlflowClient

    train, _ = cifar_small
    bucket = s3_server.bucket("resume")
    common = ["--config", "demo", f"data.train={train}", "data.loader=torch", "data.num_workers=1",
              "model.projector_hidden_dim=64", "model.predictor_hidden_dim=64", "model.projector_dim=32",
              "train.batch_size=64", "train.epochs=2", "train.log_every_steps=1", "train.checkpoint_every_steps=3",
              f"ray.address={ray_cluster[0].address}", f"ray.storage_path={s3_server.uri(bucket, 'ckpt')}",
              f"output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
              f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=s3-resume", "mlflow.register_name=",
              "mlflow.system_metrics_every_s=0"]
    # the uninterrupted run goes on beside the interrupted one (1 of the cluster's 4 CPUs each), started first so
    # that the MLflow experiment exists before the second run looks it up
    whole_log = open(tmp_path / "whole.log", "wb")
    whole = subprocess.Popen([str(BYOL_RAY), "train", *common, "run_name=whole"], stdout=whole_log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "runs" / "whole" / "mlflow_run_id").exists():
            assert whole.poll() is None and time.monotonic() < deadline, (tmp_path / "whole.log").read_text()[-3000:]
            time.sleep(0.3)

        log = open(tmp_path / "cut.log", "wb")
        proc = subprocess.Popen([str(BYOL_RAY), "train", *common, "run_name=cut"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        mid = "ckpt/cut/checkpoints/epoch_0000-step_00000006/state.pt"  # 9 steps an epoch: inside the first one
        deadline = time.monotonic() + 300
        while mid not in s3_server.keys(bucket, "ckpt/cut/") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
        assert proc.poll() is None, (tmp_path / "cut.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-epoch; its Train run dies with it
        proc.wait()
        assert "ckpt/cut/checkpoints/epoch_0002/state.pt" not in s3_server.keys(bucket)
        resumed = subprocess.run([str(BYOL_RAY), "train", "--resume", "cut", f"output_dir={tmp_path / 'runs'}"],
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming cut from the latest checkpoint Ray Train recorded as complete" in resumed.stderr, \
            resumed.stderr[-3000:]
        whole.wait(timeout=600)
    finally:
        if whole.poll() is None:  # the test failed before it ended
            os.killpg(whole.pid, signal.SIGKILL)
    assert whole.returncode == 0, (tmp_path / "whole.log").read_text()[-3000:]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("s3-resume")
    losses = {}
    for name in ("whole", "cut"):
        (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
        assert run.info.status == "FINISHED"
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        assert [s for s, _ in history] == list(range(1, 19)), history  # every step once
        losses[name] = [v for _, v in history]
    assert losses["cut"] == pytest.approx(losses["whole"], rel=1e-6, abs=1e-7)


def test_a_read_only_output_folder_is_refused_in_one_line(tmp_path):
    """The probe write catches a prefix the process may not write (here a read-only mount, which root cannot
    write either)."""
    folder = tmp_path / "ro"
    with tmpfs(folder, "ro,size=1m"):
        with pytest.raises(ConfigError, match=r"output_dir='.*/ro/runs' is not writable: Read-only file system"):
            check_writable(str(folder / "runs"), "output_dir")
