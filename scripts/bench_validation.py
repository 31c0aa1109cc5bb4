"""Does held-out validation slow training down? Epoch time with validation on and off, paired rounds.

Each round trains the same config twice under Ray Train (one in-process local Ray, 1 worker of 1 CPU):
once without validation, once with ``data.val`` set and ``eval.every_epochs=1`` (a Ray task of
``eval.cpus=1`` computes kNN top-1 of every epoch's checkpoint on the held-out split while the worker
trains on). Rounds alternate A (off), B (on), A, B, ...; reported: the mean epoch time of each run
(epoch 1 excluded: it pays the loader's and the first validation worker's start), the median of the
paired ratios on/off, and the load average. The machine's CPUs must cover the worker and the task
(2 here); with fewer the two share a core and the figure is not what validation "on its own CPU" costs.
With ``--loader torch`` a DataLoader process decodes JPEGs beside the worker, so the worker, the loader and
the validation task share the 2 cores; ``memory`` (the default) keeps the worker to its one CPU.

    .venv/bin/python scripts/bench_validation.py --train /tmp/cifar-5k/train --val /tmp/cifar-5k/val [--write]

(``--train``/``--val``: ImageFolders, e.g. 500 and 100 real CIFAR-10 JPEGs per class.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def one_run(args, tmp: Path, name: str, validate: bool) -> dict:
    from byol_ray.config import load_config
    from byol_ray.history import read_history
    from byol_ray.ray_train import launch

    overrides = [f"data.train={args.train}", f"data.loader={args.loader}", "data.num_workers=1",
                 f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.log_every_steps=1000",
                 "train.checkpoint_every_epochs=1", "ray.num_workers=1", "ray.cpus_per_worker=1", "eval.cpus=1",
                 "mlflow.enabled=false", f"output_dir={tmp}/runs", f"data.cache_dir={tmp}/cache", f"run_name={name}"]
    if validate:
        overrides += [f"data.val={args.val}", "eval.every_epochs=1"]
    launch(load_config(["demo"], overrides))
    history = read_history(tmp / "runs" / name)
    times = [r["epoch_time_s"] for r in history[1:]]
    val_path = tmp / "runs" / name / "validation.jsonl"
    vals = [json.loads(x) for x in val_path.read_text().splitlines()] if val_path.exists() else []
    return {"epoch_time_s": statistics.mean(times), "epochs": len(history), "validations": len(vals),
            "val_time_s": statistics.mean(v["val_time_s"] for v in vals) if vals else None,
            "val_knn_top1": vals[-1]["val_knn_top1"] if vals else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--loader", default="memory", choices=["memory", "torch"],
                        help="memory (default): decoded once, no loader process, so the worker uses exactly its "
                             "one CPU; torch: a DataLoader process decodes JPEGs beside it")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    bench = harness.Bench("bench_validation.py", argv, args)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    tmp = Path(tempfile.mkdtemp(prefix="bench-validation-"))
    import ray

    ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False)  # its own, never another's
    done = harness.interleaved({"off": lambda r: one_run(args, tmp, f"off-{r}", validate=False),
                                "on": lambda r: one_run(args, tmp, f"on-{r}", validate=True)}, args.rounds,
                               describe=lambda row: json.dumps({k: row[k] for k in ("off", "on")}))
    ray.shutdown()
    bench.end()
    paired = done.paired("on", "off", "epoch_time_s", 4)
    summary = {"rounds": args.rounds, "ratio_on_over_off_median": paired["median_ratio"], "ratios": paired["ratios"],
               "off_epoch_s_median": done.median("off", "epoch_time_s"),
               "on_epoch_s_median": done.median("on", "epoch_time_s"),
               "val_task_s_median": statistics.median(r["on"]["val_time_s"] for r in done.rows),
               "per_round": done.rows}
    bench.finish(summary)
    print(json.dumps(summary, indent=2))
    n_train = sum(1 for _ in Path(args.train).rglob("*.jpg"))
    n_val = sum(1 for _ in Path(args.val).rglob("*.jpg"))
    body = (
        f"{n_train} real CIFAR-10 training JPEGs and {n_val} held-out ones (the `demo` preset's tiny encoder, batch "
        f"{args.batch_size}, `data.loader={args.loader}`), one Ray Train worker of 1 CPU and a validation task of 1 "
        f"CPU (`eval.cpus=1`); {args.rounds} interleaved paired rounds (off, on).\n\n"
        + harness.markdown_table(["", "validation off", "validation on (every epoch)"], [
            [f"mean epoch time, epochs 2..{args.epochs} (median of rounds)", f"{summary['off_epoch_s_median']:.2f} s",
             f"{summary['on_epoch_s_median']:.2f} s"],
            ["validation task (kNN over the bank + held-out split)", "–", f"{summary['val_task_s_median']:.2f} s"]])
        + f"\n\nMedian paired ratio on/off: **{paired['median_ratio']:.3f}** (rounds: "
        + ", ".join(f"{x:.3f}" for x in paired["ratios"]) + "); the target was within 1.05.")
    bench.write_section(f"validation-on-off-{args.loader}",
                        f"Held-out validation beside training: epoch time on vs off ({bench.date}"
                        + ("" if args.loader == "memory" else f", `data.loader={args.loader}`") + ")", body,
                        question=f"Does validation slow training (`data.loader={args.loader}`)?",
                        summary=f"{paired['median_ratio']:.3f}× epoch time with validation on (median of "
                                f"{args.rounds} paired rounds, range {paired['ratio_range'][0]:.3f}–"
                                f"{paired['ratio_range'][1]:.3f})")
    return summary


if __name__ == "__main__":
    main()
