"""The console a person reads: a successful run prints no Ray-internal log lines, each progress line once (in a
terminal and under `ray job logs`), and Ray's own detail only behind --verbose."""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byol_ray import ray_connect
from byol_ray.progress import VERBOSE_ENV
from ray_runs import STEPS_PER_EPOCH

BIN = Path(sys.executable).parent
TINY = ["model.projector_hidden_dim=128", "model.predictor_hidden_dim=128", "model.projector_dim=64",
        "train.batch_size=64", "train.log_every_steps=10", "train.epochs=1"]

# Ray's C++ log format ("[2026-12-04 19:37:45,777 E 12205 12265] core_worker.cc:2465: ...") and glog's
# ("E1204 19:37:45.777 12205 core_worker.cc:2465] ...")
RAY_INTERNAL = re.compile(r"\[[\d-]+ [\d:,.]+ [EWF] \d+ \d+\] \S+\.(?:cc|h):\d+:"
                          r"|\b[EWF]\d{4} [\d:.]+ +\d+ \S+\.(?:cc|h):\d+\]")
PROGRESS = re.compile(r"epoch +[\d.]+/\d+ \| step (\d+)/\d+ \|.*")
# The line Ray Train V2's controller makes Ray Core log on every run (measured on Ray 2.60, a successful run)
PREEMPTION_WATCHER_LINE = (
    "[2026-12-04 19:37:45,777 E 12205 12265] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
    "ID: '67884821a63c07f38027c33001000000' has constructor arguments in the object store and max_restarts > 0. If "
    "the arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.")


def _progress(console: str) -> collections.Counter:
    """Each progress line (from "epoch" on, without Ray's "(RayTrainWorker pid=...)" prefix) and how often."""
    return collections.Counter(m.group(0) for m in PROGRESS.finditer(console))


def _expected_steps(epochs: int = 1, every: int = 10) -> set[int]:
    return set(range(every, epochs * STEPS_PER_EPOCH + 1, every))


def _process_group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return found


def _ignores_or_blocks_sigint(pid: int) -> "bool | str | None":
    """True when the local Ray's process ``pid`` ignores or blocks SIGINT, else what it is; None when it is not one
    of Ray's (a short-lived child of the driver) or is gone."""
    try:
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return None
    if not re.search(r"/ray/|ray::|ray-dashboard|multiprocessing", cmdline):
        return None
    bit = 1 << (2 - 1)  # SIGINT's bit in the masks
    return True if (int(status["SigIgn"], 16) | int(status["SigBlk"], 16)) & bit else f"hears SIGINT: {cmdline[:120]}"


# ----------------------------------------------------------------------------- the filter itself (fast)


def _skip(monkeypatch, own: str | None = None, *, verbose: bool = False) -> re.Pattern | None:
    monkeypatch.setenv(ray_connect.SKIP_ENV, own or "")  # (restored after the test, whatever it was)
    if own is None:
        monkeypatch.delenv(ray_connect.SKIP_ENV)
    monkeypatch.setenv(VERBOSE_ENV, "1" if verbose else "")
    ray_connect.quiet_ray_console()
    ray_connect.quiet_ray_console()  # idempotent: a second call (CLI, then init_ray) adds nothing
    value = os.environ.get(ray_connect.SKIP_ENV)
    return re.compile(value) if value else None


def test_only_the_benign_line_is_filtered(monkeypatch):
    skip = _skip(monkeypatch)
    assert skip is not None and skip.search(f"(TrainController pid=1) {PREEMPTION_WATCHER_LINE}")
    real_errors = [
        # the same warning about an actor of a user's own: a restart of it could really fail
        PREEMPTION_WATCHER_LINE.replace("PreemptionWatcher", "MyActor"),
        "[2026-12-04 19:37:45,777 E 12205 12265] core_worker.cc:2602: Failed to register actor. Error message: x",
        "[2026-12-04 19:37:45,777 E 12205 12265] task_manager.cc:1103: Task failed: IOError: worker died",
        "Traceback (most recent call last):",
        "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
        "epoch   0.36/2 | step 5/28 | loss 3.7237 | lr 0.07143",
    ]
    assert [line for line in real_errors if skip.search(line)] == []


def test_verbose_filters_nothing_and_a_users_own_skip_regex_stays(monkeypatch):
    assert _skip(monkeypatch, verbose=True) is None
    assert _skip(monkeypatch, "my-noise", verbose=True).pattern == "my-noise"
    combined = _skip(monkeypatch, "my-noise")
    assert combined.search("some my-noise here") and combined.search(PREEMPTION_WATCHER_LINE)
    # inherited from a quiet byol-ray (a parent process): --verbose takes ours out, the user's stays
    assert _skip(monkeypatch, combined.pattern, verbose=True).pattern == "my-noise"


def test_rays_log_forwarding_drops_the_line_and_keeps_errors(monkeypatch):
    """Through Ray's own deduplicator, the object that decides what a driver prints of its workers' output."""
    from ray._private.ray_logging import LogDeduplicator

    skip = _skip(monkeypatch)
    error = "[2026-12-04 19:37:45,777 E 12205 12265] core_worker.cc:2602: Failed to register actor."
    batch = {"ip": "127.0.0.1", "pid": 12205, "job": "01000000", "is_err": True,
             "lines": [PREEMPTION_WATCHER_LINE, error]}
    printed = LogDeduplicator(5, None, skip.pattern).deduplicate(batch)
    assert [line for b in printed for line in b["lines"]] == [error]


def test_progress_and_messages_once_under_ray_trains_print_patch(monkeypatch):
    """Ray Train V2's print patch as a worker has it: ``builtins.print`` logs through the root logger (a console
    handler in a worker) and, as a worker's ``sys.stderr`` is a wrapper, prints too. Our lines skip it."""
    import builtins
    import io
    import logging

    from ray.train.v2._internal.logging.patch_print import redirected_print

    from byol_ray.progress import ProgressPrinter, say

    stream = io.StringIO()  # a wrapped stderr: not sys.__stderr__, as in a Ray worker
    monkeypatch.setattr(sys, "stderr", stream)
    root, handler = logging.getLogger(), logging.StreamHandler(stream)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    monkeypatch.setattr(builtins, "print", redirected_print)
    try:
        print("a line of a user's own", file=sys.stderr)  # what the patch does to print: the same line twice
        ProgressPrinter(total_steps=28, epochs=1)({"epoch": 0.36, "loss": 3.5, "lr": 0.08, "tau": 0.99,
                                                   "projection_std": 0.1, "images_per_s": 200.0}, 10)
        say("run quiet finished")
    finally:
        monkeypatch.undo()
        root.removeHandler(handler)
        root.setLevel(level)
    lines = collections.Counter(stream.getvalue().splitlines())
    assert lines.pop("a line of a user's own") == 2  # the mechanism is there
    assert list(lines.values()) == [1, 1] and any(PROGRESS.match(line) for line in lines), lines


def test_processes_started_for_the_local_ray_ignore_ctrl_c_and_this_one_still_hears_it():
    """What the local Ray's processes inherit from its start: SIGINT ignored (a terminal's Ctrl-C is for byol-ray's
    own handler, not for Ray's dashboard). Ray starts them as Popen with a preexec_fn; this process's own handler
    stays, so a Ctrl-C during the start still interrupts it."""
    import signal

    # Python's own handler, as a byol-ray command has it (whatever an earlier case in this process left aside)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"]
        with pytest.raises(KeyboardInterrupt):
            with ray_connect._ctrl_c_for_this_process_only():
                child = subprocess.run(probe, capture_output=True, text=True, check=True, preexec_fn=lambda: None)
                assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
                pytest.fail("a Ctrl-C during the start did not interrupt this process")
        assert child.stdout.strip() == "True", child.stdout
        outside = subprocess.run(probe, capture_output=True, text=True, check=True, preexec_fn=lambda: None)
        assert outside.stdout.strip() == "False"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


# ----------------------------------------------------------------------------- real runs (slow)


@pytest.mark.slow
def test_embedded_default_is_a_lean_private_ray_with_a_quiet_console(tmp_path):
    """`byol-ray train` as a newcomer runs it (no RAY_ADDRESS, no RAY_AUTH_MODE, the local MLflow store): it starts
    a lean in-process Ray of its own and prints no Ray-internal or Ray WARNING line, each progress line once, with
    the run's outputs all there.

    It does not join the cluster `ray start` last recorded on the machine, which is what Ray's own `ray.init()`
    without an address would do. Here that record names a dead cluster (a killed `ray start`): Ray's own init
    then waited forever, and Ray Train's placement-group cleaner, which looked the State API up through the
    record, hung at the end and printed a traceback. One run checks both, as each costs a Ray start and a training
    run on 2 cores. The machine is the command's own temporary folder (TMPDIR, where Ray keeps the record and its
    sessions), so that no other Ray of this test session reads the dead record."""
    import shutil
    import socket
    import tempfile

    machine_tmp = Path(tempfile.mkdtemp(prefix="bq", dir="/tmp"))  # short: Ray's socket paths live below it
    recorded = machine_tmp / "ray" / "ray_current_cluster"
    recorded.parent.mkdir()
    with socket.socket() as probe:  # a port nothing listens on: the dead cluster's address
        probe.bind(("127.0.0.1", 0))
        recorded.write_text(f"127.0.0.1:{probe.getsockname()[1]}")
    # the product's own settings for its private Ray, not the ones this test session gives its clusters
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_TMPDIR", VERBOSE_ENV,
                        ray_connect.SKIP_ENV, *ray_connect.LOCAL_RAY_ENV)}
    env["HOME"] = str(tmp_path / "home")  # Ray keeps the token it makes for a new local cluster here
    env["TMPDIR"] = str(machine_tmp)
    start = time.monotonic()
    try:
        out = subprocess.run([str(BIN / "byol-ray"), "train", *TINY, "run_name=quiet",
                              f"data.cache_dir={tmp_path}/cache"],
                             capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        started_here = list(machine_tmp.glob("ray/session_2*"))
    finally:
        shutil.rmtree(machine_tmp, ignore_errors=True)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-4000:]
    print(f"embedded run: {time.monotonic() - start:.0f} s")
    # on loopback, though nothing in its environment said so (the test session's own clusters are told)
    assert "Ray: an in-process local Ray of its own on 127.0.0.1 " in out.stderr and started_here, console[-4000:]
    assert not RAY_INTERNAL.findall(console) and "Traceback" not in console, console[-4000:]
    assert "PlacementGroupCleaner" not in console, console[-4000:]
    assert not re.search(r"\t(WARNING|ERROR) \S+\.py:\d+ -- ", console), console[-4000:]  # Ray's own logger
    assert not re.search(r" (INFO|WARNING) mlflow\.", console), console[-4000:]  # MLflow's set-up and monitor lines
    # our progress lines, not Ray Train's per-report dumps
    assert "Reporting training result" not in console, console[-4000:]
    progress = _progress(console)
    assert {int(PROGRESS.match(line).group(1)) for line in progress} == _expected_steps(), console[-4000:]
    assert set(progress.values()) == {1}, progress
    assert "run quiet finished: epoch 1" in console, console[-4000:]
    run = tmp_path / "runs" / "quiet"
    assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "epoch_0001" / "state.pt").is_file()
    assert "registered encoder: models:/byol-demo-encoder/1" in console


@pytest.mark.slow
def test_ray_cancel_still_interrupts_a_running_task_on_the_local_ray(tmp_path):
    """The local Ray's processes start with SIGINT ignored (so that a terminal's Ctrl-C is the driver's alone), and
    its workers inherit that through the raylet; each worker restores Python's handler, through which
    ``ray.cancel`` interrupts a running task (Ray Data's cancels, Ray Train's validation tasks on abort)."""
    script = """
import os, signal, time
from byol_ray.ray_connect import init_ray
init_ray()
import ray

@ray.remote
def handler():
    return signal.getsignal(signal.SIGINT) is signal.default_int_handler

@ray.remote
def busy():
    for _ in range(600):
        time.sleep(0.1)

assert ray.get(handler.remote()) and ray.get(handler.options(runtime_env={"env_vars": {"A": "1"}}).remote())
ref = busy.remote()
time.sleep(1)
ray.cancel(ref)
try:
    ray.get(ref, timeout=30)
except ray.exceptions.TaskCancelledError:
    print("cancelled")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "cancelled", (done.stdout + done.stderr)[-3000:]
    assert "an in-process local Ray of its own" in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_ctrl_c_exits_130_with_the_resume_line_and_verbose_brings_rays_detail_back(tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to the whole foreground group) to the embedded default: Ray aborts
    the workers, the driver exits 130 with the line that resumes the run and no traceback. That line, run as
    printed with --verbose, continues from the run's checkpoint to the end and brings Ray's own lines back: its log
    lines and the line filtered by default (even with the filter inherited from a quiet byol-ray that started this
    one). One case for both, as each costs a Ray start and a training run on 2 cores."""
    import signal

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    cmd = [str(BIN / "byol-ray"), "train", *TINY, "train.epochs=3", "train.checkpoint_every_epochs=1",
           "run_name=ctrlc", f"output_dir={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache", "mlflow.enabled=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    # once Ray Train has recorded epoch 1's checkpoint as complete (its copy is whole, not cut short by the Ctrl-C)
    recorded = tmp_path / "runs" / "ctrlc" / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (
            recorded.exists() and "epoch_0001" in recorded.read_text()):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    # the Ctrl-C is byol-ray's alone: every process of the local Ray in its group ignores or blocks it
    deaf = {pid: _ignores_or_blocks_sigint(pid) for pid in _process_group(proc.pid) if pid != proc.pid}
    deaf = {pid: v for pid, v in deaf.items() if v is not None}
    assert len(deaf) >= 3 and all(v is True for v in deaf.values()), deaf
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "byol-ray train: interrupted" in err and "Traceback" not in err, err[-3000:]
    # Ray Train aborted the workers at once: they did not train on to the run's end (with Ray's dashboard stopped
    # by the Ctrl-C, its abort used to wait 8 s for the placement-group cleaner, and the workers trained on)
    checkpoints = tmp_path / "runs" / "ctrlc" / "checkpoints"
    assert not (checkpoints / "epoch_0003").exists(), sorted(p.name for p in checkpoints.iterdir())
    assert "Failed to query Ray Train Controller actor state" not in err, err[-3000:]
    resume = f"byol-ray train --resume ctrlc output_dir={tmp_path}/runs"
    assert f"Continue with: {resume}" in err

    env[ray_connect.SKIP_ENV] = "|".join(f"(?:{line})" for line in ray_connect.BENIGN_RAY_LINES)
    byol_ray, train, *rest = resume.split()  # as printed, with --verbose among its flags
    done = subprocess.run([byol_ray, train, "--verbose", *rest, "mlflow.enabled=false"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    assert "resuming ctrlc from the latest checkpoint Ray Train recorded" in console, console[-4000:]
    assert "run ctrlc finished: epoch 3" in console, console[-4000:]
    assert "'PreemptionWatcher'" in console and RAY_INTERNAL.search(console), console[-4000:]
    assert re.search(r"\tINFO \S+\.py:\d+ -- ", console), console[-4000:]  # Ray's (and Ray Train's) INFO lines
    progress = _progress(console)
    assert set(progress.values()) == {1}, progress
    # the run goes on, not again: from epoch 1's checkpoint (or epoch 2's, had it landed before the abort)
    steps = {int(PROGRESS.match(line).group(1)) for line in progress}
    assert max(_expected_steps(epochs=3)) in steps and min(steps) > STEPS_PER_EPOCH, console[-4000:]


# Each progress line once under `ray job logs`, on the session's cluster: checked on the README's own `ray job submit`
# command, in tests/test_ray_jobs.py (test_readme_cluster_command_keeps_every_output), one job for both.
