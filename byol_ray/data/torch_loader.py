"""The torch backend: images read from the source per sample in DataLoader workers, cut and resized with PIL.

The fallback where FFCV cannot be built. Each sample's two crops and flips come from a numpy
generator seeded by (seed, epoch, sample index), so they are the same whatever the worker count
and whether the run was interrupted or not; the crop law is :func:`byol_ray.data.order.crop_box`.
"""
from __future__ import annotations

import numpy as np
import torch

from byol_ray.data.order import CROP_DRAWS, CropLaw, crop_box, shard_order
from byol_ray.dist import batch_share
from byol_ray.data.sources import Source
from byol_ray.preprocess import eval_crop


def view_boxes(seed: int, epoch: int, index: int, height: int, width: int, law: CropLaw,
               flip_prob: float) -> list[tuple[int, int, int, int, bool]]:
    """The crop boxes and flips of one sample's two views, as :class:`SourceDataset` draws them.

    Args:
        seed: the loader's seed.
        epoch: the epoch.
        index: the sample's index in the source.
        height: image height.
        width: image width.
        law: the crop law and its ranges.
        flip_prob: probability of a horizontal flip, per view.

    Returns:
        [(top, left, crop_height, crop_width, flipped)] for view 1 and view 2.
    """
    rng = np.random.default_rng([seed, epoch, index])
    args = law.args()
    out = []
    for _ in range(2):
        u = rng.random(CROP_DRAWS + 1)  # the crop's uniforms, then the flip's
        out.append((*crop_box(u, height, width, *args), bool(u[CROP_DRAWS] < flip_prob)))
    return out


def _resized_crop(image: np.ndarray, box: tuple[int, int, int, int], resolution: int, flip: bool) -> torch.Tensor:
    from PIL import Image

    top, left, h, w = box
    # Bicubic as in the reference recipe; PIL widens the filter when shrinking (antialiased).
    out = np.array(Image.fromarray(image).resize((resolution, resolution), Image.BICUBIC,
                                                 box=(left, top, left + w, top + h)))
    if flip:
        out = np.ascontiguousarray(out[:, ::-1])
    return torch.from_numpy(out).permute(2, 0, 1)


class SourceDataset(torch.utils.data.Dataset):
    """Two views (training) or a centre crop (evaluation) of one source image per item.

    Items are (index, epoch) from :class:`EpochSampler`, so each crop is seeded by (seed, epoch,
    index) whatever the worker count, and persistent workers need no epoch broadcast.

    Args:
        source: the images.
        resolution: output side in pixels.
        seed: crop seed.
        views: 2 (training) or 1 (evaluation).
        law: the crop law (training).
        flip_prob: probability of a horizontal flip, per view (training).
        crop_ratio: centre crop side / shorter image side (evaluation).
    """

    def __init__(self, source: Source, *, resolution: int, seed: int, views: int, law: CropLaw | None = None,
                 flip_prob: float = 0.0, crop_ratio: float = 1.0) -> None:
        self.source, self.resolution, self.seed, self.views = source, resolution, seed, views
        self.law, self.flip_prob, self.crop_ratio = law or CropLaw(), flip_prob, crop_ratio

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        index, epoch = item
        try:
            image = self.source.load(index)
        except Exception as exc:
            raise ValueError(f"cannot decode {self.source.describe(index)} ({exc}); remove it, or convert the "
                             "data set with `byol-ray prepare`, which skips unreadable files") from None
        label = int(self.source.labels[index])
        height, width = image.shape[:2]
        if self.views == 1:  # evaluation: FFCV's centre crop (ratio * shorter side), resized
            return eval_crop(image, self.resolution, self.crop_ratio), label
        view1, view2 = (_resized_crop(image, (top, left, h, w), self.resolution, flip) for top, left, h, w, flip in
                        view_boxes(self.seed, epoch, index, height, width, self.law, self.flip_prob))
        return view1, view2, label


class EpochSampler(torch.utils.data.Sampler):
    """(index, epoch) items of one rank's :func:`shard_order` share; ``epoch`` is set before each epoch."""

    def __init__(self, num_samples: int, **shard) -> None:
        self.num_samples, self.shard, self.epoch = num_samples, shard, 0
        self.skip = 0  # samples of this rank's share to leave out at the start (a mid-epoch resume)

    def __len__(self) -> int:
        kw = self.shard
        if kw.get("global_batch"):
            return self.num_samples // kw["global_batch"] * batch_share(kw["global_batch"], kw["world_size"], kw["rank"])[1]
        kept = self.num_samples - self.num_samples % kw["world_size"] if kw["drop_last"] else self.num_samples
        return len(range(kw["rank"], kept, kw["world_size"]))

    def __iter__(self):
        order = shard_order(self.num_samples, self.epoch, **self.shard)[self.skip:]
        return ((int(i), self.epoch) for i in order)


def _single_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # PIL work per sample; torch threads would only oversubscribe


class TorchBatches:
    """A DataLoader over :class:`SourceDataset` and :class:`EpochSampler`, batches moved to ``device``."""

    def __init__(self, dataset: SourceDataset, sampler: EpochSampler, *, batch_size: int, num_workers: int,
                 drop_last: bool, device: torch.device) -> None:
        self.sampler, self.device, self.batch_size = sampler, device, batch_size
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
            persistent_workers=num_workers > 0, pin_memory=device.type == "cuda",
            worker_init_fn=_single_thread if num_workers > 0 else None)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.epoch, self.sampler.skip = epoch, skip_batches * self.batch_size

    def __iter__(self):
        for batch in self.loader:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


def train_batches(source: Source, *, batch_size: int, resolution: int, law: CropLaw, flip_prob: float,
                  num_workers: int, seed: int, shard: dict, drop_last: bool, device: torch.device) -> TorchBatches:
    """(view1, view2, labels) batches of ``source``, one rank's share per epoch."""
    dataset = SourceDataset(source, resolution=resolution, seed=seed, views=2, law=law, flip_prob=flip_prob)
    return TorchBatches(dataset, EpochSampler(len(source), **shard), batch_size=batch_size,
                        num_workers=num_workers, drop_last=drop_last, device=device)


def eval_batches(source: Source, *, batch_size: int, resolution: int, center_crop_ratio: float, num_workers: int,
                 shard: dict, device: torch.device) -> TorchBatches:
    """(images, labels) batches of ``source``, centre-cropped (ratio x shorter side) and resized."""
    dataset = SourceDataset(source, resolution=resolution, seed=0, views=1, crop_ratio=center_crop_ratio)
    return TorchBatches(dataset, EpochSampler(len(source), **shard), batch_size=batch_size,
                        num_workers=num_workers, drop_last=False, device=device)
