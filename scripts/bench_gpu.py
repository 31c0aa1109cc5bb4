"""Benchmark: BYOL training-step throughput on one device; prints JSON.

The pure-PyTorch core only (no Ray, MLflow or FFCV), so it runs on any CUDA machine with torch and
torchvision. Default: ResNet-50 at 224 px, bf16 autocast, channels_last, per-GPU batch 256, data
resident on the GPU (uint8 images cropped and flipped there by the ``data.loader=memory`` code).

Reports images/s (an image = its two views), the step-time breakdown (augment, forward, backward,
optimizer, EMA: the engine's ``torch.profiler.record_function`` ranges ``byol.<phase>``, read from a
profile of a separate pass, CPU time on a CPU, device time on CUDA), peak memory and model FLOPs
utilisation (FLOPs counted by ``torch.utils.flop_counter`` over one real step, against the device's
dense bf16 peak).

Usage:
  python scripts/bench_gpu.py                                   # ResNet-50, 224 px, bf16, GPU-resident data
  python scripts/bench_gpu.py --compile                         # torch.compile the online and target networks
  python scripts/bench_gpu.py --tiny                            # CPU-sized smoke run (what the tests run)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from byol_ray.config import derive, load_config  # noqa: E402
from byol_ray.data.memory import MemoryTwoViewBatches  # noqa: E402
from byol_ray.engine import BYOLEngine  # noqa: E402

# Dense peak FLOP/s by device name (bf16/fp16 tensor cores, no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    words = name.replace("-", " ").split()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"; whole words, so
        if all(k in words for k in key.split()):          # "L4" never matches an L40S
            return PEAK_TFLOPS[key] * 1e12
    return None


PHASES = ("augment", "forward", "backward", "optimizer", "ema")  # the engine's record_function("byol.<phase>")


def phase_times(engine: BYOLEngine, stream, steps: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per step of each ``byol.<phase>`` range over ``steps`` steps under torch.profiler: the ranges'
    CPU time on a CPU; on CUDA their device time (the kernels launched inside each range)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.train_step(*next(stream))
        sync(device)
    ms: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.removeprefix("byol.")
        if not event.key.startswith("byol.") or name not in PHASES or event.device_type.name != "CPU":
            continue  # on CUDA the same range also appears as a GPU-side annotation: the CPU op carries the kernels
        if device.type == "cuda":
            total = getattr(event, "device_time_total", None)
            total = getattr(event, "cuda_time_total", 0.0) if total is None else total
        else:
            total = event.cpu_time_total
        ms[name] = total / 1e3 / steps
    missing = [p for p in PHASES if p not in ms]
    if missing:
        raise RuntimeError(f"no record_function range byol.{'/'.join(missing)} in the profile: the engine's "
                           "train_step must wrap its phases in torch.profiler.record_function('byol.<phase>')")
    return {p: ms[p] for p in PHASES}


def build(args, device: torch.device):
    overrides = [f"model.encoder={args.encoder}", f"data.resolution={args.resolution}",
                 f"train.batch_size={args.batch}", f"train.precision={args.precision}",
                 f"train.channels_last={str(args.channels_last).lower()}", "train.epochs=100",
                 f"model.cifar_stem={str(args.resolution <= 64).lower()}", "mlflow.enabled=false",
                 f"train.device={device.type}", f"train.compile={str(args.compile).lower()}", *args.override]
    cfg = load_config([args.preset], overrides)
    images = torch.randint(0, 256, (args.dataset_size, 3, args.stored, args.stored), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.randint(0, max(cfg.model.num_classes, 1), (args.dataset_size,),
                           generator=torch.Generator().manual_seed(1)).to(device)
    batches = MemoryTwoViewBatches(images, labels, batch_size=args.batch, resolution=args.resolution,
                                   scale=cfg.data.crop_scale, ratio=cfg.data.crop_ratio, flip_prob=cfg.data.flip_prob,
                                   law=cfg.data.crop_law, seed=0, shuffle=True, rank=0, world_size=1, drop_last=True)
    engine = BYOLEngine(cfg, derive(cfg, args.dataset_size, 1), device)  # train.compile: the engine compiles
    return cfg, engine, batches


def batches_forever(batches: MemoryTwoViewBatches):
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(engine: BYOLEngine, batch) -> int:
    """FLOPs of one training step (forward + backward of online and target), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        engine.train_step(*batch)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="imagenet_resnet50_100ep")
    p.add_argument("--encoder", default="resnet50")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--stored", type=int, default=256, help="side of the GPU-resident images the crops come from")
    p.add_argument("--dataset-size", type=int, default=2048, help="GPU-resident images (synthetic pixels)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the online and target networks")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (cuDNN autotune, compile)")
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, if not in the table")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides (key=value)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke size: tiny encoder, 32 px, batch 16, 3 steps")
    harness.add_arguments(p, write=False)
    args = p.parse_args(argv)
    bench = harness.Bench("bench_gpu.py", argv, args, python="python")
    if args.tiny:
        args.preset, args.encoder, args.resolution, args.stored = "demo", "tiny", 32, 32
        args.batch, args.dataset_size, args.steps, args.warmup, args.precision = 16, 64, 3, 1, "fp32"
        args.override = ["model.projector_hidden_dim=64", "model.predictor_hidden_dim=64", "model.projector_dim=32",
                         *args.override]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.backends.cudnn.benchmark = True
    cfg, engine, batches = build(args, device)
    stream = batches_forever(batches)

    for _ in range(args.warmup):
        engine.train_step(*next(stream))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.train_step(*next(stream))
    sync(device)
    step_s = (time.perf_counter() - start) / args.steps

    # data time: the GPU-resident crops alone, and the breakdown with phase timers (a separate pass)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(stream)
    sync(device)
    data_s = (time.perf_counter() - start) / args.steps
    phases = phase_times(engine, stream, args.steps, device)
    flops = count_flops(engine, next(stream)) if not args.compile else None
    # the table holds bf16/fp16 tensor-core peaks: an fp32 run has no comparable MFU unless --peak-tflops says
    peak = peak_flops(device, args.peak_tflops) if args.precision != "fp32" or args.peak_tflops else None

    images_per_s = args.batch / step_s
    result = {
        "benchmark": "byol_step_gpu" if device.type == "cuda" else "byol_step_cpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "encoder": args.encoder, "resolution": args.resolution, "batch": args.batch, "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile, "steps": args.steps, "warmup": args.warmup,
        "images_per_s": round(images_per_s, 1),
        "step_ms": round(1e3 * step_s, 3),
        "data_ms": round(1e3 * data_s, 3),
        "phase_ms": {k: round(v, 3) for k, v in phases.items()},
        "phase_pct": {k: round(100 * v / sum(phases.values()), 2) for k, v in phases.items()},
        "ema_pct_of_step": round(100 * phases.get("ema", 0.0) / (1e3 * step_s), 3),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "flops_per_step": flops,
        "flops_per_image": round(flops / args.batch) if flops else None,
        "mfu": round(flops / step_s / peak, 4) if flops and peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "command": bench.command,
    }
    bench.finish(result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
