"""The local launcher (`train --no-ray`): nothing already written is lost, resume keeps the recipe and prunes,
a failed start leaves no folder behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from byol_ray.config import ConfigError, load_config
from byol_ray.resume import resume_config
from byol_ray.train import train_local

TINY = ["model.projector_hidden_dim=64", "model.predictor_hidden_dim=64", "model.projector_dim=32",
        "data.loader=torch", "data.num_workers=1", "train.batch_size=128", "train.log_every_steps=100",
        "train.checkpoint_every_epochs=1", "ray.num_to_keep=2", "mlflow.enabled=false"]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(["demo"], [*TINY, f"output_dir={tmp_path / 'runs'}", "run_name=local", *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run that the tests below try to damage."""
    tmp = tmp_path_factory.mktemp("local")
    outcome = train_local(_cfg(tmp, "train.epochs=2"))
    return tmp, outcome


def test_a_new_run_over_a_finished_one_is_refused_and_nothing_changes(finished):
    tmp, outcome = finished
    folder = Path(outcome.folder)
    before = _snapshot(folder)
    with pytest.raises(ConfigError, match="already exists.*--resume local"):
        train_local(_cfg(tmp, "train.epochs=2"))
    assert _snapshot(folder) == before
    assert [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_refuses_overrides_that_change_the_recipe(finished):
    tmp, _ = finished
    output_dir = str(tmp / "runs")
    with pytest.raises(ConfigError, match=r"train\.epochs \(2 -> 3\).*optim\.base_lr|optim\.base_lr.*train\.epochs"):
        resume_config(output_dir, "local", ["train.epochs=3", "optim.base_lr=0.5"])
    allowed = resume_config(output_dir, "local", ["train.log_every_steps=7", "data.num_workers=1"])
    assert allowed.train.log_every_steps == 7 and allowed.train.epochs == 2 and allowed.run_name == "local"


def test_resume_of_an_interrupted_run_prunes_old_checkpoints_to_num_to_keep(tmp_path):
    # an interrupted 3-epoch run that kept 3 checkpoints (num_to_keep was 3 then): resuming keeps 2
    cfg = _cfg(tmp_path, "train.epochs=3", "ray.num_to_keep=3")
    train_local(cfg)
    checkpoints = Path(tmp_path / "runs" / "local" / "checkpoints")
    assert sorted(p.name for p in checkpoints.glob("epoch_*")) == ["epoch_0001", "epoch_0002", "epoch_0003"]
    # pretend the run stopped after epoch 2: drop the last checkpoint and its history row
    import shutil

    shutil.rmtree(checkpoints / "epoch_0003")
    history = tmp_path / "runs" / "local" / "metrics.jsonl"
    history.write_text("\n".join(history.read_text().splitlines()[:2]) + "\n")
    resumed = resume_config(str(tmp_path / "runs"), "local", ["ray.num_to_keep=2"])
    outcome = train_local(resumed, resume=True)
    assert outcome.metrics["epoch"] == 3
    assert sorted(p.name for p in checkpoints.glob("epoch_*")) == ["epoch_0002", "epoch_0003"]


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    cfg = _cfg(tmp_path, "train.batch_size=4096")  # larger than the data set: derive() refuses it
    with pytest.raises(ConfigError, match="larger than the data set"):
        train_local(cfg)
    assert not (tmp_path / "runs" / "local").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        train_local(_cfg(tmp_path, "data.train=/nonexistent/images"))
    assert not (tmp_path / "runs" / "local").exists()


def test_one_process_converts_the_source_the_others_wait_for_it(tmp_path):
    """Two ranks on one machine ask for the same FFCV file at once: one converts under the lock, the other
    waits on its progress and reads the same file."""
    import subprocess
    import sys

    code = ("import sys; from byol_ray.config import load_config; from byol_ray.data.cache import training_file; "
            f"cfg = load_config(['demo'], ['data.cache_dir={tmp_path / 'cache'}', 'data.loader=ffcv']); "
            "print(training_file(cfg))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1 and Path(paths.pop()).is_file()
    assert sum("preparing demo" in err for _, err in outs) == 1, [err[-500:] for _, err in outs]
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_a_broken_beton_is_refused_by_the_driver_before_ray_starts(tmp_path, kind):
    """`byol-ray train` (the Ray launcher) checks the data before it starts or joins a Ray cluster: one line,
    exit 2, within seconds, and no run folder."""
    import os
    import subprocess
    import sys
    import time

    beton = tmp_path / "train.beton"
    if kind == "truncated":
        from byol_ray.data.prepare import prepare

        prepare("demo", str(tmp_path / "full.beton"), progress=False)
        beton.write_bytes((tmp_path / "full.beton").read_bytes()[:4096])
    else:
        beton.write_bytes(os.urandom(8192))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    out = subprocess.run([str(Path(sys.executable).parent / "byol-ray"), "train", f"data.train={beton}",
                          f"output_dir={tmp_path / 'runs'}", "run_name=broken"], capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("byol-ray train: error: data.train=") and str(beton) in lines[0]
    assert time.monotonic() - start < 30 and "Ray" not in out.stderr
    assert not (tmp_path / "runs" / "broken").exists()


def test_sigterm_to_a_local_run_flushes_marks_it_killed_and_says_how_to_resume(tmp_path):
    """What `timeout`, `docker stop` and Kubernetes send: exit 143, the MLflow run KILLED with the steps it had
    logged, and the line that resumes it; the resumed run finishes the same MLflow run."""
    import signal
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    byol = str(Path(sys.executable).parent / "byol-ray")
    args = [f"output_dir={tmp_path / 'runs'}", f"mlflow.tracking_uri={store}", "mlflow.system_metrics_every_s=0",
            "mlflow.register_name="]
    proc = subprocess.Popen([byol, "train", "--no-ray", "train.epochs=400", "train.log_every_steps=1", "run_name=term",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    checkpoints = tmp_path / "runs" / "term" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("epoch_*/state.pt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "byol-ray train: terminated (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
    assert f"byol-ray train --no-ray --resume term output_dir={tmp_path / 'runs'}" in err
    client = MlflowClient(store, registry_uri=store)
    run_id = (tmp_path / "runs" / "term" / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert logged and max(logged) >= 1  # the queue was flushed before the run closed


_WITHOUT_EDGES = """
import sys

class _Absent:  # a machine with torch alone (a GPU box where Ray, MLflow, FFCV and pyarrow cannot be installed)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "ffcv", "numba", "pyarrow", "boto3"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, _Absent())
from byol_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_local_run_needs_torch_alone(tmp_path):
    """`train --no-ray` with tracking off, its resume, and held-out validation import none of Ray, MLflow, FFCV
    or pyarrow (a GPU machine with torch alone runs the core this way)."""
    import subprocess
    import sys

    from PIL import Image

    from byol_ray.data.demo import load_demo

    images, labels, _ = load_demo(32)
    for split, rows in (("train", range(0, 600)), ("val", range(600, 800))):  # real digit scans as ImageFolders
        for i in rows:
            (tmp_path / split / f"d{labels[i]}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(tmp_path / split / f"d{labels[i]}" / f"{i}.png")
    run = [sys.executable, "-c", _WITHOUT_EDGES, "train", "--no-ray", "--config", "demo", *TINY,
           "train.epochs=1", f"output_dir={tmp_path / 'runs'}", "run_name=bare", f"data.train={tmp_path / 'train'}",
           f"data.val={tmp_path / 'val'}", "eval.every_epochs=1", f"data.cache_dir={tmp_path / 'cache'}"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run bare finished: epoch 1" in out.stderr and "held-out kNN top-1" in out.stderr, out.stderr[-3000:]
    again = subprocess.run([sys.executable, "-c", _WITHOUT_EDGES, "train", "--no-ray", "--resume", "bare",
                            f"output_dir={tmp_path / 'runs'}"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming bare from its checkpoint epoch_0001" in again.stderr, again.stderr[-3000:]
    assert (tmp_path / "runs" / "bare" / "checkpoints" / "epoch_0001" / "state.pt").is_file()
