"""Benchmark: Ray Train overhead (1 worker vs the plain engine) and 2-worker vs 1-worker throughput, CPU.

Usage:  .venv/bin/python scripts/bench_ray.py [--epochs 4] [--write]
Steady state = mean images/s of the epochs after the first (the first pays FFCV compilation and
start-up). All three runs use the same config, data (.beton of the built-in digits) and seed, in
this one script; each run is the real code path (`fit` in-process, `launch` under Ray).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep the local Ray on loopback

from byol_ray.config import derive, load_config  # noqa: E402
from byol_ray.engine import fit  # noqa: E402
from byol_ray.run import build_train_loader, read_history, resolve_paths, run_dir, training_file  # noqa: E402

OVERRIDES = ["model.projector_hidden_dim=512", "model.predictor_hidden_dim=512", "train.batch_size=128",
             "train.checkpoint_every_epochs=100", "mlflow.enabled=false", "train.log_every_steps=1000"]


def steady(history: list[dict]) -> float:
    return statistics.mean(h["images_per_s"] for h in history[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="byol-bench-ray-"))
    common = [*OVERRIDES, f"train.epochs={args.epochs}", f"output_dir={tmp}/runs", f"ray.storage_path={tmp}/ray",
              f"data.cache_dir={tmp}/cache"]

    # plain engine, this process, 2 threads (what one Ray worker with 2 CPUs gets)
    torch.set_num_threads(2)
    cfg = resolve_paths(load_config(["demo"], [*common, "run_name=plain"]))
    loader = build_train_loader(cfg, training_file(cfg), torch.device("cpu"))
    start = time.perf_counter()
    plain = fit(cfg, derive(cfg, loader.num_samples, 1), loader, torch.device("cpu"))
    plain_wall = time.perf_counter() - start

    from byol_ray.ray_train import launch

    results = {"plain_engine": {"images_per_s": steady(plain.history), "wall_s": plain_wall}}
    for name, extra in (("ray_1_worker", ["ray.num_workers=1", "ray.cpus_per_worker=2"]),
                        ("ray_2_workers", ["ray.num_workers=2", "ray.cpus_per_worker=1"])):
        cfg = resolve_paths(load_config(["demo"], [*common, f"run_name={name}", *extra]))
        start = time.perf_counter()
        launch(cfg)
        results[name] = {"images_per_s": steady(read_history(run_dir(cfg))), "wall_s": time.perf_counter() - start}
    base = results["plain_engine"]["images_per_s"]
    out = {
        "benchmark": "ray_overhead", "epochs": args.epochs, "batch": 128, "encoder": "tiny", "data": "demo .beton",
        "load_average": os.getloadavg(), "results": {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in results.items()},
        "ray_1_worker_vs_plain": round(results["ray_1_worker"]["images_per_s"] / base, 3),
        "ray_2_workers_vs_1": round(results["ray_2_workers"]["images_per_s"] / results["ray_1_worker"]["images_per_s"], 3),
    }
    print(json.dumps(out, indent=2))
    if args.write:
        lines = [
            f"\n## Ray Train overhead and 2 vs 1 workers (CPU, {time.strftime('%Y-%m-%d')})\n",
            f"Command: `.venv/bin/python scripts/bench_ray.py --epochs {args.epochs} --write`. Tiny encoder, "
            f"global batch 128, built-in digits (.beton, FFCV loader), steady-state images/s = mean of epochs 2..{args.epochs}. "
            f"Load average at the end: {', '.join(f'{x:.2f}' for x in out['load_average'])}.\n",
            "| run | images/s | wall s |", "|---|---|---|",
            *[f"| {k} | {v['images_per_s']:.1f} | {v['wall_s']:.1f} |" for k, v in results.items()],
            f"\nRay (1 worker, 2 CPUs) / plain engine (2 threads): **{out['ray_1_worker_vs_plain']}**. "
            f"2 workers (1 CPU each) / 1 worker (2 CPUs): **{out['ray_2_workers_vs_1']}** — the machine has 2 cores, "
            "so a second worker only splits them; the figure shows the cost of the DDP all-reduce, not scaling.",
        ]
        with open(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
