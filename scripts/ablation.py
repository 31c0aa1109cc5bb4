"""Benchmark: the paper's Section 3 ablation at small scale on real CIFAR-10 images, on a CPU.

Arms (Grill et al. 2020, Sec. 3 and Table 5b):
  random        the randomly initialised encoder, no training (paper: 1.4% linear top-1 on ImageNet)
  fixed_target  online network + predictor trained to predict a FIXED random target: tau = 1
                throughout, so the EMA never moves the target (paper: 18.8%)
  byol          BYOL: the target is the EMA of the online network (paper: 74.3%)
  no_predictor  BYOL without the predictor (paper, Table 5b: collapses, 0.2% with tau=0.996)

Every arm goes through the project's own commands: `byol-ray prepare` (the .beton files), `byol-ray
train --no-ray` (registers the online encoder in MLflow), `byol-ray register` (the random arm's
untrained checkpoint), then `byol-ray knn` and `byol-ray linear-eval` on the CIFAR-10 test split,
pulling each encoder from the registry. kNN accuracy after every epoch (the curve) is measured in
this process on the epoch checkpoints with the same kNN code (`byol_ray.evaluation.knn`).

Usage:
  .venv/bin/python scripts/ablation.py --data /tmp/cifar10 --seeds 0 1 --epochs 20 --write
  (``--data`` is an ImageFolder root with train/ and test/; tests run it with a tiny configuration)

Each finished arm is saved in ``<work>/rows/``; a re-run with the same ``--work`` and settings reuses
it (an interrupted ablation resumes; more seeds can be added later).
Writes ``<work>/ablation.json``; ``--write`` replaces its section of docs/benchmarks.md (scripts/harness.py) and
saves the kNN-vs-epoch plot as docs/ablation_knn.png (beside ``--markdown``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "byol-ray"

ARMS: dict[str, list[str] | None] = {
    "random": None,
    "fixed_target": ["train.tau_base=1.0"],
    "byol": [],
    "no_predictor": ["model.use_predictor=false"],
}
# The CPU recipe: the cifar10_cpu preset (tiny encoder, LARS base_lr 0.2; see its header), a checkpoint
# every epoch for the kNN curve.
PRESET = "cifar10_cpu"
TRAIN = ["train.checkpoint_every_epochs=1", "ray.num_to_keep=1000", "train.log_every_steps=1000"]


def cli(*args: str, log: Path) -> str:
    """Run one `byol-ray` command; its output goes to ``log``; the last JSON line is returned."""
    start = time.perf_counter()
    out = subprocess.run([str(BIN), *args], capture_output=True, text=True)
    with open(log, "a") as fh:
        fh.write(f"$ byol-ray {' '.join(args)}\n{out.stdout}{out.stderr}\n[{time.perf_counter() - start:.1f} s]\n")
    if out.returncode != 0:
        raise SystemExit(f"byol-ray {args[0]} failed (exit {out.returncode}); see {log}\n{out.stderr[-2000:]}")
    return out.stdout


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def prepare(data: Path, work: Path, fraction: float, log: Path) -> tuple[Path, Path]:
    train, test = work / "cifar10-train.beton", work / "cifar10-test.beton"
    if not train.exists():
        extra = ["--label-fraction", str(fraction)] if fraction < 1 else []
        cli("prepare", str(data / "train"), str(train), *extra, "--seed", "0", "--quiet", log=log)
    if not test.exists():
        cli("prepare", str(data / "test"), str(test), "--quiet", log=log)
    return train, test


def workspace(args, prefix: str) -> tuple[Path, Path, Path, Path]:
    """The working folder (``args.work`` or a new temp folder), its command log and the prepared splits."""
    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    os.environ.setdefault("TQDM_DISABLE", "1")
    train, test = prepare(args.data, work, args.train_fraction, log)
    return work, log, train, test


def random_checkpoint(cfg_overrides: list[str], work: Path, name: str) -> Path:
    """The untrained starting point of every arm (same seed = same initial weights), as a checkpoint."""
    import torch

    from byol_ray.checkpoint import save_checkpoint
    from byol_ray.config import derive, load_config
    from byol_ray.engine import BYOLEngine

    cfg = load_config([PRESET], cfg_overrides)
    engine = BYOLEngine(cfg, derive(cfg, 50_000, 1), torch.device("cpu"))
    return save_checkpoint(engine.state_dict(), work / "runs" / name / "checkpoints" / "epoch_0000" / "state.pt")


def knn_curve(run: Path, train: Path, test: Path, every: int) -> list[tuple[int, float]]:
    """kNN top-1 (k=200, T=0.1) of every ``every``-th epoch checkpoint (and the last) of a run, with the
    library's kNN code."""
    import torch

    from byol_ray.checkpoint import load_checkpoint
    from byol_ray.evaluation.data import LoaderSettings, open_split
    from byol_ray.evaluation.knn import knn_eval
    from byol_ray.registry import encoder_from_checkpoint

    settings = LoaderSettings(resolution=32, batch_size=512, num_workers=1, device="cpu", center_crop_ratio=1.0)
    train_split, test_split = open_split(str(train), "train"), open_split(str(test), "test")
    curve = []
    checkpoints = sorted(run.glob("checkpoints/epoch_*/state.pt"))
    for i, ckpt in enumerate(checkpoints):
        if int(ckpt.parent.name.split("_")[1]) % every and i != len(checkpoints) - 1:
            continue
        state = load_checkpoint(ckpt)
        with torch.no_grad():
            result = knn_eval(encoder_from_checkpoint(state), train_split, test_split, settings)
        curve.append((int(state["epoch"]), result["knn_top1"]))
    return curve


def run_arm(arm: str, seed: int, args, train: Path, test: Path, work: Path, log: Path) -> dict:
    arm_start = time.perf_counter()
    name = f"{arm}-s{seed}"
    uri = f"sqlite:///{work}/mlflow.db"
    overrides = [*TRAIN, f"train.seed={seed}", f"train.epochs={args.epochs}", f"data.train={train}",
                 f"output_dir={work}/runs", f"data.cache_dir={work}/cache", f"run_name={name}",
                 f"mlflow.tracking_uri={uri}", f"mlflow.register_name=ablation-{arm}", *args.override]
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # an arm interrupted mid-run starts over
    start = time.perf_counter()
    if ARMS[arm] is None:
        ckpt = random_checkpoint(overrides, work, name)
        cli("register", "--checkpoint", str(ckpt), f"mlflow.register_name=ablation-{arm}", f"mlflow.tracking_uri={uri}",
            log=log)
    else:
        cli("train", "--no-ray", "--config", PRESET, *overrides, *ARMS[arm], log=log)
    train_s = time.perf_counter() - start
    from mlflow import MlflowClient

    version = max(MlflowClient(uri, registry_uri=uri).search_model_versions(f"name = 'ablation-{arm}'"),
                  key=lambda v: int(v.version)).version
    model = f"models:/ablation-{arm}/{version}"
    common = ["--json", "--model", model, "--train", str(train), "--test", str(test),
              "--resolution", "32", "--center-crop-ratio", "1.0", "--num-workers", "1", "--seed", str(seed)]
    start = time.perf_counter()
    store = [f"mlflow.tracking_uri={uri}", "mlflow.experiment=ablation-eval"]
    knn = last_json(cli("knn", *common, "--batch-size", "512", *store, log=log))
    linear = last_json(cli("linear-eval", *common, "--epochs", str(args.linear_epochs), "--batch-size", "256",
                           *store, log=log))
    eval_s = time.perf_counter() - start
    curve = knn_curve(work / "runs" / name, train, test, args.curve_every)
    return {"arm": arm, "seed": seed, "model": model, "knn_top1": knn["knn_top1"],
            "linear_top1": linear["linear_top1"], "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "arm_s": round(time.perf_counter() - arm_start, 1), "knn_curve": curve}


def summarise(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        out[arm] = {key: (statistics.mean(r[key] for r in mine), min(r[key] for r in mine), max(r[key] for r in mine))
                    for key in ("knn_top1", "linear_top1", "train_s")}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {"random": "grey", "fixed_target": "tab:orange", "byol": "tab:blue", "no_predictor": "tab:red"}
    for r in rows:
        if r["knn_curve"]:
            xs, ys = zip(*r["knn_curve"])
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, color=colours[r["arm"]],
                    label=r["arm"] if r["seed"] == rows[0]["seed"] else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 on CIFAR-10 test (%)")
    ax.set_title(f"BYOL ablation ({PRESET} preset), CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root holding train/ and test/")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a new temp folder)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-fraction", type=float, default=0.2, help="class-balanced share of train/ used")
    p.add_argument("--linear-epochs", type=int, default=30)
    p.add_argument("--curve-every", type=int, default=1, help="kNN of every N-th epoch checkpoint for the plot")
    p.add_argument("--override", nargs="*", default=[], help="extra training config overrides (key=value)")
    harness.add_arguments(p)
    args = p.parse_args(argv)
    bench = harness.Bench("ablation.py", argv, args, timed=False)  # accuracy figures: the load is noted only
    start = time.perf_counter()
    work, log, train, test = workspace(args, "byol-ablation-")
    rows = []
    settings = {"preset": PRESET, "epochs": args.epochs, "train_fraction": args.train_fraction,
                "linear_epochs": args.linear_epochs, "curve_every": args.curve_every, "override": args.override}
    for seed in args.seeds:
        for arm in args.arms:
            # Each finished arm is kept in <work>/rows/: a re-run with the same settings (an interrupted
            # ablation, or more seeds added later) reuses it instead of training it again.
            saved = work / "rows" / f"{arm}-s{seed}.json"
            earlier = json.loads(saved.read_text()) if saved.exists() else {}
            if earlier.get("settings") == settings:
                rows.append(earlier["row"])
                reused = " (reused from an earlier run of this script)"
            else:
                rows.append(run_arm(arm, seed, args, train, test, work, log))
                saved.parent.mkdir(exist_ok=True)
                saved.write_text(json.dumps({"settings": settings, "row": rows[-1]}, indent=2))
                reused = ""
            r = rows[-1]
            print(f"[ablation] {arm:13s} seed {seed}: kNN {100 * r['knn_top1']:.1f}%  linear "
                  f"{100 * r['linear_top1']:.1f}%  (train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s){reused}",
                  flush=True)
    result = {"benchmark": "byol_ablation", "epochs": args.epochs, "train_fraction": args.train_fraction,
              "linear_epochs": args.linear_epochs, "seeds": args.seeds, "preset": PRESET,
              "overrides": [*TRAIN, *args.override],
              "cpu_count": os.cpu_count(), "wall_s": round(time.perf_counter() - start, 1),
              "arms_s": round(sum(r["arm_s"] for r in rows), 1), "rows": rows, "summary": summarise(rows)}
    bench.finish(result)
    (work / "ablation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))
    print(f"[ablation] details: {work / 'ablation.json'}; commands and their output: {log}")
    if args.write:
        bench.write_section(**section(result, args))
        plot(rows, bench.markdown.parent / "ablation_knn.png")
    return result


def section(result: dict, args) -> dict:
    """The docs section of a run (harness.Bench.write_section's arguments)."""
    from byol_ray.config import load_config

    s = result["summary"]
    cfg = load_config([PRESET], args.override)

    def pct(v):
        return f"{100 * v[0]:.1f} ({100 * v[1]:.1f}–{100 * v[2]:.1f})"

    table = harness.markdown_table(["arm", "kNN top-1 %", "linear top-1 %", "train time per seed (s)"],
                                   [[arm, pct(v["knn_top1"]), pct(v["linear_top1"]), f"{v['train_s'][0]:.0f}"]
                                    for arm, v in s.items()])
    body = (f"Preset `{PRESET}`: `{cfg.model.encoder}` encoder, LARS base_lr {cfg.optim.base_lr:g}, tau_base "
            f"{cfg.train.tau_base:g}, 32 px, batch {cfg.train.batch_size}, {args.epochs} epochs on a class-balanced "
            f"{args.train_fraction:g} share of CIFAR-10 train ({int(50000 * args.train_fraction)} images); evaluation "
            "on the 10,000-image test split through `byol-ray knn` (k=200, T=0.1, bank = the training share) and "
            f"`byol-ray linear-eval` ({args.linear_epochs} epochs, frozen features); seeds "
            f"{', '.join(map(str, args.seeds))}; {result['arms_s'] / 60:.1f} min for all arms (train, evaluation and "
            "kNN curve, summed over arms, whether run by this invocation or reused from an earlier one). Mean "
            f"(min–max) over seeds:\n\n{table}\n\nkNN top-1 after every epoch: `docs/ablation_knn.png`.")
    ranked = sorted(s, key=lambda arm: -s[arm]["linear_top1"][0])
    return dict(section_id="ablation-section-3", body=body,
                title=f"Does it learn? The paper's Section 3 ablation on CIFAR-10, CPU ({time.strftime('%Y-%m-%d')})",
                question="Does BYOL learn, in the paper's order?",
                summary="linear top-1 " + " > ".join(f"{arm} {100 * s[arm]['linear_top1'][0]:.1f} %" for arm in ranked)
                        + f" ({args.epochs} epochs, mean of {len(args.seeds)} seeds)")


if __name__ == "__main__":
    main()
