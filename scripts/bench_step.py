"""Benchmark: our BYOL training step against byol-pytorch's on the same encoder, batch and input (CPU).

Usage:  .venv/bin/python scripts/bench_step.py [--encoder tiny|resnet18] [--batch 64] [--steps 10]
Needs the bench extra (`make bench` installs it). Prints JSON; with --write appends to docs/benchmarks.md.

Two comparisons, each timed in alternating rounds in this one process so machine load hits both:
  model  - the step without augmentation (both get the same pre-made float views);
  full   - each project's own step including its own augmentation of uint8/float images.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from byol_ray import engine as engine_module
from byol_ray.config import derive, load_config
from byol_ray.engine import BYOLEngine
from byol_ray.lars import LARS, param_groups


def ours(cfg, batch: int, augment: bool):
    derived = derive(cfg, num_samples=batch * 1000, world_size=1)
    eng = BYOLEngine(cfg, derived, torch.device("cpu"))
    labels = torch.zeros(batch, dtype=torch.long)

    def step(u8, f1, f2):
        if augment:
            eng.train_step(u8, u8, labels)
        else:  # same step with the augmentation replaced by the pre-made views
            original = engine_module.augment_view
            views = iter((f1, f2))
            engine_module.augment_view = lambda *_a, **_k: next(views)
            try:
                eng.train_step(u8, u8, labels)
            finally:
                engine_module.augment_view = original
    return step


def theirs(cfg, batch: int, resolution: int, augment: bool):
    from byol_pytorch import BYOL

    from byol_ray.encoders import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(cfg.model.encoder, cifar_stem=cfg.model.cifar_stem)
    hidden_layer = "pool" if cfg.model.encoder == "tiny" else "avgpool"
    kwargs = {} if augment else {"augment_fn": nn.Identity(), "augment_fn2": nn.Identity()}
    learner = BYOL(encoder, image_size=resolution, hidden_layer=hidden_layer,
                   projection_size=cfg.model.projector_dim, projection_hidden_size=cfg.model.projector_hidden_dim,
                   moving_average_decay=cfg.train.tau_base, **kwargs)
    opt = LARS(param_groups([learner], cfg.optim.weight_decay), lr=0.1, eta=cfg.optim.eta)

    def step(u8, f1, f2):
        # byol-pytorch takes one float batch and makes both views itself; without augmentation
        # both views are the same tensor, so pass view 1 (the cost is the same).
        loss = learner(u8.float() / 255 if augment else f1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        learner.update_moving_average()
    return step


def timed(steps: dict, inputs, rounds: int, per_round: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn(*inputs)
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                fn(*inputs)
            times[name].append((time.perf_counter() - start) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="tiny", choices=["tiny", "resnet18"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--write", action="store_true", help="append the figures to docs/benchmarks.md")
    args = p.parse_args()

    cfg = load_config(["demo"], [f"model.encoder={args.encoder}", "model.online_classifier=false",
                                 "model.projector_hidden_dim=4096", "model.predictor_hidden_dim=4096"])
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8, generator=g)
    f1 = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g)
    f2 = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g)
    results = {}
    for mode, augment in (("model", False), ("full", True)):
        t = timed({"byol_ray": ours(cfg, args.batch, augment),
                   "byol_pytorch": theirs(cfg, args.batch, args.resolution, augment)},
                  (u8, f1, f2), args.rounds, args.steps)
        results[mode] = {
            "byol_ray_s_per_step": round(t["byol_ray"], 4), "byol_pytorch_s_per_step": round(t["byol_pytorch"], 4),
            "byol_ray_images_per_s": round(args.batch / t["byol_ray"], 1),
            "speedup_vs_byol_pytorch": round(t["byol_pytorch"] / t["byol_ray"], 3),
        }
    out = {"benchmark": "train_step", "encoder": args.encoder, "batch": args.batch, "resolution": args.resolution,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "results": results}
    print(json.dumps(out, indent=2))
    if args.write:
        cmd = (f".venv/bin/python scripts/bench_step.py --encoder {args.encoder} --batch {args.batch} "
               f"--resolution {args.resolution} --rounds {args.rounds} --steps {args.steps} --write")
        lines = [f"\n## Training step vs byol-pytorch ({args.encoder}, batch {args.batch}, {args.resolution} px, CPU)\n",
                 f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads; median of {args.rounds} alternating rounds of {args.steps} steps)\n",
                 "| step | byol-ray s/step | byol-pytorch s/step | speed-up |", "|---|---|---|---|"]
        for mode, r in results.items():
            lines.append(f"| {mode} | {r['byol_ray_s_per_step']} | {r['byol_pytorch_s_per_step']} | "
                         f"{r['speedup_vs_byol_pytorch']}x |")
        with open(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
