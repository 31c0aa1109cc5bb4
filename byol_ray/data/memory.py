"""The in-device-memory two-view loader (``data.loader=memory``): the whole data set lives on the GPU.

For data sets that fit in device memory (CIFAR-10 is 150 MB as uint8), the images are decoded once
into one uint8 tensor on the device; every batch is then an index, a random-resized crop and a flip
done for the whole batch at once (``grid_sample``), so the GPU never waits for the host. The colour
work is the engine's batched augmentation, as with the other loaders.

Crops follow torchvision's ``RandomResizedCrop.get_params`` (ten tries, then the largest centred crop
within the ratio range), drawn per batch on the device from a generator seeded by (seed, epoch, rank):
a run resumed at an epoch boundary repeats an uninterrupted one (with the same batch size and world
size; unlike the FFCV and torch loaders, the draws are not keyed on the sample index). Resampling is bilinear without antialias,
which matters only when a crop is shrunk by more than about 2x (not for 32-px images at 32 px).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from byol_ray.data.sources import Source

DEFAULT_MAX_FRACTION = 0.5  # share of the device's free memory the data set may take
_STREAM = 0x6D656D  # salt of the crop generator's seed ("mem")


def load_to_device(source: Source, device: torch.device, *, max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of ``source`` once into uint8 [N, 3, H, W] and int64 [N] tensors on ``device``.

    Raises ``ValueError`` naming the fix when the images differ in size or the set would not fit.
    """
    n = len(source)
    first = source.load(0)
    height, width = first.shape[:2]
    need = n * 3 * height * width
    limit = "the limit given"
    if max_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            max_bytes, limit = int(free * DEFAULT_MAX_FRACTION), "half the device's free memory"
        else:
            max_bytes, limit = 16 * 2**30, "the 16 GiB host-memory cap"
    if need > max_bytes:
        raise ValueError(f"data.loader=memory: {n} images of {width}x{height} need {need / 2**30:.2f} GiB, more than "
                         f"{limit} ({max_bytes / 2**30:.2f} GiB on {device}); use data.loader=ffcv for data sets "
                         "this large")
    images = torch.empty((n, 3, height, width), dtype=torch.uint8, pin_memory=device.type == "cuda")
    for i in range(n):
        image = first if i == 0 else source.load(i)
        if image.shape[:2] != (height, width):
            raise ValueError(f"data.loader=memory keeps one tensor, so every image must be {width}x{height}; "
                             f"{source.describe(i)} is {image.shape[1]}x{image.shape[0]}. Resize the images "
                             "first, or use data.loader=ffcv (any sizes)")
        images[i].numpy()[...] = image.transpose(2, 0, 1)  # numpy copy: decoded images may be read-only
    labels = torch.from_numpy(np.asarray(source.labels, dtype=np.int64))
    return images.to(device, non_blocking=True), labels.to(device)


def sample_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                 generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` crop boxes (top, left, h, w) as float [n, 4], torchvision's RandomResizedCrop rule, batched."""
    tries = 10
    area = height * width
    u = torch.rand((4, n, tries), generator=generator, device=device, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    pick = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
    h, w = h.gather(1, pick).squeeze(1), w.gather(1, pick).squeeze(1)
    top = torch.floor(u[2].gather(1, pick).squeeze(1) * (height - h + 1))
    left = torch.floor(u[3].gather(1, pick).squeeze(1) * (width - w + 1))
    # no try fitted: the largest centred crop within the ratio range
    in_ratio = width / height
    fw, fh = float(width), float(height)
    if in_ratio < ratio[0]:
        fh = float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw = float(round(height * ratio[1]))
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], device=device, dtype=torch.float64)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(ok.any(dim=1, keepdim=True), boxes, fallback).float()


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, resolution: int) -> torch.Tensor:
    """Crop ``boxes`` (top, left, h, w) out of uint8 [B, 3, H, W], resize to ``resolution``, flip where
    ``flips``; returns uint8 [B, 3, resolution, resolution]. One ``grid_sample`` for the whole batch."""
    b, _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros((b, 2, 3), device=images.device, dtype=torch.float32)
    # output x in [-1, 1] (pixel edges) -> source x: the crop's centre plus its half-width, mirrored if flipped
    theta[:, 0, 0] = (w / width) * torch.where(flips, -1.0, 1.0)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, 3, resolution, resolution], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class MemoryTwoViewBatches:
    """Batches of one rank's share of a device-resident data set; two crops+flips per image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, resolution: int, scale,
                 ratio, flip_prob: float, seed: int, shuffle: bool, rank: int, world_size: int, drop_last: bool) -> None:
        self.images, self.labels, self.batch_size, self.resolution = images, labels, batch_size, resolution
        self.scale, self.ratio, self.flip_prob, self.seed = tuple(scale), tuple(ratio), flip_prob, seed
        self.shuffle, self.rank, self.world_size, self.drop_last = shuffle, rank, world_size, drop_last
        self.epoch = 0
        self.generator = torch.Generator(device=images.device)

    def _order(self) -> np.ndarray:
        from byol_ray.data.loaders import shard_order

        return shard_order(len(self.labels), self.epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank,
                           world_size=self.world_size, drop_last=True)

    def __len__(self) -> int:
        n = len(self.labels) // self.world_size  # this rank's equal share (shard_order drops the remainder)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        device = self.images.device
        order = torch.from_numpy(self._order()).to(device)
        # its own stream: salted so it never equals the engine's augmentation generator on the same device
        words = np.random.SeedSequence([self.seed, self.epoch, self.rank, _STREAM]).generate_state(2)
        self.generator.manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)
        _, _, height, width = self.images.shape
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            batch = self.images.index_select(0, idx)
            views = []
            for _ in range(2):
                boxes = sample_boxes(len(idx), height, width, self.scale, self.ratio, self.generator, device)
                flips = torch.rand(len(idx), generator=self.generator, device=device) < self.flip_prob
                views.append(resized_crops(batch, boxes, flips, self.resolution))
            yield views[0], views[1], self.labels.index_select(0, idx)
