"""Resuming from what an interrupted run really leaves behind: a truncated newest checkpoint, a partial file from
a save killed mid-write, no checkpoint at all, a disk that fills up during a save; and a new sqlite store opened
by several first runs at once."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from byol_ray.checkpoint import load_checkpoint, save_checkpoint
from byol_ray.config import NoSpaceError, load_config
from byol_ray.train import train_local
from disks import tmpfs

BYOL_RAY = Path(sys.executable).with_name("byol-ray")
TINY = ["model.projector_hidden_dim=64", "model.predictor_hidden_dim=64", "model.projector_dim=32",
        "data.loader=torch", "data.num_workers=1", "train.batch_size=128", "train.log_every_steps=100",
        "train.checkpoint_every_epochs=1", "ray.num_to_keep=5", "mlflow.enabled=false"]


def _epochs(folder: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_resume_skips_a_truncated_newest_checkpoint_and_cleans_partial_files(tmp_path, capsys):
    """The newest checkpoint cut short (a crash while copying, a bad disk) and a `.state.pt.tmp-PID` left by a
    save killed mid-write: --resume says so, continues from the newest intact checkpoint (not from scratch)
    and removes the partial file."""
    runs = tmp_path / "runs"
    train_local(load_config(["demo"], [*TINY, "train.epochs=3", f"output_dir={runs}", "run_name=cut"]))
    folder, checkpoints = runs / "cut", runs / "cut" / "checkpoints"
    # the run "stopped" during epoch 3: its last checkpoint gone, epoch 2's truncated, a partial save left over
    shutil.rmtree(checkpoints / "epoch_0003")
    (folder / "metrics.jsonl").write_text("\n".join((folder / "metrics.jsonl").read_text().splitlines()[:2]) + "\n")
    newest = checkpoints / "epoch_0002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    writer = subprocess.Popen(["true"])
    writer.wait()
    partial = checkpoints / "epoch_0002" / f".state.pt.tmp-{writer.pid}"
    partial.write_bytes(b"half a checkpoint")
    capsys.readouterr()

    cfg = load_config(["demo"], [*TINY, "train.epochs=3", f"output_dir={runs}", "run_name=cut"])
    outcome = train_local(cfg, resume=True)
    err = capsys.readouterr().err
    assert "resuming cut from its checkpoint epoch_0002" in err
    assert "epoch_0002/state.pt is unreadable" in err and "resuming cut from epoch_0001, its newest intact" in err
    assert "removed 1 partial checkpoint file" in err and not partial.exists()
    assert _epochs(folder) == [1, 2, 2, 3]  # epochs 2 and 3 trained again from epoch 1's state; epoch 1 never
    assert outcome.metrics["epoch"] == 3
    assert load_checkpoint(checkpoints / "epoch_0003")["epoch"] == 3


def test_checkpoints_ray_train_never_recorded_are_resumed_from_when_intact(tmp_path, capsys):
    """A Ray Train attempt that Ray hands no checkpoint (its controller stopped before registering them) continues
    from the newest intact one in the run folder; when none can be read (a copy cut short), from step 0, said."""
    from byol_ray.resume import unrecorded_resume_state

    runs = tmp_path / "runs"
    cfg = load_config(["demo"], [*TINY, "train.epochs=2", f"output_dir={runs}", "run_name=unrec"])
    train_local(cfg)
    checkpoints = runs / "unrec" / "checkpoints"
    capsys.readouterr()
    assert unrecorded_resume_state(cfg, "cpu")["epoch"] == 2
    assert "Ray Train recorded no checkpoint of unrec" in capsys.readouterr().err
    newest = checkpoints / "epoch_0002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert unrecorded_resume_state(cfg, "cpu", announce=False)["epoch"] == 1
    assert capsys.readouterr().err == ""  # the other ranks of a group stay quiet
    oldest = checkpoints / "epoch_0001" / "state.pt"
    oldest.write_bytes(oldest.read_bytes()[:1000])
    assert unrecorded_resume_state(cfg, "cpu") is None
    err = capsys.readouterr().err
    assert "none in" in err and "can be read" in err and "starting it from step 0" in err
    for state_file in (newest, oldest):
        state_file.unlink()  # folders without a checkpoint: nothing to resume, nothing said
    assert unrecorded_resume_state(cfg, "cpu") is None and capsys.readouterr().err == ""


def _resume_rank(rank: int, pg_file: str, steps: list, out: str) -> None:
    from byol_ray.ray_train import same_start_on_every_rank

    torch.distributed.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=2)
    try:
        state = None if steps[rank] is None else {"step": steps[rank]}
        try:
            same_start_on_every_rank(state, torch.device("cpu"))
            Path(f"{out}.{rank}").write_text("agreed")
        except RuntimeError as exc:
            Path(f"{out}.{rank}").write_text(str(exc))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("steps,agreed", [([90, 90], True), ([None, None], True), ([90, 81], False),
                                          ([90, None], False)])
def test_ranks_that_would_resume_from_different_steps_stop_the_attempt(tmp_path, steps, agreed):
    """Each rank reads the checkpoint itself; one whose copy was unreadable falls back alone. Two real gloo ranks:
    they go on only when they hold the same step, and otherwise both stop, naming every rank's step."""
    out = str(tmp_path / "answer")
    # fork: the children need nothing but what this process has imported already
    torch.multiprocessing.start_processes(_resume_rank, args=(str(tmp_path / "pg"), steps, out), nprocs=2,
                                          start_method="fork")
    answers = [Path(f"{out}.{rank}").read_text() for rank in (0, 1)]
    if agreed:
        assert answers == ["agreed", "agreed"]
    else:
        for answer in answers:
            assert "would resume from different checkpoints" in answer and "ray.max_failures" in answer, answer
            assert "rank 0: step 90" in answer
            assert ("rank 1: step 81" if steps[1] else "rank 1: step 0 (no checkpoint)") in answer


def test_resume_with_every_checkpoint_unreadable_is_one_line_and_keeps_the_files(tmp_path):
    runs = tmp_path / "runs"
    train_local(load_config(["demo"], [*TINY, "train.epochs=1", f"output_dir={runs}", "run_name=bad"]))
    only = runs / "bad" / "checkpoints" / "epoch_0001" / "state.pt"
    only.write_bytes(b"not a checkpoint")
    done = subprocess.run([str(BYOL_RAY), "train", "--no-ray", "--resume", "bad", f"output_dir={runs}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "cannot resume 'bad': no checkpoint in" in done.stderr and "start a new run" in done.stderr
    assert only.read_bytes() == b"not a checkpoint"  # nothing of the run deleted or overwritten


def test_a_run_stopped_before_its_first_checkpoint_starts_again_under_its_name(tmp_path, capsys):
    """The demo used to checkpoint every 5 epochs: a run interrupted earlier could be neither resumed nor reused.
    Now --resume starts it again from step 0 with its saved config, and its history holds each epoch once."""
    runs = tmp_path / "runs"
    cfg = load_config(["demo"], [*TINY, "train.epochs=2", f"output_dir={runs}", "run_name=early"])
    train_local(cfg)
    folder = runs / "early"
    for checkpoint in (folder / "checkpoints").glob("epoch_*"):  # as if stopped before the first checkpoint
        shutil.rmtree(checkpoint)
    (folder / "metrics.jsonl").write_text((folder / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    capsys.readouterr()
    outcome = train_local(cfg, resume=True)
    assert "early stopped before its first checkpoint: starting it again from step 0" in capsys.readouterr().err
    assert _epochs(folder) == [1, 2] and outcome.metrics["epoch"] == 2


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_one_and_leaves_no_partial_file(tmp_path):
    with tmpfs(tmp_path / "small", "size=2m") as disk:
        first = save_checkpoint({"w": torch.ones(1000)}, disk / "epoch_0001" / "state.pt")
        with pytest.raises(NoSpaceError, match="no space left on device for checkpoint .*epoch_0002.*earlier "
                                               "checkpoints are intact"):
            save_checkpoint({"w": torch.ones(2_000_000)}, disk / "epoch_0002" / "state.pt")
        assert sorted(p.relative_to(disk).as_posix() for p in disk.rglob("*")) == ["epoch_0001",
                                                                                   "epoch_0001/state.pt"]
        assert torch.equal(torch.load(first)["w"], torch.ones(1000))


def test_a_run_whose_checkpoint_disk_fills_up_ends_in_one_line(tmp_path):
    with tmpfs(tmp_path / "small", "size=256k") as disk:
        done = subprocess.run([str(BYOL_RAY), "train", "--no-ray", *TINY, "train.epochs=1", "run_name=full",
                               f"output_dir={tmp_path / 'runs'}", f"ray.storage_path={disk}"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "no space left on device for checkpoint" in done.stderr
        assert not list(disk.rglob("*.tmp-*"))


def test_first_runs_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """MLflow's own set-up of a new sqlite file is not safe across processes (`table experiments already
    exists`, alembic's "expected to match one row"): three processes start on the same new file at one instant."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    at = time.time() + 6  # after every interpreter has imported MLflow
    code = ("import sys, time\nfrom byol_ray.mlflow_store import client, ensure_experiment\n"
            "uri, at = sys.argv[1], float(sys.argv[2])\ntime.sleep(max(0.0, at - time.time()))\n"
            "c = client(uri)\nprint(ensure_experiment(c, 'race', uri))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(at)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment, the same id for all


def test_a_downstream_job_with_a_mistyped_sqlite_path_creates_nothing(tmp_path):
    missing = tmp_path / "typo" / "mlflow.db"
    done = subprocess.run([str(BYOL_RAY), "knn", "--model", "byol-demo-encoder@champion", "--train", "demo"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{missing}"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"no such file ({missing})" in done.stderr
    assert not (tmp_path / "typo").exists()


def test_a_python_tag_in_a_search_file_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    search = tmp_path / "evil.yaml"
    search.write_text(f"base_config: [demo]\nspace:\n  optim.base_lr: !!python/object/apply:os.system "
                      f"['touch {marker}']\n")
    done = subprocess.run([str(BYOL_RAY), "tune", "--search", str(search), "--search-name", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "is not valid YAML" in done.stderr and "python/object/apply" in done.stderr
    assert not marker.exists()

