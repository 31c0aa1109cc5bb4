"""Benchmark: batched byol_ray.augment vs per-image torchvision/PIL loops of the same recipe; prints JSON."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import v2

from byol_ray.augment import VIEW1, VIEW2, ViewAugment, augment_view


def torchvision_view(view: ViewAugment, side: int) -> v2.Compose:
    """The recipe as a per-image torchvision v2 pipeline on uint8 tensors (torchvision semantics:
    multiplicative brightness, luma-blend saturation, reflect-padded blur)."""
    kernel = view.blur_kernel_size(side)
    return v2.Compose(
        [
            v2.RandomApply(
                [v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                p=view.color_jitter_prob,
            ),
            v2.RandomGrayscale(p=view.grayscale_prob),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=view.blur_sigma)], p=view.blur_prob),
            v2.RandomSolarize(threshold=round(255 * view.solarize_threshold), p=view.solarize_prob),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(view.mean, view.std),
        ]
    )


class PilBlur:
    """PIL Gaussian blur with a random radius, as most public BYOL/MoCo PyTorch ports do it."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def pil_view(view: ViewAugment) -> v2.Compose:
    """The recipe as a per-image PIL pipeline (the classic DataLoader-worker approach)."""
    threshold = round(255 * view.solarize_threshold)
    return v2.Compose(
        [
            v2.RandomApply(
                [v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                p=view.color_jitter_prob,
            ),
            v2.RandomGrayscale(p=view.grayscale_prob),
            v2.RandomApply([PilBlur(view.blur_sigma)], p=view.blur_prob),
            v2.RandomApply([lambda im: ImageOps.solarize(im, threshold)], p=view.solarize_prob),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(view.mean, view.std),
        ]
    )


def measure(side: int, batch: int, trials: int, seed: int) -> dict:
    """Images (augmented views) per second of each method; trials interleave the methods so
    that background load hits them alike, and the median trial is reported."""
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
    pil_images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    generator = torch.Generator().manual_seed(seed)
    tv = {"view1": torchvision_view(VIEW1, side), "view2": torchvision_view(VIEW2, side)}
    pil = {"view1": pil_view(VIEW1), "view2": pil_view(VIEW2)}

    def batched():
        for view in (VIEW1, VIEW2):
            augment_view(images, view, generator)

    def torchvision_loop():
        for name in ("view1", "view2"):
            torch.stack([tv[name](im) for im in images])

    def pil_loop():
        for name in ("view1", "view2"):
            torch.stack([pil[name](im) for im in pil_images])

    methods = {"batched": batched, "torchvision_per_image": torchvision_loop, "pil_per_image": pil_loop}
    times = {name: [] for name in methods}
    for name, fn in methods.items():
        fn()  # warm-up
    for _ in range(trials):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {"side": side, "batch": batch, "trials": trials}
    for name, ts in times.items():
        result[f"{name}_images_per_s"] = round(2 * batch / statistics.median(ts), 1)
    for name in ("torchvision_per_image", "pil_per_image"):
        result[f"speedup_vs_{name}"] = round(
            result["batched_images_per_s"] / result[f"{name}_images_per_s"], 2
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # One thread by default: per-core throughput, as a per-image loop scales by adding workers.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    runs = [measure(32, 256, args.trials, args.seed), measure(224, 32, args.trials, args.seed)]
    report = {
        "unit": "augmented views per second (each batch is augmented as view1 and as view2)",
        "device": "cpu",
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "results": runs,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
