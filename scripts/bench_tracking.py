"""How long does metric logging stall the training thread: MLflow's own async logging vs our queue.

The issue asked to replace byol-ray's queue + background thread (``byol_ray.tracker.MlflowTracker``) with
MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``, kept here as ``AsyncLogger``) unless a
measurement showed it slower; this is that measurement, and it did (docs/benchmarks.md). Both log the same rows
(8 metrics a step, as the engine's step log has) into one sqlite store, in interleaved paired rounds
(A, B, A, B, ...). Reported: the caller's time per ``log_metrics`` call (what a training step pays) and the
time to drain everything at the end, the median of the paired ratios, and the load average.

    .venv/bin/python scripts/bench_tracking.py --rounds 5 --steps 500 [--write]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from byol_ray.config import load_config  # noqa: E402
from byol_ray.mlflow_store import client as mlflow_client  # noqa: E402
from byol_ray.mlflow_store import ensure_experiment  # noqa: E402
from byol_ray.tracker import MlflowTracker  # noqa: E402

ROW = {"loss": 1.5, "lr": 0.1, "tau": 0.99, "projection_std": 0.05, "classifier_acc": 0.3, "images_per_s": 900.0,
       "step_time_s": 0.1, "epoch": 1.0}


class AsyncLogger:
    """The candidate: every call a ``log_batch(..., synchronous=False)``; finish waits for them all."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.client = mlflow_client(uri)
        self.run_id = self.client.create_run(ensure_experiment(self.client, experiment, uri)).info.run_id
        self.pending = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending.append(self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()], synchronous=False))

    def finish(self) -> None:
        for operation in self.pending:
            operation.wait()
        self.client.set_terminated(self.run_id)


def one_round(make, steps: int) -> dict[str, float]:
    logger = make()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        logger.log_metrics(ROW, step)
    logged = time.perf_counter() - start
    logger.finish()
    total = time.perf_counter() - start
    return {"call_us": 1e6 * logged / steps, "drain_s": total - logged, "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--write", action="store_true", help="append the figures to docs/benchmarks.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(["demo"], [f"output_dir={tmp}", "run_name=bench", "mlflow.system_metrics_every_s=0"])

    def mlflow_async():
        return AsyncLogger(uri, "bench")

    def hand_queue():  # byol-ray's tracker, without the system-metrics thread
        tracker = MlflowTracker(uri, "bench")
        tracker.start(cfg)
        return tracker

    one_round(mlflow_async, 20), one_round(hand_queue, 20)  # warm-up: schema, imports, connections
    rows = []
    for r in range(args.rounds):
        a = one_round(hand_queue, args.steps)
        b = one_round(mlflow_async, args.steps)
        rows.append({"round": r, "queue": a, "async": b})
        print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    call = statistics.median(r["async"]["call_us"] / r["queue"]["call_us"] for r in rows)
    total = statistics.median(r["async"]["total_s"] / r["queue"]["total_s"] for r in rows)
    summary = {
        "steps": args.steps, "rounds": args.rounds, "loadavg_1_5_15": [round(x, 2) for x in load],
        "queue_call_us_median": statistics.median(r["queue"]["call_us"] for r in rows),
        "async_call_us_median": statistics.median(r["async"]["call_us"] for r in rows),
        "queue_total_s_median": statistics.median(r["queue"]["total_s"] for r in rows),
        "async_total_s_median": statistics.median(r["async"]["total_s"] for r in rows),
        "call_ratio_async_over_queue": call, "total_ratio_async_over_queue": total,
    }
    print(json.dumps(summary, indent=2))
    if args.write:
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        with open(doc, "a") as fh:
            fh.write(
                f"\n## MLflow metric logging: MLflow's async logging vs byol-ray's queue "
                f"({time.strftime('%Y-%m-%d')})\n\n"
                f"`.venv/bin/python scripts/bench_tracking.py --rounds {args.rounds} --steps {args.steps} --write` — "
                f"{args.steps} step logs of 8 metrics into a local sqlite store, {args.rounds} interleaved paired "
                f"rounds, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min).\n\n"
                f"| | byol-ray's queue (`MlflowTracker`) | MLflow async (`synchronous=False`) | median paired ratio async/queue |\n|---|---|---|---|\n"
                f"| caller's time per `log_metrics` | {summary['queue_call_us_median']:.0f} µs | "
                f"{summary['async_call_us_median']:.0f} µs | {call:.2f} |\n"
                f"| log + drain, whole round | {summary['queue_total_s_median']:.2f} s | "
                f"{summary['async_total_s_median']:.2f} s | {total:.2f} |\n")


if __name__ == "__main__":
    main()
