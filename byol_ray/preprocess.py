"""The evaluation input contract shared by training, the registry and downstream jobs: uint8 → normalised float."""
from __future__ import annotations

import torch

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
