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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500)
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    bench = harness.Bench("bench_tracking.py", argv, args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(["demo"], [f"output_dir={tmp}", "run_name=bench", "mlflow.system_metrics_every_s=0"])

    def mlflow_async():
        return AsyncLogger(uri, "bench")

    def hand_queue():  # byol-ray's tracker, without the system-metrics thread
        tracker = MlflowTracker(uri, "bench")
        tracker.start(cfg)
        return tracker

    # a warm-up round of 20 steps (schema, imports, connections), then queue, async, queue, ...
    done = harness.interleaved({"queue": lambda r: one_round(hand_queue, args.steps if r >= 1 else 20),
                                "async": lambda r: one_round(mlflow_async, args.steps if r >= 1 else 20)},
                               args.rounds, warmup=1)
    bench.end()
    call, total = done.paired("async", "queue", "call_us", 2), done.paired("async", "queue", "total_s", 2)
    summary = {
        "steps": args.steps, "rounds": args.rounds, "per_round": done.rows,
        "queue_call_us_median": done.median("queue", "call_us"), "async_call_us_median": done.median("async", "call_us"),
        "queue_total_s_median": done.median("queue", "total_s"), "async_total_s_median": done.median("async", "total_s"),
        "call_ratio_async_over_queue": call["median_ratio"], "total_ratio_async_over_queue": total["median_ratio"],
        "call_ratios": call["ratios"], "total_ratios": total["ratios"],
    }
    bench.finish(summary)
    print(json.dumps(summary, indent=2))
    body = (f"{args.steps} step logs of 8 metrics into a local sqlite store, {args.rounds} interleaved paired rounds "
            "after a warm-up.\n\n" + harness.markdown_table(
                ["", "byol-ray's queue (`MlflowTracker`)", "MLflow async (`synchronous=False`)",
                 "median paired ratio async/queue"],
                [["caller's time per `log_metrics`", f"{summary['queue_call_us_median']:.0f} µs",
                  f"{summary['async_call_us_median']:.0f} µs", f"{call['median_ratio']:.2f}"],
                 ["log + drain, whole round", f"{summary['queue_total_s_median']:.2f} s",
                  f"{summary['async_total_s_median']:.2f} s", f"{total['median_ratio']:.2f}"]]))
    bench.write_section("mlflow-logging", f"MLflow metric logging: MLflow's async logging vs byol-ray's queue "
                                          f"({bench.date})", body,
                        question="MLflow's async logging or our queue?",
                        summary=f"MLflow's `synchronous=False` cost the caller {call['median_ratio']:.0f}× and the "
                                f"whole drain {total['median_ratio']:.1f}× byol-ray's queue (median of {args.rounds} "
                                "paired rounds)")
    return summary


if __name__ == "__main__":
    main()
