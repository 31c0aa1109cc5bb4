"""Benchmark: a short-run recipe sweep on CIFAR-10, CPU: train each override set, score its encoder by kNN.

Each point is the project's own path: `byol-ray train --no-ray --config cifar10_cpu <overrides>` on a
class-balanced share of CIFAR-10 train (the .beton that scripts/ablation.py prepares), then kNN top-1
(k=200, T=0.1, bank = that share, queries = the 10,000 test images) of the final encoder with the
library's kNN code. ``random`` scores the untrained encoder of the same seed (the baseline every
point must beat).

Usage:
  .venv/bin/python scripts/recipe_sweep.py --data /tmp/cifar10 --epochs 10 \\
      --point random --point optim.base_lr=0.1 --point optim.base_lr=0.2 --point optim.base_lr=0.5
  (each --point is one space-separated override set; ``--write`` replaces its section of docs/benchmarks.md)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402  (the same prepare / checkpoint / kNN helpers as the ablation)
import harness  # noqa: E402


def run_point(point: str, index: int, args, train: Path, test: Path, work: Path, log: Path) -> dict:
    name = f"point{index:02d}"
    overrides = [*ablation.TRAIN, f"train.seed={args.seed}", f"train.epochs={args.epochs}", f"data.train={train}",
                 f"output_dir={work}/runs", f"data.cache_dir={work}/cache", f"run_name={name}",
                 "mlflow.enabled=false", *args.override]
    start = time.perf_counter()
    if point == "random":
        ablation.random_checkpoint(overrides, work, name)
    else:
        ablation.cli("train", "--no-ray", "--config", ablation.PRESET, *overrides, *point.split(), log=log)
    train_s = time.perf_counter() - start
    epoch, knn = ablation.knn_curve(work / "runs" / name, train, test, 10**9)[-1]
    row = {"point": point, "epochs": epoch, "knn_top1": knn, "train_s": round(train_s, 1)}
    metrics = work / "runs" / name / "metrics.jsonl"
    if metrics.exists():
        last = json.loads(metrics.read_text().splitlines()[-1])
        row.update(final_loss=round(last["epoch_loss"], 4), projection_std=round(last["epoch_projection_std"], 4))
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root holding train/ and test/")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a new temp folder)")
    p.add_argument("--point", action="append", required=True,
                   help="'random' or space-separated overrides of the cifar10_cpu preset; repeatable")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=0.2, help="class-balanced share of train/ used")
    p.add_argument("--override", nargs="*", default=[], help="overrides applied to every point")
    harness.add_arguments(p)
    args = p.parse_args(argv)
    bench = harness.Bench("recipe_sweep.py", argv, args, timed=False)  # accuracy figures: the load is noted only
    start = time.perf_counter()
    work, log, train, test = ablation.workspace(args, "byol-sweep-")
    rows = [run_point(point, i, args, train, test, work, log) for i, point in enumerate(args.point)]
    out = {"benchmark": "recipe_sweep", "preset": ablation.PRESET, "epochs": args.epochs, "seed": args.seed,
           "train_fraction": args.train_fraction, "override": args.override,
           "wall_s": round(time.perf_counter() - start, 1), "rows": rows}
    bench.finish(out)
    (work / "sweep.json").write_text(json.dumps(out, indent=2))
    table = harness.markdown_table(["point", "kNN top-1 %", "final loss", "projection std", "train s"],
                                   [[r["point"], f"{100 * r['knn_top1']:.1f}", r.get("final_loss", "–"),
                                     r.get("projection_std", "–"), f"{r['train_s']:.0f}"] for r in rows])
    best = max(rows, key=lambda r: r["knn_top1"])
    bench.write_section(
        "recipe-sweep", f"Short-run learning-rate sweep on CIFAR-10 (CPU, {bench.date})",
        f"Preset `{ablation.PRESET}` plus each point's overrides, {args.epochs} epochs on a class-balanced "
        f"{args.train_fraction:g} share of CIFAR-10 train, seed {args.seed}; kNN (k=200, T=0.1) on the 10,000 test "
        f"images; {out['wall_s'] / 60:.1f} min in all.\n\n{table}",
        question="Which learning rate for a short CPU run?",
        summary=f"best kNN top-1 {100 * best['knn_top1']:.1f} % at `{best['point']}` ({args.epochs} epochs, seed "
                f"{args.seed})")
    return out


if __name__ == "__main__":
    main()
