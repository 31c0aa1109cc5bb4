"""The built-in demo data set: scikit-learn's bundled handwritten digits as small RGB images."""

from __future__ import annotations

from pathlib import Path

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

    scans, target = _digits()
    grey = np.round(scans * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
    if size != grey.shape[1]:
        grey = np.stack(
            [np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey]
        )
    images = np.repeat(grey[..., None], 3, axis=-1)
    class_names = [str(name) for name in range(10)]
    return np.ascontiguousarray(images), target, class_names


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The scans [N, 8, 8] (grey levels 0..16) and labels [N], as ``sklearn.datasets.load_digits`` returns them.

    Read from the file scikit-learn ships (``datasets/data/digits.csv.gz``: 64 grey levels and the label per row)
    without importing scikit-learn, whose import costs about 0.8 s of CPU in every process that loads the demo
    (each Ray Train worker of a demo run; measured with ``PYTHONPROFILEIMPORTTIME``). Where the file is not
    there, ``load_digits`` itself.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target.astype(np.int64)
    rows = np.loadtxt(path, delimiter=",")
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)
