"""Session-wide fixtures: real CIFAR-10 images, one Ray cluster and one MLflow server per session.

Each edge keeps its fixtures in its own module (``fixtures_*.py``), imported here so pytest sees them.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throwaway local heads in tests (docs/design.md, "Facts about the tools")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("NUMBA_OPT", "0")  # FFCV pipelines compile ~3x faster; tests use tiny data
# Ray Train's controller looks at its workers every 2 s: a run's end, each validation's result and a failed worker
# are noticed up to 2 s late, a wait that tiny test runs (a few seconds of training each) add up over the session.
# Ray Train hands the variable on from the driver to its controller; Ray nodes started here inherit it as well.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The test session's Ray clusters (its own two nodes, the spot cluster) run lean, as the embedded default does
# (byol_ray.ray_connect.LOCAL_RAY_ENV): no Prometheus export from each process, and no idle workers pre-started for
# a new job's driver (each a Python process start, ~2 s of CPU here). The nodes, and every job and driver started
# here, inherit it.
os.environ.setdefault("RAY_enable_metrics_collection", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# `ray job stop` leaves a job's driver RAY_JOB_STOP_WAIT_TIME_S between SIGTERM and SIGKILL (Ray's default 3 s), in
# which it marks its MLflow run KILLED; under a parallel session's load that took longer (README: a busy head sets it).
os.environ.setdefault("RAY_JOB_STOP_WAIT_TIME_S", "30")
# Under pytest-xdist each worker gets its share of the cores for torch's threads (and OpenMP's, in the commands it
# starts): with two workers on two cores each otherwise runs two threads, and OpenMP's spinning threads made the
# in-process training cases run 5x slower than alone (measured: test_engine's mid-epoch resume, 10 s alone, 53 s).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
# Ctrl-C reaches the commands the tests start as it reaches a terminal's foreground job. A suite started in the
# background (`make test &`, a CI runner's shell) has SIGINT ignored, and an ignored signal stays ignored across exec:
# the Ctrl-C cases' commands would not see it (prepare then ran to its end and exited 0). A handler of its own here is
# reset to the default in every process started from this one.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# As with an activated virtual environment: `byol-ray` and `ray` on PATH, for this process and for the Ray
# nodes and job entrypoints it starts (the README's commands name them without a path).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"

# Each edge keeps its fixtures in a module of its own (the object store first: it sets the AWS credentials that
# every process started afterwards, Ray nodes and the MLflow server included, inherits).
pytest_plugins = ["fixtures_s3", "fixtures_mlflow", "fixtures_ray"]


# The session's Ray cluster and MLflow server take tens of seconds to start on 2 cores (and to stop): a test that
# uses either, itself or through another fixture, is `slow` wherever it lives, so `make test-fast` starts neither.
SESSION_SERVICES = frozenset({"ray_cluster", "mlflow_server"})


# Under pytest-xdist (`make test-fast`: two workers; the whole suite with `-n 3 --dist loadgroup` if asked) the
# MLflow server and the object store are shared by all workers (tests/shared_services.py). A Ray cluster is not: its
# tests count on having its CPUs to themselves (a 4-CPU group placed on both nodes, a group that must not fit), so
# every test that uses the session's cluster runs in one group, on one worker, one after another; so do the spot
# cases, which share their own cluster (a module fixture).
XDIST_GROUPS = {"ray_cluster": "ray-cluster", "shared_cluster": "spot-cluster"}
# The session cluster's tests are the longest chain (about 10 minutes in one process). On three or more workers they
# form two groups by module, of about equal time: each group runs on one worker, which starts a session cluster of its
# own. On two workers (`make test`) they stay one group on one cluster: a third Ray cluster on two cores costs more
# CPU than the split saves.
RAY_CLUSTER_FIRST_HALF = frozenset({"test_tune", "test_object_store", "test_console", "test_bench_scripts"})
SPLIT_RAY_CLUSTER_FROM_WORKERS = 3


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marks
def pytest_collection_modifyitems(config, items) -> None:
    split = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0) >= SPLIT_RAY_CLUSTER_FROM_WORKERS
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SESSION_SERVICES & fixtures:
            item.add_marker(pytest.mark.slow)
        for fixture, group in XDIST_GROUPS.items():
            if fixture in fixtures:
                if fixture == "ray_cluster" and split:
                    group += "-a" if item.path.stem in RAY_CLUSTER_FIRST_HALF else "-b"
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")  # after pytest-xdist's own hook
def pytest_collection_modifyitems_xdist_groups(config, items) -> None:
    """pytest-xdist's `loadgroup` tells the controller an item's group by a suffix on its node id
    (``tests/x.py::test@group``). xdist 3.8 writes it to ``item._nodeid``, which pytest 9.2 no longer reads (the
    id is ``item._id`` now), so the suffix never arrives and grouped tests are spread over every worker: each
    would start the session's Ray cluster itself. Written here the way pytest 9 keeps it."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            item._id = coerce_node_id(item.nodeid + suffix)
            assert item.nodeid.endswith(suffix)


def pytest_sessionfinish(session) -> None:
    """The session's root process stops the shared servers once every worker is done (tests/shared_services.py)."""
    from shared_services import is_worker, stop_all

    if not is_worker():
        stop_all(session.config._tmp_path_factory)


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR_ARCHIVE} (shared/datasets beside the repo)")
    return CIFAR_ARCHIVE


@pytest.fixture(scope="session")
def cifar_small(cifar_archive, tmp_path_factory) -> tuple[Path, Path]:
    """(train, val) ImageFolders of real CIFAR-10 JPEGs: 60 train and 20 test images of each of the 10 classes."""
    import tarfile

    out = tmp_path_factory.mktemp("cifar-small")
    quota = {"train": 60, "test": 20}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(cifar_archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not (member.isfile() and len(parts) == 3 and parts[0] in quota):
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) >= quota[parts[0]]:
                continue
            target = out / ("val" if parts[0] == "test" else "train") / parts[1] / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            counts[key] = counts.get(key, 0) + 1
    return out / "train", out / "val"
