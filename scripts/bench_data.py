"""Benchmark: FFCV two-view loader + batched augmentation vs a torchvision DataLoader with per-image PIL transforms; prints JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from byol_ray.augment import VIEW1, VIEW2, ViewAugment, augment_view
from byol_ray.data.loaders import build_train_loader
from byol_ray.data.prepare import prepare, validate_beton
from byol_ray.data.sources import ImageFolderSource, Source


def cpu_seconds() -> float:
    """CPU time used so far by this process (all threads) and its live children (DataLoader workers)."""
    import psutil  # comes with ray

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(loader, consume, batch_size: int, seconds: float, warmup_batches: int = 2) -> dict:
    """Throughput of `consume(batch)` over `loader` for `seconds`, after warm-up batches.

    The warm-up covers FFCV's pipeline compilation and DataLoader worker start-up; both are
    reported separately. Epochs restart as needed. Pairs per CPU-second (this process and its
    worker processes) barely moves when other jobs share the cores; pairs/s does.
    """
    started = time.perf_counter()
    batches = iter(loader)
    for _ in range(warmup_batches):
        consume(next(batches))
    warmup_s = time.perf_counter() - started
    count, start, cpu_start = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - start < seconds:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        consume(batch)
        count += 1
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return {"batches_per_s": round(count / elapsed, 2), "pairs_per_s": round(count * batch_size / elapsed, 1),
            "pairs_per_cpu_s": round(count * batch_size / cpu, 1), "batches": count, "seconds": round(elapsed, 1),
            "cpu_s": round(cpu, 1), "warmup_s": round(warmup_s, 1)}


def best_of(rounds: list[dict]) -> dict:
    """The least disturbed round (other jobs only ever slow one down), with every round's figures."""
    best = max(rounds, key=lambda r: r["pairs_per_s"])
    return {**best, "warmup_s": rounds[0]["warmup_s"], "rounds_pairs_per_s": [r["pairs_per_s"] for r in rounds],
            "rounds_pairs_per_cpu_s": [r["pairs_per_cpu_s"] for r in rounds]}


def torchvision_view(view: ViewAugment, resolution: int):
    """The BYOL recipe as the classic per-image PIL pipeline of public PyTorch ports
    (torchvision semantics: multiplicative brightness)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(resolution, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                      p=view.color_jitter_prob),
        T.RandomGrayscale(p=view.grayscale_prob),
        T.RandomApply([T.GaussianBlur(view.blur_kernel_size(resolution), sigma=view.blur_sigma)], p=view.blur_prob),
        T.RandomSolarize(threshold=round(255 * view.solarize_threshold), p=view.solarize_prob),
        T.ToTensor(),
        T.Normalize(view.mean, view.std),
    ])


class TwoViews:
    def __init__(self, view1, view2) -> None:
        self.view1, self.view2 = view1, view2

    def __call__(self, image):
        return self.view1(image), self.view2(image)


class Upscaled(Source):
    """A seeded subset of an image folder, upscaled (bicubic) to an ImageNet-like size."""

    name = "upscaled"

    def __init__(self, base: ImageFolderSource, count: int, side: int) -> None:
        self.picked = np.random.default_rng(0).permutation(len(base))[:count]
        super().__init__(base.labels[self.picked], base.class_names)
        self.base, self.side = base, side

    def load(self, index: int) -> np.ndarray:
        from PIL import Image

        image = Image.fromarray(self.base.load(int(self.picked[index])))
        return np.asarray(image.resize((self.side, self.side), Image.BICUBIC))

    def fingerprint(self) -> dict:
        return {**self.base.fingerprint(), "kind": self.name, "num_samples": len(self), "side": self.side}


def prepared(source, path: Path, workers: int, **options) -> tuple[Path, float]:
    """The .beton at `path`, written unless a valid one is there; returns (path, seconds spent)."""
    start = time.perf_counter()
    try:
        validate_beton(path)
    except (FileNotFoundError, ValueError):
        prepare(source, path, num_workers=workers, overwrite=True, progress=False, **options)
    return path, round(time.perf_counter() - start, 1)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def to_markdown(result: dict, command: str) -> str:
    m, a, a0, b, c = (result[k] for k in ("machine", "ffcv_augment", "ffcv_crop_flip", "torchvision", "large"))

    def row(name, r):
        return f"| {name} | {r['batches_per_s']} | {r['pairs_per_s']} | {r['pairs_per_cpu_s']} |"

    return "\n".join([
        f"\n## Data loading, two views per image ({time.strftime('%Y-%m-%d')})\n",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}; load average "
        f"{m['load_average_at_start']} at start, {m['load_average_at_end']} at end (above {m['cores']}, other jobs "
        "shared the cores: pairs/s then understates, pairs per CPU-second much less so).",
        f"Command: `{command}`\n",
        f"CIFAR-10 train ({result['cifar_images']} real 32-px JPEGs), batch {result['batch_size']}, "
        f"{result['workers']} loader workers, full BYOL augmentation on CPU (best of "
        f"{len(a['rounds_pairs_per_s'])} rounds of ~{a['seconds']} s):\n",
        "| pipeline | batches/s | pairs/s | pairs per CPU-second |",
        "| --- | ---: | ---: | ---: |",
        row("FFCV two-view loader + `byol_ray.augment` (batched, CPU)", a),
        row("torchvision DataLoader, per-image PIL transforms", b),
        f"| ratio | | **{result['ratio']}x** | **{result['ratio_per_cpu_s']}x** |",
        row("(FFCV loader alone: crop + flip)", a0) + "\n",
        f"All rounds, pairs/s: FFCV + augment {a['rounds_pairs_per_s']}, torchvision {b['rounds_pairs_per_s']}, "
        f"FFCV alone {a0['rounds_pairs_per_s']}.\n",
        f"ImageNet-like: {c['images']} CIFAR-10 images upscaled (bicubic) to {c['stored_side']} px and stored as "
        f"JPEG (quality 90), {c['resolution']}-px crops, crop + flip + transfer only (device {c['device']}): "
        f"{c['pairs_per_s']} pairs/s on {result['workers']} cores = {c['pairs_per_s_per_core']} pairs/s per core; "
        f"**{c['pairs_per_cpu_s']} pairs per CPU-second**.",
        "Warm-up (FFCV compiles each loader's pipeline with numba on first use): "
        f"{a0['warmup_s']} s (CIFAR), {c['warmup_s']} s (large).\n",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("train_dir", help="the unpacked CIFAR-10 train split (ImageFolder: train/<class>/*.jpg)")
    parser.add_argument("--work-dir", default="/tmp/byol-bench-data", help="where the .beton files go")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per measurement round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per measurement; the best is reported")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--large-images", type=int, default=3000)
    parser.add_argument("--large-side", type=int, default=320)
    parser.add_argument("--large-resolution", type=int, default=224)
    parser.add_argument("--large-batch-size", type=int, default=64)
    parser.add_argument("--markdown", default="docs/benchmarks.md", help="append a section here ('' to skip)")
    args = parser.parse_args()
    command = shlex.join(["python", "scripts/bench_data.py", *sys.argv[1:]])
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    workers, batch = args.workers, args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(workers)
    result = {"machine": machine(), "workers": workers, "batch_size": batch}

    # Every process is forked (writers, DataLoader workers) before FFCV starts numba's thread pool,
    # which warns (on stdout) at each later fork.
    source = ImageFolderSource(args.train_dir)
    result["cifar_images"] = len(source)
    beton, result["prepare_cifar_s"] = prepared(source, work / "cifar10-train.beton", workers)
    large, large_prepare_s = prepared(Upscaled(source, args.large_images, args.large_side),
                                      work / f"cifar10-upscaled{args.large_side}.beton", workers,
                                      compress_probability=1.0, jpeg_quality=90)

    from torchvision.datasets import ImageFolder

    views = TwoViews(torchvision_view(VIEW1, 32), torchvision_view(VIEW2, 32))
    dataloader = torch.utils.data.DataLoader(ImageFolder(args.train_dir, transform=views), batch_size=batch,
                                             shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True)
    result["torchvision"] = best_of([measure(dataloader, lambda b: None, batch, args.seconds)
                                     for _ in range(args.rounds)])
    del dataloader  # stops its worker processes before the next measurement

    loader = build_train_loader(beton, batch_size=batch, resolution=32, num_workers=workers, seed=0)
    generator = torch.Generator().manual_seed(0)

    def augment(b):
        augment_view(b[0], VIEW1, generator), augment_view(b[1], VIEW2, generator)

    for name, consume in (("ffcv_crop_flip", lambda b: None), ("ffcv_augment", augment)):
        result[name] = best_of([measure(loader, consume, batch, args.seconds) for _ in range(args.rounds)])
    a, b = result["ffcv_augment"], result["torchvision"]
    result["ratio"] = round(a["pairs_per_s"] / b["pairs_per_s"], 2)
    result["ratio_per_cpu_s"] = round(a["pairs_per_cpu_s"] / b["pairs_per_cpu_s"], 2)

    loader = build_train_loader(large, batch_size=args.large_batch_size, resolution=args.large_resolution,
                                num_workers=workers, device=device)
    large_result = best_of([measure(loader, lambda b: None, args.large_batch_size, args.seconds)
                            for _ in range(args.rounds)])
    result["large"] = {**large_result, "images": args.large_images, "stored_side": args.large_side,
                       "stored_as": "JPEG quality 90 (upscaled CIFAR-10, bicubic)", "resolution": args.large_resolution,
                       "device": str(device), "prepare_s": large_prepare_s,
                       "pairs_per_s_per_core": round(large_result["pairs_per_s"] / workers, 1)}
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["command"] = command
    print(json.dumps(result, indent=1))
    if args.markdown:
        new = not Path(args.markdown).exists()
        with open(args.markdown, "a") as f:
            f.write(("# Benchmarks\n" if new else "") + to_markdown(result, command))


if __name__ == "__main__":
    main()
