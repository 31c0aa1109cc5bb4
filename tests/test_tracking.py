"""Tracking edge: store URIs, fail-fast checks, params/metrics/tags/artifacts in a real server, resume."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from byol_ray.config import ConfigError, derive, load_config
from byol_ray.engine import Reporter
from byol_ray.mlflow_store import check_tracking, resolve_tracking_uri
from byol_ray.plots import plot_curves
from byol_ray.tracker import MlflowTracker, NullTracker, TrackingReporter, build_tracker

FINGERPRINT = {"kind": "demo", "sha256": "ab12cd34", "num_samples": 1797}


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(["demo"], [f"output_dir={tmp_path / 'runs'}", "run_name=track-test", "train.epochs=3",
                                  *overrides])


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class _Recorder(Reporter):
    def __init__(self) -> None:
        self.logs, self.epochs = [], []

    def log(self, metrics, step):
        self.logs.append((dict(metrics), step))

    def epoch_end(self, metrics, epoch, state):
        self.epochs.append((dict(metrics), epoch, None if state is None else dict(state)))


# ----------------------------------------------------------------------------- URIs and checks


def test_default_store_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri("", "runs")
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")  # four slashes: an absolute path that survives a worker's chdir
    assert resolve_tracking_uri("sqlite:///rel/x.db", "runs") == f"sqlite:///{tmp_path / 'rel' / 'x.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db", "runs") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://10.0.0.5:5000", "runs") == "http://10.0.0.5:5000"
    assert resolve_tracking_uri("mlruns", "runs") == (tmp_path / "mlruns").as_uri()


def test_mlflow_tracking_uri_environment_variable_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("", "runs") == "http://127.0.0.1:5999"  # as MLflow's own tools do
    assert resolve_tracking_uri("sqlite:////abs/x.db", "runs") == "sqlite:////abs/x.db"  # the config wins


@pytest.mark.parametrize("uri,pattern", [
    ("bogus://x", r"unknown scheme 'bogus'"),
    ("sqlite://rel.db", r"not a sqlite file URI .*three slashes"),
])
def test_malformed_tracking_uris_are_config_errors(uri, pattern):
    with pytest.raises(ConfigError, match=pattern):
        check_tracking(resolve_tracking_uri(uri, "runs"))


def test_http_server_that_is_not_mlflow_is_refused(tmp_path):
    import functools
    import http.server

    (tmp_path / "index.html").write_text("<html><body>not mlflow</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ConfigError, match="is not an MLflow tracking server") as err:
            check_tracking(f"http://127.0.0.1:{server.server_address[1]}")
        assert "<html" not in str(err.value)
    finally:
        server.shutdown()


def test_unreachable_server_fails_fast_with_fix():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_tracking(uri)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert uri in message and "mlflow server" in message and "mlflow.tracking_uri" in message


def test_silent_server_times_out_under_ten_seconds():
    with socket.socket() as sock:  # accepts connections (kernel backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConfigError, match="not reachable"):
            check_tracking(uri)
        assert time.monotonic() - start < 10


def test_build_tracker_checks_before_training(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
        build_tracker(_cfg(tmp_path, f"mlflow.tracking_uri=http://127.0.0.1:{port}"))
    assert isinstance(build_tracker(_cfg(tmp_path, "mlflow.enabled=false")), NullTracker)
    assert isinstance(build_tracker(_cfg(tmp_path), is_main=False), NullTracker)  # rank > 0 never tracks


def test_unwritable_sqlite_folder_is_a_config_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker / 'sub' / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="not writable") as err:
        check_tracking(uri)
    assert uri in str(err.value)


def test_null_tracker_reporter_forwards_and_leaves_state_alone():
    inner = _Recorder()
    reporter = TrackingReporter(inner, NullTracker())
    reporter.log({"loss": 1.0}, 5)
    state = {"step": 5}
    reporter.epoch_end({"epoch_loss": 1.0, "epoch": 1, "step": 5}, 1, state)
    assert inner.logs == [({"loss": 1.0}, 5)]
    assert inner.epochs[0][2] == {"step": 5}  # no run id without a run


# ----------------------------------------------------------------------------- a real store


def test_nonblocking_metrics_flush_on_finish(sqlite_store, tmp_path):
    cfg = _cfg(tmp_path)
    tracker = MlflowTracker(sqlite_store, "nonblocking")
    run_id = tracker.start(cfg)
    real_log_batch = tracker.client.log_batch
    release = threading.Event()

    def slow_log_batch(*args, **kwargs):  # a server that stalls until released
        if kwargs.get("metrics"):
            release.wait(30)
        return real_log_batch(*args, **kwargs)

    tracker.client.log_batch = slow_log_batch
    start = time.monotonic()
    for step in range(1, 101):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    assert time.monotonic() - start < 0.5  # the training loop never waits for the server
    release.set()
    tracker.finish()
    history = _client(sqlite_store).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 101))
    assert _client(sqlite_store).get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_params_metrics_tags_artifacts_land_on_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "05000000")  # as inside a Ray job
    cfg = _cfg(tmp_path)
    derived = derive(cfg, 1797, 1)
    tracker = MlflowTracker(mlflow_server, "tracking-test")
    run_id = tracker.start(cfg, derived=derived, data_fingerprint=FINGERPRINT, tags={"purpose": "test"})
    inner = _Recorder()
    reporter = TrackingReporter(inner, tracker)
    history = []
    for epoch in range(1, 4):
        for i in range(1, 4):
            step = (epoch - 1) * 3 + i
            reporter.log({"loss": 2.0 / step, "lr": 0.01 * step, "images_per_s": 100.0}, step)
        row = {"epoch_loss": 2.0 / epoch, "epoch_classifier_acc": 0.2 * epoch, "epoch": epoch, "step": 3 * epoch,
               "images_per_s": 90.0}
        history.append(row)
        state = {"step": 3 * epoch} if epoch == 3 else None
        reporter.epoch_end(row, epoch, state)
    assert inner.epochs[-1][2]["mlflow_run_id"] == run_id  # written before the inner reporter saved it
    assert len(inner.logs) == 9
    run_dir = tmp_path / "runs" / cfg.run_name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model:\n  encoder: tiny\n")
    plots = plot_curves(history, run_dir / "plots")
    assert {p.name for p in plots} == {"loss.png", "probe_accuracy.png"}
    tracker.log_artifact(run_dir / "config.yaml")
    for plot in plots:
        tracker.log_artifact(plot, "plots")
    tracker.finish()

    client = _client(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "track-test"
    params = run.data.params
    assert params["model.encoder"] == "tiny"
    assert float(params["optim.base_lr"]) == cfg.optim.base_lr
    assert float(params["derived.peak_lr"]) == pytest.approx(derived.peak_lr)
    assert params["data.crop_scale"] == "[0.2, 1.0]"
    assert params["augment.view2.solarize_prob"] == "0.2"
    tags = run.data.tags
    assert tags["data.sha256"] == "ab12cd34" and tags["purpose"] == "test" and tags["ray.job_id"] == "05000000"
    assert tags["ray.run_name"] == "track-test"
    assert len(tags.get("git_commit", "x" * 40)) == 40
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 10))
    # one step scale for every metric: epoch values sit at the epoch's last global step, `epoch` is a metric
    epoch_loss = client.get_metric_history(run_id, "epoch_loss")
    assert sorted((m.step, m.value) for m in epoch_loss) == [(3, 2.0), (6, 1.0), (9, pytest.approx(2 / 3))]
    assert {m.step for m in client.get_metric_history(run_id, "epoch_images_per_s")} == {3, 6, 9}
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "epoch")) == [(3, 1), (6, 2), (9, 3)]
    artifacts = {a.path for folder in (None, "plots") for a in client.list_artifacts(run_id, folder)}
    assert {"config.yaml", "plots/loss.png", "plots/probe_accuracy.png"} <= artifacts


@pytest.mark.slow
def test_resumed_tracker_appends_to_the_same_run(mlflow_server, tmp_path):
    cfg = _cfg(tmp_path)
    first = MlflowTracker(mlflow_server, "resume-test")
    run_id = first.start(cfg, derived=derive(cfg, 1797, 1))
    for step in range(1, 6):
        first.log_metrics({"loss": float(step)}, step)
    first.flush()  # a crash after this point: the run stays RUNNING, no finish()

    second = MlflowTracker(mlflow_server, "resume-test")
    assert second.start(cfg, derived=derive(cfg, 1797, 1), run_id=run_id) == run_id
    for step in range(6, 11):
        second.log_metrics({"loss": float(step)}, step)
    second.finish()

    client = _client(mlflow_server)
    run = client.get_run(run_id)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 11))
    assert run.data.tags["resume_count"] == "1"
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second run was created
    with pytest.raises(ConfigError, match="cannot resume MLflow run"):
        MlflowTracker(mlflow_server, "resume-test").start(cfg, run_id="0123456789abcdef0123456789abcdef")


def test_finish_registers_the_encoder_once_and_closes_the_run(sqlite_store, tmp_path, monkeypatch):
    from byol_ray.encoders import build_encoder
    from byol_ray.registry import RegistryError
    from byol_ray.session import finish

    cfg = _cfg(tmp_path, "mlflow.register_name=finish-encoder")
    derived = derive(cfg, 1797, 1)
    history = [{"epoch": 1, "step": 14, "epoch_loss": 1.5, "epoch_classifier_acc": 0.3}]
    encoder = build_encoder("tiny")
    tracker = MlflowTracker(sqlite_store, "finish")
    run_id = tracker.start(cfg, derived=derived)
    registered = finish(tracker, cfg, derived, encoder, history, history[-1], tmp_path / "no-run-dir", FINGERPRINT)
    assert registered == "finish-encoder/1"
    client = _client(sqlite_store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["registered_model"] == "finish-encoder/1"
    # the same run finished again (a resumed, already finished run) adds no second version
    again = MlflowTracker(sqlite_store, "finish")
    again.start(cfg, derived=derived, run_id=run_id)
    assert finish(again, cfg, derived, encoder, history, history[-1], tmp_path / "no-run-dir", FINGERPRINT) is None
    assert len(client.search_model_versions("name='finish-encoder'")) == 1
    card = client.get_model_version("finish-encoder", "1").tags
    assert json.loads(card["final_metrics"])["epoch_loss"] == 1.5 and card["source_run_id"] == run_id
    assert json.loads(card["training"])["data_fingerprint"]["sha256"] == "ab12cd34"

    def broken(*args, **kwargs):
        raise RegistryError("registry down")

    monkeypatch.setattr("byol_ray.registry.register_encoder", broken)
    tracker = MlflowTracker(sqlite_store, "finish")
    run_id = tracker.start(cfg, derived=derived)
    with pytest.raises(RegistryError, match="registry down"):
        finish(tracker, cfg, derived, encoder, history, history[-1], tmp_path, {})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "registry down" in run.data.tags["registration_error"]


def test_system_metrics_of_rank_0s_node_land_in_the_run(sqlite_store, tmp_path):
    cfg = _cfg(tmp_path, "mlflow.system_metrics_every_s=0.5")
    tracker = MlflowTracker(sqlite_store, "system")
    run_id = tracker.start(cfg)
    deadline = time.monotonic() + 30
    keys: set[str] = set()
    while time.monotonic() < deadline and "system/cpu_utilization_percentage" not in keys:
        time.sleep(0.5)
        keys = set(_client(sqlite_store).get_run(run_id).data.metrics)
    tracker.finish()
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
    assert tracker._system is None  # the monitor thread was stopped with the run


class _Forwarder:
    """A TCP port forwarding to the tracking server: closing it is a server lost mid-run (connections refused)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rstrip("/").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self.listener.close()
        for sock in self.open:
            sock.close()


def test_a_server_lost_mid_run_does_not_hang_the_end_of_the_run(mlflow_server, tmp_path):
    """The tracking server goes away after the first checkpoint: training and checkpoints finish, the run ends
    within a bounded time, exit 0, and says where its metrics and checkpoints are and how to register later."""
    import subprocess
    import sys

    proxy = _Forwarder(mlflow_server)
    runs = tmp_path / "runs"
    cmd = [str(Path(sys.executable).with_name("byol-ray")), "train", "--no-ray", "run_name=lost", "train.epochs=5",
           "model.projector_hidden_dim=64", "model.predictor_hidden_dim=64", "model.projector_dim=32",
           "data.loader=torch", "data.num_workers=1", "train.log_every_steps=1", f"output_dir={runs}",
           f"mlflow.tracking_uri={proxy.uri}", "mlflow.experiment=lost-server", "mlflow.register_name=lost-encoder",
           "mlflow.system_metrics_every_s=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = runs / "lost" / "checkpoints" / "epoch_0001" / "state.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proxy.close()
    lost_at = time.monotonic()
    _, err = proc.communicate(timeout=600)
    took = time.monotonic() - lost_at
    assert proc.returncode == 0, err[-3000:]
    assert took < 120, f"the run took {took:.0f} s to end after losing its server:\n{err[-3000:]}"
    assert f"MLflow server {proxy.uri} does not answer" in err and "Traceback" not in err, err[-3000:]
    assert f"{runs / 'lost' / 'metrics.jsonl'}" in err
    assert (f"byol-ray register --checkpoint {runs / 'lost' / 'checkpoints' / 'epoch_0005'} "
            f"mlflow.tracking_uri={proxy.uri} mlflow.register_name=lost-encoder") in err
    assert [json.loads(line)["epoch"] for line in (runs / "lost" / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4, 5]
    assert (runs / "lost" / "checkpoints" / "epoch_0005" / "state.pt").is_file()
    # what the server got before it was lost is still there; the run was left RUNNING, as the message says
    run_id = (runs / "lost" / "mlflow_run_id").read_text().strip()
    assert _client(mlflow_server).get_run(run_id).info.status == "RUNNING"
