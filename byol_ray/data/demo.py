"""The built-in demo data set: scikit-learn's bundled handwritten digits as small RGB images."""

from __future__ import annotations

import numpy as np

DEMO_NAME = "demo"  # the string that names this data set wherever a data source is expected


def load_demo(size: int = 32) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Loads the 1,797 real 8x8 digit scans (UCI, bundled with scikit-learn: no download).

    The 17 grey levels (0..16, ink = high) map linearly to 0..255, so the digit is bright on a
    dark background; the single channel is repeated into RGB and upscaled with PIL's bilinear
    filter, so crops and colour augmentation see smooth strokes rather than 4x4 pixel blocks.

    Args:
        size: output side in pixels (8 keeps the original grid).

    Returns:
        images uint8 [N, size, size, 3], labels int64 [N] in 0..9, class names '0'..'9'.
    """
    if size < 1:
        raise ValueError(f"load_demo(size={size}): the image side must be a positive number of pixels")
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
    if size != grey.shape[1]:
        grey = np.stack(
            [np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey]
        )
    images = np.repeat(grey[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    class_names = [str(name) for name in digits.target_names]
    return np.ascontiguousarray(images), labels, class_names
