"""Sample order and crop law shared by every loader backend: which samples a rank visits, where crops are cut.

Two crop laws, selected by ``data.crop_law``:

``reference`` (the default) is the paper's random-resized crop as DeepMind's BYOL code draws it:
``byol/utils/dataset.py``, ``_decode_and_random_crop`` (google-deepmind/deepmind-research). That
function draws once: ``target_area = U[0.08, 1.0] * area``; ``aspect_ratio = exp(U[log 3/4, log 4/3])``;
``w = round(sqrt(target_area * aspect_ratio))``, ``h = round(sqrt(target_area / aspect_ratio))``;
``w = min(w, width)``, ``h = min(h, height)``; ``offset_w = U{0 .. width - w}``,
``offset_h = U{0 .. height - h}``. (Its ``augmentations.py`` holds no crop, and the
``_distorted_bounding_box_crop`` / ``sample_distorted_bounding_box`` route of other TF ImageNet
pipelines is not what BYOL uses.) Deviations: the scale and ratio ranges are parameters
(``data.crop_scale``, ``data.crop_ratio``) instead of constants; arithmetic is float64, not
float32 (it can move a side by one pixel only at an exact .5 boundary); each side is also kept >= 1
pixel, where the reference would cut an empty crop (only possible for scales near 0 on tiny images).
Clamping the sides means a drawn crop too wide or too tall for the image becomes the full width or
height: on a 500x375 image the mean area fraction is ~0.52 and ~13% of crops cover over 80% of it.

``torchvision`` is ``torchvision.transforms.RandomResizedCrop.get_params`` (and FFCV's
``get_random_crop``): up to ten tries of the same area and ratio draws, accepting the first crop
that fits inside the image, else the largest centred crop with its ratio clamped to the range.
Rejection drops exactly the large crops clamping keeps: mean area ~0.43 and ~5.5% above 80% on a
500x375 image.

Every backend feeds these functions a vector of ``CROP_DRAWS`` uniforms in [0, 1) per crop, laid
out as (offset y, offset x, area try 0, log ratio try 0, area try 1, ...). :func:`crop_box` is the
scalar law (plain Python that numba compiles unchanged: the FFCV decoder jits it, the torch
backend calls it as is) and :func:`crop_boxes` the same formula batched in torch (the memory
backend); given the same uniforms they return the same boxes. How the uniforms are drawn is each
backend's own, and fixes its determinism: SplitMix64 keyed on (seed, epoch, sample, view) for FFCV,
numpy seeded by (seed, epoch, sample) for torch, one torch generator per (seed, epoch, rank) for memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from byol_ray.dist import batch_share

CROP_LAWS = ("reference", "torchvision")
REFERENCE, TORCHVISION = 0, 1  # the law as an int, for compiled code
TRIES = 10  # torchvision's rejection tries
CROP_DRAWS = 2 + 2 * TRIES  # uniforms per crop: offset y, offset x, then (area, log ratio) per try


def shard_order(num_samples: int, epoch: int, *, seed: int, shuffle: bool, rank: int = 0,
                world_size: int = 1, drop_last: bool = True, global_batch: int = 0) -> np.ndarray:
    """The sample indices one rank visits in one epoch, identical for every backend.

    Every rank draws the same permutation (seeded by seed and epoch). For training (``global_batch``
    given), global batch s is the permutation's block s of ``global_batch`` samples, whatever the
    number of ranks, and each rank visits its :func:`batch_share` of every block: a run that changes
    its number of workers (elastic, or resumed on another cluster) continues the same sequence of
    global batches. The last incomplete block is dropped. Without ``global_batch`` (evaluation) each
    rank takes every world_size-th entry from its rank on; with drop_last the permutation is first cut
    to a multiple of world_size (equal shares), without it ranks differ by at most one sample.

    Args:
        num_samples: data set size.
        epoch: the epoch (a different permutation each epoch).
        seed: the order seed; must be the same on every rank.
        shuffle: False keeps the stored order (evaluation).
        rank: this rank.
        world_size: number of ranks.
        drop_last: equal shares (training) instead of covering every sample (evaluation).

        global_batch: the global batch whose shares the rank's batches are (0: deal every world_size-th sample).

    Returns:
        int64 indices into the data set.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle else np.arange(num_samples)
    if global_batch:
        offset, size = batch_share(global_batch, world_size, rank)
        blocks = num_samples // global_batch
        return order[: blocks * global_batch].reshape(blocks, global_batch)[:, offset:offset + size].reshape(-1)
    if drop_last:
        order = order[: num_samples - num_samples % world_size]
    return order[rank::world_size]


@dataclass(frozen=True)
class CropLaw:
    """A crop law and its parameters, checked once.

    Attributes:
        law: 'reference' (DeepMind's single clamped draw) or 'torchvision' (ten tries, centred fallback).
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    """

    law: str = "reference"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.law not in CROP_LAWS:
            raise ValueError(f"crop_law={self.law!r}: choose one of {CROP_LAWS} (config data.crop_law)")
        scale, ratio = tuple(float(s) for s in self.scale), tuple(float(r) for r in self.ratio)
        if not (len(scale) == len(ratio) == 2 and 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"crop_scale={self.scale} needs 0 < lo <= hi <= 1, crop_ratio={self.ratio} 0 < lo <= hi")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)

    def args(self) -> tuple:
        """The law's parameters as :func:`crop_box` takes them after the image size."""
        return (CROP_LAWS.index(self.law), self.scale[0], self.scale[1], math.log(self.ratio[0]),
                math.log(self.ratio[1]), self.ratio[0], self.ratio[1])


def crop_box(u, height, width, law, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi):
    """One crop box from ``CROP_DRAWS`` uniforms ``u``; numba-jittable (the FFCV decoder compiles it).

    Args:
        u: float64 [CROP_DRAWS] uniforms in [0, 1), laid out as in the module docstring.
        height: image height.
        width: image width.
        law: REFERENCE or TORCHVISION.
        scale_lo: smallest area fraction.
        scale_hi: largest area fraction.
        log_r_lo: log of the smallest aspect ratio.
        log_r_hi: log of the largest aspect ratio.
        r_lo: smallest aspect ratio (torchvision's fallback).
        r_hi: largest aspect ratio (torchvision's fallback).

    Returns:
        (top, left, crop_height, crop_width), ints.
    """
    area = float(height) * float(width)
    tries = 1 if law == REFERENCE else TRIES
    for t in range(tries):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * u[2 + 2 * t])
        aspect = math.exp(log_r_lo + (log_r_hi - log_r_lo) * u[3 + 2 * t])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if law == REFERENCE:  # dataset.py: w = min(w, width), h = min(h, height); >= 1 is ours
            w = max(min(w, width), 1)
            h = max(min(h, height), 1)
        if 0 < w <= width and 0 < h <= height:
            top = min(int(math.floor(u[0] * (height - h + 1))), height - h)
            left = min(int(math.floor(u[1] * (width - w + 1))), width - w)
            return top, left, h, w
    # torchvision, after ten misses: the largest centred crop whose ratio lies in [r_lo, r_hi].
    w, h = int(width), int(height)
    in_ratio = float(width) / float(height)
    if in_ratio < r_lo:
        h = int(round(width / r_lo))
    elif in_ratio > r_hi:
        w = int(round(height * r_hi))
    return (height - h) // 2, (width - w) // 2, h, w


def crop_boxes(u: torch.Tensor, height: int, width: int, law: CropLaw) -> torch.Tensor:
    """:func:`crop_box` for a batch: float64 uniforms [n, CROP_DRAWS] -> boxes (top, left, h, w) float64 [n, 4].

    The same formula, operation for operation, so the same uniforms give the same boxes.
    """
    code, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi = law.args()
    tries = 1 if code == REFERENCE else TRIES
    area = float(height) * float(width)
    target_area = area * (scale_lo + (scale_hi - scale_lo) * u[:, 2:2 + 2 * tries:2])
    aspect = torch.exp(log_r_lo + (log_r_hi - log_r_lo) * u[:, 3:3 + 2 * tries:2])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    if code == REFERENCE:
        w, h = w.clamp(1, width), h.clamp(1, height)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    pick = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
    h, w = h.gather(1, pick).squeeze(1), w.gather(1, pick).squeeze(1)
    top = torch.minimum(torch.floor(u[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 1] * (width - w + 1)), width - w)
    fh, fw = height, width
    if width / height < r_lo:
        fh = int(round(width / r_lo))
    elif width / height > r_hi:
        fw = int(round(height * r_hi))
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=u.dtype, device=u.device)
    return torch.where(ok.any(dim=1, keepdim=True), torch.stack([top, left, h, w], dim=1), fallback)
