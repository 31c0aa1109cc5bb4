"""The evidence scripts run end to end at a tiny size on real CIFAR-10 JPEGs (the figures come from full runs)."""
from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 12, "test": 6}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cifar_root(cifar_archive, tmp_path_factory) -> Path:
    """An ImageFolder root with train/ and test/: the first few real JPEGs of every class of each split."""
    root = tmp_path_factory.mktemp("cifar-small")
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(cifar_archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not (member.isfile() and len(parts) == 3 and parts[0] in PER_CLASS):
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) < PER_CLASS[parts[0]]:
                target = root / parts[0] / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                counts[key] = counts.get(key, 0) + 1
            if len(counts) == 20 and all(counts[k] == PER_CLASS[k[0]] for k in counts):
                break
    assert len(counts) == 20, counts
    return root


def test_gpu_benchmark_runs_on_cpu_and_reports_every_figure():
    out = _script("bench_gpu").main(["--tiny"])
    assert out["images_per_s"] > 0 and out["step_ms"] > 0
    assert set(out["phase_ms"]) == {"augment", "forward", "backward", "optimizer", "ema"}
    assert abs(sum(out["phase_pct"].values()) - 100) < 0.1
    # a tiny encoder: the EMA is a small share of the step even on a CPU
    assert 0 < out["ema_pct_of_step"] < 10
    assert out["flops_per_image"] > 1e6 and out["mfu"] is None  # no known peak for a CPU


def test_data_benchmark_pairs_rounds_and_reports_the_median_ratio_and_load(cifar_root, tmp_path, capsys,
                                                                           monkeypatch):
    pytest.importorskip("ffcv", reason="FFCV is not installed")
    import os
    import statistics

    bench = _script("bench_data")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.25, 0.5, 0.75))  # a quiet machine, so --write is allowed
    markdown = tmp_path / "benchmarks.md"
    out = bench.main([str(cifar_root / "train"), "--work-dir", str(tmp_path / "work"), "--rounds", "2",
                      "--pairs", "16", "--batch-size", "8", "--warmup-batches", "1", "--workers", "1",
                      "--threads", "1", "--write", "--markdown", str(markdown)])
    cifar = out["cifar"]
    assert [r["round"] for r in cifar["rounds"]] == [1, 2] and cifar["pairs_per_round"] == 16
    for r in cifar["rounds"]:
        assert r["torchvision"]["pairs_per_s"] > 0 and r["ours"]["pairs_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours"]["pairs_per_s"] / r["torchvision"]["pairs_per_s"], rel=1e-2)
    assert cifar["median_ratio"] == pytest.approx(statistics.median(cifar["ratios"]), abs=0.01)
    load = out["run"]["load"]  # scripts/harness.py's record: the load before and after, and the verdict
    assert load["before"] == [0.25, 0.5, 0.75] and len(load["after"]) == 3 and load["cores"] >= 1
    assert load["quiet"] and "warning" not in load
    assert out["run"]["command"].endswith("--markdown " + str(markdown)) and out["run"]["machine"]["cores"] >= 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["cifar"]["median_ratio"] == cifar["median_ratio"]  # stdout is the JSON alone
    assert "round 1/2" in captured.err and "round 2/2" in captured.err
    section = markdown.read_text()
    assert "paired rounds" in section and f"**B is {cifar['median_ratio']}x A**" in section
    assert "--pairs 16" in section and "[0.25, 0.5, 0.75]" in section
    assert section.count('<a id="data-two-views"></a>') == 1  # the section of its question, keyed by its id

    # Other jobs on the cores: the figures are marked, and --write is refused before any work.
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert not bench.quiet_machine([9.0, 9.0, 9.0], cores=2)[0]
    with pytest.raises(SystemExit) as refused:
        bench.main([str(cifar_root / "train"), "--work-dir", str(tmp_path / "work"), "--write",
                    "--markdown", str(tmp_path / "refused.md")])
    assert refused.value.code == 2 and not (tmp_path / "refused.md").exists()
    assert "refusing --write" in capsys.readouterr().err


def test_augment_benchmark_compares_and_times_each_op(capsys):
    out = _script("bench_augment").main(["--sizes", "8:4", "--trials", "1", "--ops"])
    (result,) = out["results"]
    assert result["batched_images_per_s"] > 0 and result["speedup_vs_torchvision_per_image"] > 0
    for view in ("view1", "view2"):
        ops = out["ops"][view]
        assert {"color_jitter", "blur", "op_hsv_round_trip_all"} <= set(ops["ms"])
        assert sum(ops["share"].values()) == pytest.approx(1.0, abs=0.01)
    assert json.loads(capsys.readouterr().out)["ops"]["side"] == 8


def test_peer_benchmark_trains_both_and_scores_them_with_one_knn(cifar_root):
    out = _script("bench_peer").main(["--data", str(cifar_root), "--steps", "3", "--batch", "40",
                                      "--train-fraction", "1.0", "--threads", "1", "--seeds", "0", "1"])
    assert out["steps"] == 3 and out["train_images"] == 120 and out["test_images"] == 60
    assert [r["seed"] for r in out["rows"]] == [0, 1]
    for side in ("byol_ray", "byol_pytorch"):
        assert out[side]["train_s"] > 0 and 0.0 <= out[side]["knn_top1"] <= 1.0
        assert out[side]["knn_top1"] == pytest.approx(sum(r[side]["knn_top1"] for r in out["rows"]) / 2)
    assert out["speedup_vs_byol_pytorch"] > 0


@pytest.mark.slow
def test_ablation_goes_through_train_register_and_evaluate(cifar_root, tmp_path):
    out = _script("ablation").main(["--data", str(cifar_root), "--work", str(tmp_path), "--arms", "random",
                                    "fixed_target", "--seeds", "0", "--epochs", "1", "--train-fraction", "1.0",
                                    "--linear-epochs", "1", "--override", "train.batch_size=40"])
    rows = {r["arm"]: r for r in out["rows"]}
    assert set(rows) == {"random", "fixed_target"}
    assert rows["random"]["model"] == "models:/ablation-random/1"
    assert [e for e, _ in rows["random"]["knn_curve"]] == [0]  # the untrained checkpoint
    assert [e for e, _ in rows["fixed_target"]["knn_curve"]] == [1]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["summary"]["fixed_target"]["knn_top1"][0] == rows["fixed_target"]["knn_top1"]
    # tau = 1: the target never moved, so the fixed-target arm's target is still the initial online net
    import torch

    from byol_ray.checkpoint import load_checkpoint

    final = load_checkpoint(tmp_path / "runs" / "fixed_target-s0" / "checkpoints" / "epoch_0001")
    start = load_checkpoint(tmp_path / "runs" / "random-s0" / "checkpoints" / "epoch_0000")
    for key, value in start["target"].items():
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(final["target"][key], value, msg=key)


@pytest.mark.slow
def test_recipe_sweep_scores_the_random_baseline_and_each_point(cifar_root, tmp_path):
    out = _script("recipe_sweep").main(["--data", str(cifar_root), "--work", str(tmp_path), "--epochs", "1",
                                        "--train-fraction", "1.0", "--point", "random",
                                        "--point", "optim.base_lr=0.1 train.tau_base=0.98",
                                        "--override", "train.batch_size=40"])
    random, trained = out["rows"]
    assert random["point"] == "random" and random["epochs"] == 0 and "final_loss" not in random
    assert trained["epochs"] == 1 and trained["final_loss"] > 0 and 0 <= trained["knn_top1"] <= 1
    saved = (tmp_path / "runs" / "point01" / "config.yaml").read_text()
    assert "base_lr: 0.1" in saved and "tau_base: 0.98" in saved  # the point's overrides reached the run
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == out["rows"]


@pytest.mark.slow
def test_ray_overhead_benchmark_compares_runs_and_accounts_cpu(ray_cluster):
    out = _script("bench_ray").main(["--epochs", "2", "--rounds", "1", "--threads", "1", "--no-two-workers",
                                     "--idle-seconds", "2", "--overrides", "train.batch_size=64"])
    results = out["results"]
    assert set(results) == {"plain_engine", "plain_engine_ray_idle", "ray_1_worker"}
    for run in results.values():
        assert run["images_per_s"] > 0 and run["training_cpu_ms_per_image"] > 0
    # the sampler found the process that trains: the Train worker under Ray, this process otherwise
    assert results["ray_1_worker"]["cpu_per_s"]["train_worker"] > 0.3
    assert results["plain_engine"]["cpu_per_s"]["driver"] > 0.3
    assert results["plain_engine"]["cpu_per_s"]["train_worker"] == 0
    assert out["ray_1_worker_vs_plain"] == pytest.approx(
        results["ray_1_worker"]["images_per_s"] / results["plain_engine"]["images_per_s"], rel=0.01)
