"""The device-memory backend (``data.loader=memory``): the whole data set lives on the GPU.

For data sets that fit in device memory (CIFAR-10 is 150 MB as uint8), the images are decoded once
into one uint8 tensor on the device; every batch is then an index, a random-resized crop and a flip
done for the whole batch at once (``grid_sample``), so the GPU never waits for the host. The colour
work is the engine's batched augmentation, as with the other loaders.

Crops follow :func:`byol_ray.data.order.crop_boxes` (the batched crop law), drawn on the device for the
whole GLOBAL batch from a generator seeded by (seed, epoch, batch index); each rank keeps the rows of
its own samples (its :func:`batch_share` of the global batch, as :func:`shard_order` deals them). So a
given sample at a given step gets the same crop whatever the world size, and a run resumed anywhere, even
mid-epoch or on a different number of workers, repeats an uninterrupted one (unlike the FFCV and torch loaders, the draws are keyed on
the position in the global batch, not on the sample index). Resampling is bilinear without antialias, which matters
only when a crop is shrunk by more than about 2x (not for 32-px images at 32 px).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from byol_ray.data.order import CROP_DRAWS, CropLaw, crop_boxes, shard_order
from byol_ray.dist import batch_share
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
    """Batches of one rank's share of a device-resident data set; two crops+flips per image.

    Args:
        images: uint8 [N, 3, H, W] on the device.
        labels: int64 [N] on the device.
        batch_size: samples per batch.
        resolution: output side in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_prob: probability of a horizontal flip, per view.
        seed: order and crop seed.
        shuffle: a new permutation each epoch (else the stored order).
        rank: this rank.
        world_size: number of ranks.
        drop_last: drop the last incomplete batch.
        law: the crop law, 'reference' or 'torchvision' (byol_ray.data.order).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, resolution: int, scale,
                 ratio, flip_prob: float, seed: int, shuffle: bool, rank: int, world_size: int, drop_last: bool,
                 law: str = "reference", global_batch: int = 0) -> None:
        self.images, self.labels, self.batch_size, self.resolution = images, labels, batch_size, resolution
        self.law, self.flip_prob, self.seed = CropLaw(law, scale, ratio), flip_prob, seed
        self.shuffle, self.rank, self.world_size, self.drop_last = shuffle, rank, world_size, drop_last
        self.epoch, self.skip = 0, 0
        self.global_batch = global_batch or batch_size * world_size
        self.offset = batch_share(self.global_batch, world_size, rank)[0] if global_batch else None
        self.generator = torch.Generator(device=images.device)

    def __len__(self) -> int:
        if self.offset is not None:  # this rank's share of every whole global batch
            return len(self.labels) // self.global_batch
        n = len(self.labels) // self.world_size  # this rank's equal share (shard_order drops the remainder)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self):
        device = self.images.device
        order = shard_order(len(self.labels), self.epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank,
                            world_size=self.world_size, drop_last=True,
                            global_batch=self.global_batch if self.offset is not None else 0)
        order = torch.from_numpy(order).to(device)
        _, _, height, width = self.images.shape
        for b in range(self.skip, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            batch = self.images.index_select(0, idx)
            # its own stream: salted so it never equals the engine's augmentation generator on the same device
            words = np.random.SeedSequence([self.seed, self.epoch, b, _STREAM]).generate_state(2)
            self.generator.manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)
            views = []
            for _ in range(2):
                # the crops' uniforms, then the flips' (as the FFCV and torch backends lay them out), drawn
                # for the global batch; this rank's samples are its every world_size-th rows
                u = torch.rand((self.global_batch, CROP_DRAWS + 1), generator=self.generator, device=device,
                               dtype=torch.float64)
                u = u[self.offset:self.offset + len(idx)] if self.offset is not None else \
                    u[self.rank::self.world_size][:len(idx)]
                boxes = crop_boxes(u, height, width, self.law).float()
                views.append(resized_crops(batch, boxes, u[:, CROP_DRAWS] < self.flip_prob, self.resolution))
            yield views[0], views[1], self.labels.index_select(0, idx)


def train_batches(source: Source, *, batch_size: int, resolution: int, law: CropLaw, flip_prob: float, seed: int,
                  shard: dict, drop_last: bool, device: torch.device) -> MemoryTwoViewBatches:
    """Decodes ``source`` onto ``device`` once; (view1, view2, labels) batches of one rank's share per epoch."""
    images, labels = load_to_device(source, device)
    return MemoryTwoViewBatches(images, labels, batch_size=batch_size, resolution=resolution, scale=law.scale,
                                ratio=law.ratio, flip_prob=flip_prob, seed=seed, shuffle=shard["shuffle"],
                                rank=shard["rank"], world_size=shard["world_size"], drop_last=drop_last, law=law.law,
                                global_batch=shard.get("global_batch", 0))
