"""One view's colour-augmentation recipe (the paper's Table 6): plain numbers, no torch.

``byol_ray.augment`` applies it on the training device. The recipe lives apart so that the config, and with it
every command's argument and config checks (``byol-ray config``, a mistyped key), load without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ViewAugment.{name}={value!r}: a probability must lie in [0, 1]")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"ViewAugment.{name}={value!r}: allowed range is [{lo}, {hi}]")


@dataclass(frozen=True)
class ViewAugment:
    """Colour-augmentation recipe for one BYOL view; the defaults are the paper's view1.

    Jitter ranges follow TensorFlow semantics: brightness is an additive delta ~ U[-b, b],
    contrast and saturation factors ~ U[1-c, 1+c], hue a shift ~ U[-h, h] in full turns.
    The blur kernel has 2*floor(fraction*H/2)+1 taps (23 at 224 px, 3 at 32 px).
    """

    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        for name in ("color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            _check_prob(name, getattr(self, name))
        # Upper bounds keep every factor non-negative and the hue shift within half a turn.
        _check_range("brightness", self.brightness, 0.0, 1.0)
        _check_range("contrast", self.contrast, 0.0, 1.0)
        _check_range("saturation", self.saturation, 0.0, 1.0)
        _check_range("hue", self.hue, 0.0, 0.5)
        _check_range("solarize_threshold", self.solarize_threshold, 0.0, 1.0)
        if not 0.0 < self.blur_kernel_fraction <= 1.0:
            raise ValueError(
                f"ViewAugment.blur_kernel_fraction={self.blur_kernel_fraction!r}: "
                "allowed range is (0, 1]"
            )
        sigma = tuple(self.blur_sigma)
        if len(sigma) != 2 or not 0.0 < sigma[0] <= sigma[1] or not math.isfinite(sigma[1]):
            raise ValueError(
                f"ViewAugment.blur_sigma={self.blur_sigma!r}: must be (lo, hi) with 0 < lo <= hi"
            )
        if len(tuple(self.mean)) != 3:
            raise ValueError(f"ViewAugment.mean={self.mean!r}: must have 3 values (R, G, B)")
        std = tuple(self.std)
        if len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"ViewAugment.std={self.std!r}: must have 3 positive values (R, G, B)")
        # YAML hands over lists; store tuples so the frozen config stays hashable.
        object.__setattr__(self, "blur_sigma", tuple(float(s) for s in sigma))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in std))

    def blur_kernel_size(self, height: int) -> int:
        """Odd blur kernel size for images of the given height (DeepMind: H / blur_divider).

        Args:
            height: image height in pixels.

        Returns:
            2 * floor(blur_kernel_fraction * height / 2) + 1; 1 means no blur.
        """
        # The epsilon keeps e.g. 0.1 * 220 / 2 = 10.999... from flooring to 10.
        return 2 * int(self.blur_kernel_fraction * height / 2 + 1e-6) + 1


VIEW1 = ViewAugment()
VIEW2 = ViewAugment(blur_prob=0.1, solarize_prob=0.2)
