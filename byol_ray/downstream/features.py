"""Model input and frozen features: uint8 images → normalised float, encoder → [N, D] features."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from byol_ray.augment import VIEW1, normalize_channels

# The paper's evaluation preprocessing (RECIPE.md): centre crop (done by the eval loader), ImageNet stats.
MEAN, STD = VIEW1.mean, VIEW1.std
PREPROCESSING = f"centre crop, resize to resolution, x/255, normalise mean={list(MEAN)} std={list(STD)}"


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] (0..255) or float (0..1) images → float32 normalised with ImageNet mean/std.

    Args:
        images: a batch as the loaders yield it.

    Returns:
        float32 [B, 3, H, W], what every registered encoder expects.
    """
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.is_floating_point():
        x = images.float()
    else:
        raise TypeError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
    return normalize_channels(x, VIEW1)


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of a whole eval split (encoder in eval mode: BN running statistics, no grad).

    Args:
        encoder: images → [B, D] representations y (the online encoder).
        loader: yields (uint8 images [B, 3, R, R], int64 labels [B]), centre-cropped.
        device: where to run the encoder.

    Returns:
        (features float32 [N, D] on CPU, labels int64 [N] on CPU).
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for images, target in loader:
            feats.append(encoder(to_model_input(images.to(device, non_blocking=True))).float().cpu())
            # a copy: FFCV reuses a batch's buffers a few batches later (.cpu()/.long() can be no-ops)
            labels.append(target.to("cpu", torch.int64, copy=True))
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("the eval loader yielded no batches; is the split empty or the batch larger than it?")
    return torch.cat(feats), torch.cat(labels)
