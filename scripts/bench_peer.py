"""Benchmark: byol-ray against byol-pytorch (an independent BYOL implementation) on the same task.

Both train the same tiny encoder (byol_ray.encoders.TinyEncoder, same initial weights) for the same
number of steps at the same batch size on the same class-balanced CIFAR-10 subset, held in memory as
uint8 for both (no decoding cost on either side), on the CPU; both encoders are then scored with the
same kNN code (byol_ray.evaluation.knn, k=200, T=0.1; bank = the training subset, queries = the
CIFAR-10 test split). Each side uses its own recipe: byol-ray its cifar10_cpu preset (LARS at base lr
0.2, warmup + cosine, cosine tau, per-image crops, flips and colour draws; no blur, crop scale >= 0.2);
byol-pytorch its README usage (Adam 3e-4, tau 0.99, its default augmentations, which draw one crop,
flip and jitter per batch, not per image), with its simplicial embeddings turned off (plain BYOL).

Usage:
  .venv/bin/python scripts/bench_peer.py --data /tmp/cifar10 --steps 300 --seeds 0 1 --write
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET = "cifar10_cpu"  # our CPU recipe for CIFAR-10 (see the preset's header)
OURS = ["model.online_classifier=false", "mlflow.enabled=false", "train.log_every_steps=100000",
        "train.checkpoint_every_epochs=100000"]


def subset(data: Path, split: str, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced, seeded share of an ImageFolder split, decoded once: uint8 [N, 3, H, W], int64 [N]."""
    from byol_ray.data.memory import load_to_device
    from byol_ray.data.prepare import stratified_sample
    from byol_ray.data.sources import open_source
    from byol_ray.evaluation.data import SubsetSource

    source = open_source(str(data / split))
    if fraction < 1:
        keep = stratified_sample(source.labels, fraction, np.random.default_rng([seed, 1]), keep_one=False)
        source = SubsetSource(source, np.sort(keep), f"{fraction:g} of {split}")
    return load_to_device(source, torch.device("cpu"))


def train_ours(images, labels, args) -> tuple[torch.nn.Module, float]:
    from byol_ray.config import derive, load_config
    from byol_ray.data.loaders import TwoViewEpochLoader
    from byol_ray.data.memory import MemoryTwoViewBatches
    from byol_ray.engine import fit

    epochs = args.steps // (len(labels) // args.batch)  # main() rounds the step budget to whole epochs
    cfg = load_config([PRESET], [*OURS, f"train.batch_size={args.batch}", f"train.epochs={epochs}",
                                 f"train.seed={args.seed}", "data.train=demo"])
    batches = MemoryTwoViewBatches(images, labels, batch_size=args.batch, resolution=32, scale=cfg.data.crop_scale,
                                   ratio=cfg.data.crop_ratio, flip_prob=cfg.data.flip_prob, seed=args.seed,
                                   shuffle=True, rank=0, world_size=1, drop_last=True, law=cfg.data.crop_law)
    loader = TwoViewEpochLoader(batches, backend="memory", batch_size=args.batch, num_samples=len(labels))
    derived = derive(cfg, len(labels), 1)
    start = time.perf_counter()
    result = fit(cfg, derived, loader, torch.device("cpu"))
    assert result.steps == args.steps
    return result.engine.online.encoder, time.perf_counter() - start


def train_theirs(images, labels, args, init: dict) -> tuple[torch.nn.Module, float]:
    from byol_pytorch import BYOL

    from byol_ray.encoders import build_encoder

    torch.manual_seed(args.seed)
    encoder = build_encoder("tiny", cifar_stem=True)
    encoder.load_state_dict(init)
    # plain BYOL: byol-pytorch 0.9.1 adds simplicial embeddings by default
    learner = BYOL(encoder, image_size=32, hidden_layer="pool", projection_size=256, projection_hidden_size=1024,
                   moving_average_decay=0.99, use_simplicial_embeddings=False)
    opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(args.seed)
    start, step = time.perf_counter(), 0
    while step < args.steps:
        order = torch.randperm(len(labels), generator=g)
        for b in range(len(labels) // args.batch):
            if step == args.steps:
                break
            x = images[order[b * args.batch:(b + 1) * args.batch]].float().div_(255)
            loss = learner(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            learner.update_moving_average()
            step += 1
    return encoder, time.perf_counter() - start


def ours_encoder_init(args) -> torch.nn.Module:
    from byol_ray.config import derive, load_config
    from byol_ray.engine import BYOLEngine

    cfg = load_config([PRESET], [*OURS, f"train.seed={args.seed}"])
    return BYOLEngine(cfg, derive(cfg, 50_000, 1), torch.device("cpu")).online.encoder


@torch.no_grad()
def knn(encoder, train, test) -> float:
    from byol_ray.evaluation.features import to_model_input
    from byol_ray.evaluation.knn import knn_top1

    encoder.eval()

    def feats(images):
        return torch.cat([encoder(to_model_input(images[i:i + 512])) for i in range(0, len(images), 512)])

    return knn_top1(feats(train[0]), train[1], feats(test[0]), test[1])


def one_seed(args, seed: int, train, test) -> dict:
    """One paired round: both implementations from the same initial weights of ``seed``, and the random-init
    baseline."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    init = {k: v.clone() for k, v in ours_encoder_init(args).state_dict().items()}  # same start on both sides
    ours, ours_s = train_ours(*train, args)
    theirs, theirs_s = train_theirs(*train, args, init)
    from byol_ray.encoders import build_encoder

    random_encoder = build_encoder("tiny", cifar_stem=True)
    random_encoder.load_state_dict(init)
    row = {"seed": seed, "byol_ray": {"train_s": round(ours_s, 1), "knn_top1": knn(ours, train, test)},
           "byol_pytorch": {"train_s": round(theirs_s, 1), "knn_top1": knn(theirs, train, test)},
           "random_init_knn_top1": knn(random_encoder, train, test),
           "speedup_vs_byol_pytorch": round(theirs_s / ours_s, 3)}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root holding train/ and test/")
    p.add_argument("--train-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one paired comparison per seed")
    p.add_argument("--threads", type=int, default=2)
    harness.add_arguments(p)
    args = p.parse_args(argv)
    bench = harness.Bench("bench_peer.py", argv, args)
    torch.set_num_threads(args.threads)
    train = subset(args.data, "train", args.train_fraction)
    test = subset(args.data, "test", args.test_fraction)
    steps_per_epoch = len(train[1]) // args.batch
    args.steps = max(1, round(args.steps / steps_per_epoch)) * steps_per_epoch  # whole epochs, for both
    rows = [one_seed(args, seed, train, test) for seed in args.seeds]  # one paired round per seed
    bench.end()

    def mean(side: str, key: str) -> float:
        return statistics.mean(r[side][key] for r in rows)

    out = {
        "benchmark": "peer_byol_pytorch", "steps": args.steps, "batch": args.batch, "threads": args.threads,
        "train_images": len(train[1]), "test_images": len(test[1]), "seeds": args.seeds, "rows": rows,
        "byol_ray": {"train_s": round(mean("byol_ray", "train_s"), 1), "knn_top1": mean("byol_ray", "knn_top1")},
        "byol_pytorch": {"train_s": round(mean("byol_pytorch", "train_s"), 1),
                         "knn_top1": mean("byol_pytorch", "knn_top1")},
        "random_init_knn_top1": statistics.mean(r["random_init_knn_top1"] for r in rows),
    }
    # the ratio of the mean times, and the rule's figure: the median of the per-seed paired ratios
    out["speedup_vs_byol_pytorch"] = round(out["byol_pytorch"]["train_s"] / out["byol_ray"]["train_s"], 3)
    out["paired_speedup"] = harness.ratio_summary(r["speedup_vs_byol_pytorch"] for r in rows)
    bench.finish(out)
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    bench.write_section(**section(out, args))
    return out


def section(out: dict, args) -> dict:
    """The docs section of a run (harness.Bench.write_section's arguments)."""
    rows = [*out["rows"], {"seed": "mean", **{k: out[k] for k in ("byol_ray", "byol_pytorch", "random_init_knn_top1",
                                                                    "speedup_vs_byol_pytorch")}}]
    table = harness.markdown_table(
        ["seed", "byol-ray train s", "byol-pytorch train s", "time ratio (theirs / ours)", "byol-ray kNN %",
         "byol-pytorch kNN %", "random init kNN %"],
        [[r["seed"], r["byol_ray"]["train_s"], r["byol_pytorch"]["train_s"], r["speedup_vs_byol_pytorch"],
          f"{100 * r['byol_ray']['knn_top1']:.1f}", f"{100 * r['byol_pytorch']['knn_top1']:.1f}",
          f"{100 * r['random_init_knn_top1']:.1f}"] for r in rows])
    paired = out["paired_speedup"]
    body = (f"Tiny encoder (same initial weights per seed), {args.steps} steps of batch {args.batch} on "
            f"{out['train_images']} CIFAR-10 training images held in memory, {args.threads} threads; kNN (k=200, "
            f"T=0.1) on {out['test_images']} test images with the same code for both. byol-ray runs its `{PRESET}` "
            "preset, byol-pytorch its README recipe (Adam 3e-4). One paired round per seed (byol-ray, then "
            f"byol-pytorch).\n\n{table}\n\nMedian of the per-seed paired time ratios (theirs / ours): "
            f"**{paired['median_ratio']}** (range {paired['ratio_range'][0]}–{paired['ratio_range'][1]}).")
    return dict(section_id="peer-byol-pytorch", body=body,
                title=f"Against byol-pytorch on the same task (CPU, {time.strftime('%Y-%m-%d')})",
                question="Faster than an independent implementation?",
                summary=f"{paired['median_ratio']}× faster (median of {len(out['rows'])} per-seed paired ratios, range "
                        f"{paired['ratio_range'][0]}–{paired['ratio_range'][1]}); kNN "
                        f"{100 * out['byol_ray']['knn_top1']:.1f} % vs {100 * out['byol_pytorch']['knn_top1']:.1f} %")


if __name__ == "__main__":
    sys.exit(main() and 0)
