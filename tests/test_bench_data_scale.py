"""scripts/bench_resolution.py and scripts/bench_prepare.py run end to end at a tiny size on real CIFAR-10 JPEGs.

The figures come from full runs on a quiet machine; these tests check the scripts' plumbing and that their
JSON holds sane values. The crop statistics do not depend on load, so they are checked against their values.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--images", "40", "--rounds", "1"]


def _script(name: str):
    """The script as a module, loaded once per session (bench_prepare's `import bench_resolution` finds it too;
    bench_resolution keeps its FFCV loaders alive in the module, see its _LOADERS)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One work folder for the module: both scripts reuse the same 40 synthetic images (a stamp records them)."""
    return tmp_path_factory.mktemp("bench-data-scale")


def test_crop_statistics_of_the_reference_law_per_stored_side():
    br = _script("bench_resolution")
    assert br.stored_size(500, 375, 256) == (256, 192)  # FFCV's max_resolution rule
    assert br.stored_size(375, 500, 384) == (288, 384)
    assert br.stored_size(500, 375, 512) == (500, 375)  # never upscaled
    stats = br.crop_statistics([256, 384, 512], draws=20_000)
    ref = stats["reference"]
    for side in ("256", "384", "512", "full"):
        s = ref[side]
        for key in ("share_upsampled", "share_any_axis_upsampled", "share_both_axes_upsampled"):
            assert 0.0 <= s[key] <= 1.0
        assert s["share_both_axes_upsampled"] <= s["share_upsampled"] <= s["share_any_axis_upsampled"]
    assert ref["256"]["share_upsampled"] == 1.0 and ref["256"]["eval_upsampled"]  # 256x192: every crop upsampled
    assert ref["256"]["share_upsampled"] > ref["384"]["share_upsampled"] > ref["512"]["share_upsampled"]
    assert not ref["384"]["eval_upsampled"] and ref["384"]["eval_crop_side"] == 252
    assert ref["512"] == ref["full"]  # a 500x375 image is stored whole at 512
    assert ref["256"]["mean_crop_side"] == pytest.approx(155, abs=2)
    assert ref["full"]["mean_crop_side"] == pytest.approx(302, abs=3)
    assert stats["torchvision"]["full"]["mean_crop_side"] == pytest.approx(275, abs=3)
    rec = br.recommend(stats)
    assert rec["side"] == 384 and rec["share_not_upsampled"] > 0.5


def test_bench_resolution_stats_only_writes_its_section(tmp_path, monkeypatch):
    br = _script("bench_resolution")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # no timing: a loaded machine may --write
    out = br.main(["--stats-only", "--draws", "5000", "--write", "--markdown", str(docs)])
    assert "throughput" not in out and out["recommendation"]["side"] == 384
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n") and "| 256 | 256x192 |" in text and "`torchvision` law" in text
    assert '<a id="stored-resolution-imagenet"></a>' in text and "## Stored resolution for ImageNet" in text
    # a second run replaces the section of the same id; the first moves to the history file beside it
    br.main(["--stats-only", "--draws", "4000", "--write", "--markdown", str(docs)])
    text, history = docs.read_text(), (tmp_path / "benchmarks-history.md").read_text()
    assert text.count("## Stored resolution for ImageNet") == 1 and "4000 draws" in text and "5000 draws" not in text
    assert "5000 draws" in history and '<a id="' not in history


def test_bench_resolution_measures_every_side_on_real_images(cifar_archive, work):
    br = _script("bench_resolution")
    workers = str(min(2, len(os.sched_getaffinity(0))))
    out = br.main(["--cifar", str(cifar_archive), "--work-dir", str(work), *TINY, "--batches", "2",
                   "--batch-size", "8", "--draws", "5000", "--workers", workers])
    assert out["sides"] == [256, 384, 512] and out["data"]["images"] == 40
    assert len(out["run"]["load"]["before"]) == 3 and len(out["run"]["load"]["after"]) == 3
    for side in ("256", "384", "512"):
        t = out["throughput"][side]
        assert t["pairs_per_s"] > 0 and t["pairs_per_cpu_s"] > 0 and t["bytes_per_image"] > 0
        assert len(t["rounds_pairs_per_s"]) == 1
        # the stored sizes FFCV wrote are the ones the statistics assume
        assert t["mean_stored"] == out["crop_stats"]["reference"]["mix"][side]["mean_stored"]
        for law in ("reference", "torchvision"):
            s = out["crop_stats"][law][side]
            assert 0.0 <= s["share_upsampled"] <= 1.0 and 0.0 <= s["share_any_axis_upsampled"] <= 1.0
            assert 0.0 <= out["crop_stats"][law]["mix"][side]["share_eval_upsampled"] <= 1.0
    assert out["throughput"]["256"]["bytes_per_image"] < out["throughput"]["512"]["bytes_per_image"]
    ref = out["crop_stats"]["reference"]
    assert ref["256"]["share_upsampled"] > ref["512"]["share_upsampled"]
    assert ref["mix"]["256"]["share_upsampled"] > ref["mix"]["512"]["share_upsampled"]
    rec = out["recommendation"]
    assert rec["side"] == 384 and rec["cpu_s_per_pair_vs_smallest"] > 0
    text = br.to_markdown(out)
    assert "| 384 | 384x288 |" in text and "Recommendation" in text


def test_bench_prepare_runs_the_cli_and_extrapolates(cifar_archive, work, tmp_path, monkeypatch):
    bp = _script("bench_prepare")
    docs = tmp_path / "docs" / "benchmarks.md"  # not there yet: --write starts it
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # a quiet machine, so --write is allowed
    out = bp.main(["--cifar", str(cifar_archive), "--work-dir", str(work), *TINY, "--workers", "1", "2",
                   "--cores", "32", "--machines", "1", "4", "--write", "--markdown", str(docs)])
    assert set(out["summary"]) == {"1", "2"} and out["side"] == 384
    for n, s in out["summary"].items():
        assert s["images_per_s"] > 0 and s["prepare_images_per_s"] > 0 and s["images_per_cpu_s"] > 0
        assert s["images_per_s_per_process"] == pytest.approx(s["images_per_s"] / int(n), abs=0.1)
        assert 0 < s["peak_pss_mib"] <= s["peak_rss_mib"] and s["peak_max_process_rss_mib"] <= s["peak_rss_mib"]
        assert s["peak_processes"] >= 2  # the CLI and at least one writer
        assert [r["images"] for r in out["runs"][n]] == [40]
    e = out["extrapolation"]
    assert "extrapolation" in e["label"] and e["target_images"] == 1_281_167
    hours = {(r["cores"], r["machines"]): r["hours"] for r in e["rows"]}
    assert set(hours) == {(1, 1), (32, 1), (32, 4)}
    assert hours[(1, 1)] > 0 and hours[(1, 1)] >= hours[(32, 1)] >= hours[(32, 4)] >= 0
    assert out["scaling_efficiency"] > 0
    assert "Extrapolation, not a measurement" in docs.read_text()
