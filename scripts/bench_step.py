"""Benchmark: our BYOL training step against byol-pytorch's on the same encoder, batch and input (CPU).

Usage:  .venv/bin/python scripts/bench_step.py [--encoder tiny|resnet18] [--batch 64] [--steps 10]
Needs the bench extra (`make bench` installs it). Prints JSON; --write replaces its section of docs/benchmarks.md.

Two comparisons, each timed in alternating rounds in this one process so machine load hits both:
  model  - the step without augmentation (both get the same pre-made float views);
  full   - each project's own step including its own augmentation of uint8/float images.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from byol_ray import engine as engine_module  # noqa: E402
from byol_ray.config import derive, load_config  # noqa: E402
from byol_ray.engine import BYOLEngine  # noqa: E402
from byol_ray.lars import LARS, param_groups  # noqa: E402


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


def timed(steps: dict, inputs, rounds: int, per_round: int) -> harness.Rounds:
    """Seconds per step of each implementation, in interleaved rounds of ``per_round`` steps after a warm-up step."""
    def arm(fn):
        def run(r):
            count = per_round if r >= 1 else 1
            start = time.perf_counter()
            for _ in range(count):
                fn(*inputs)
            return (time.perf_counter() - start) / count
        return run

    return harness.interleaved({name: arm(fn) for name, fn in steps.items()}, rounds, warmup=1, log=None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="tiny", choices=["tiny", "resnet18"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    harness.add_arguments(p)
    args = p.parse_args(argv)
    bench = harness.Bench("bench_step.py", argv, args)

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
        paired = t.paired("byol_pytorch", "byol_ray")
        results[mode] = {
            "byol_ray_s_per_step": round(t.median("byol_ray"), 4),
            "byol_pytorch_s_per_step": round(t.median("byol_pytorch"), 4),
            "byol_ray_images_per_s": round(args.batch / t.median("byol_ray"), 1),
            "speedup_vs_byol_pytorch": paired["median_ratio"],  # the median of the per-round paired ratios
            "speedup_range": paired["ratio_range"],
        }
    bench.end()
    out = {"benchmark": "train_step", "encoder": args.encoder, "batch": args.batch, "resolution": args.resolution,
           "threads": torch.get_num_threads(), "rounds": args.rounds, "steps_per_round": args.steps,
           "results": results}
    bench.finish(out)
    print(json.dumps(out, indent=2))
    rows = [[mode, r["byol_ray_s_per_step"], r["byol_pytorch_s_per_step"],
             f"{r['speedup_vs_byol_pytorch']}x ({r['speedup_range'][0]}–{r['speedup_range'][1]})"]
            for mode, r in results.items()]
    shape = f"{args.encoder}, batch {args.batch}, {args.resolution} px"
    bench.write_section(
        f"train-step-{args.encoder}-b{args.batch}-{args.resolution}px", f"Training step vs byol-pytorch ({shape}, CPU)",
        f"{torch.get_num_threads()} threads; {args.rounds} interleaved rounds of {args.steps} steps; s/step the median "
        "of the rounds, the speed-up the median of the paired per-round ratios (range in brackets). **model**: both "
        "get the same pre-made float views (forward + backward + LARS + EMA); **full**: each project's own step "
        "including its own augmentation.\n\n"
        + harness.markdown_table(["step", "byol-ray s/step", "byol-pytorch s/step", "speed-up"], rows),
        question=f"Is the training step faster than byol-pytorch's ({shape})?",
        summary=f"{results['model']['speedup_vs_byol_pytorch']}× without augmentation, "
                f"{results['full']['speedup_vs_byol_pytorch']}× with each one's own (median of {args.rounds} paired "
                "rounds)")
    return out


if __name__ == "__main__":
    main()
