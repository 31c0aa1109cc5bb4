"""The evaluation input contract shared by training, the registry and downstream jobs: uint8 → normalised float."""
from __future__ import annotations

import torch

import numpy as np

from byol_ray.augment import VIEW1, normalize_channels

# The paper's evaluation preprocessing (docs/recipe.md): centre crop 224/256 of the shorter side, resized, ImageNet stats.
MEAN, STD = VIEW1.mean, VIEW1.std
EVAL_CROP_RATIO = 224 / 256  # centre crop side / shorter image side
PREPROCESSING = (f"centre square crop of {EVAL_CROP_RATIO:g} x the shorter side, resized to resolution, x/255, "
                 f"normalised with mean={list(MEAN)} std={list(STD)}")


def eval_transform(resolution: int) -> dict:
    """The exact evaluation transform of an encoder trained at ``resolution``, as a downstream team rebuilds it
    (torchvision equivalent: ``Resize(round(resolution / EVAL_CROP_RATIO)), CenterCrop(resolution), ToTensor(),
    Normalize(mean, std)`` on RGB images; the eval loaders crop first, then resize, which is the same window)."""
    return {"center_crop_ratio": EVAL_CROP_RATIO, "crop": "centre square, side = ratio x shorter side",
            "resize_to": [resolution, resolution], "resize_shorter_side_to": round(resolution / EVAL_CROP_RATIO),
            "interpolation": "bicubic, antialiased (PIL Image.resize of the crop box)",
            "scale": "uint8 / 255", "mean": [float(m) for m in MEAN], "std": [float(s) for s in STD],
            "input": f"float32 [B, 3, {resolution}, {resolution}] RGB, channels first"}


def eval_crop(image: np.ndarray, resolution: int, crop_ratio: float = EVAL_CROP_RATIO) -> torch.Tensor:
    """The evaluation crop of one image, as every eval path applies it (loaders, ``embed``, ``serve``).

    Args:
        image: RGB uint8 [H, W, 3] of any size.
        resolution: output side in pixels.
        crop_ratio: centre square side / shorter image side (1.0 keeps the whole of a square image).

    Returns:
        uint8 [3, resolution, resolution]: the centre square, resized bicubic (antialiased when shrinking).
    """
    from PIL import Image

    height, width = image.shape[:2]
    side = max(1, int(crop_ratio * min(height, width)))
    top, left = (height - side) // 2, (width - side) // 2
    out = np.array(Image.fromarray(image).resize((resolution, resolution), Image.BICUBIC,
                                                 box=(left, top, left + side, top + side)))
    return torch.from_numpy(out).permute(2, 0, 1)


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
