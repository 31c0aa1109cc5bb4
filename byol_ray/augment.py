"""Batched, per-sample BYOL colour augmentation on the training device, with TF/DeepMind semantics."""

# Reference: DeepMind's byol/utils/augmentations.py
# (https://github.com/google-deepmind/deepmind-research/blob/master/byol/utils/augmentations.py).
# Same ops, order, ranges, probabilities, kernel size and zero padding. Differences are float
# rounding only: saturation and hue share one HSV round trip when adjacent in a sample's order
# (see JITTER_STAGES), and contrast is evaluated as x * f + (1 - f) * mean.

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Index of each colour-jitter op inside AugmentParams.order (same numbering as DeepMind's
# byol/utils/augmentations.py: brightness 0, contrast 1, saturation 2, hue 3).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
NUM_JITTER_OPS = 4

GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)


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


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample random parameters of one augmented batch; every field has leading dim B."""

    jitter_applied: Tensor  # bool [B]
    order: Tensor  # int64 [B, 4]: order[b, p] = op applied at position p (BRIGHTNESS..HUE)
    brightness: Tensor  # float [B], additive delta
    contrast: Tensor  # float [B], factor
    saturation: Tensor  # float [B], factor
    hue: Tensor  # float [B], shift in full turns
    grayscale: Tensor  # bool [B]
    blur_applied: Tensor  # bool [B]
    blur_sigma: Tensor  # float [B]
    solarize: Tensor  # bool [B]

    @property
    def batch_size(self) -> int:
        return self.order.shape[0]


def sample_params(
    batch_size: int,
    view: ViewAugment,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> AugmentParams:
    """Draws independent augmentation parameters for every sample of a batch.

    Every parameter is drawn for every sample, whether or not its op fires, so the random
    stream (and hence a seeded run) does not depend on which ops happen to fire.

    Args:
        batch_size: number of samples B.
        view: the view's recipe (VIEW1 or VIEW2).
        generator: seeded torch.Generator living on `device`.
        device: where the parameters are created; defaults to the generator's device.

    Returns:
        AugmentParams with tensors of leading dimension B on `device`.
    """
    device = torch.device(device) if device is not None else generator.device
    if device.type != generator.device.type:
        raise ValueError(
            f"generator lives on {generator.device} but parameters are wanted on {device}: "
            "create the generator on the images' device"
        )

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)

    def symmetric(half_width: float) -> Tensor:
        return (2.0 * uniform(batch_size) - 1.0) * half_width

    # rand < p fires with probability exactly p (rand is in [0, 1)): p=0 never, p=1 always.
    jitter_applied = uniform(batch_size) < view.color_jitter_prob
    # argsort of i.i.d. uniforms is a uniformly random permutation per row.
    order = uniform(batch_size, NUM_JITTER_OPS).argsort(dim=1)
    brightness = symmetric(view.brightness)
    contrast = 1.0 + symmetric(view.contrast)
    saturation = 1.0 + symmetric(view.saturation)
    hue = symmetric(view.hue)
    grayscale = uniform(batch_size) < view.grayscale_prob
    blur_applied = uniform(batch_size) < view.blur_prob
    lo, hi = view.blur_sigma
    blur_sigma = lo + (hi - lo) * uniform(batch_size)
    solarize = uniform(batch_size) < view.solarize_prob
    return AugmentParams(
        jitter_applied=jitter_applied,
        order=order,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
        grayscale=grayscale,
        blur_applied=blur_applied,
        blur_sigma=blur_sigma,
        solarize=solarize,
    )


@functools.lru_cache(maxsize=None)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant on `device`, copied there once: a fresh torch.tensor(..., device=cuda)
    per call is a blocking host-to-device copy, i.e. a sync in every training step."""
    return torch.tensor(values, dtype=dtype).to(device)


def _channel_constant(values: tuple, like: Tensor) -> Tensor:
    """Per-channel constant shaped [1, C, 1, 1] to broadcast over `like`."""
    return _constant(tuple(values), like.device, like.dtype).view(1, -1, 1, 1)


def _per_sample(values: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1] so a per-sample value broadcasts over an image batch."""
    return values.view(-1, 1, 1, 1)


def _affine_jitter(
    x: Tensor, brightness: Tensor, contrast: Tensor, use_b: Tensor, use_c: Tensor
) -> Tensor:
    """Brightness or contrast, whichever each sample runs now, as one per-channel affine map.

    Brightness is TF adjust_brightness, x + delta. Contrast is TF adjust_contrast,
    (x - m) * f + m with m the per-image, per-channel mean over H and W, computed here as
    x * f + (1 - f) * m (equal up to float rounding). Samples running neither get x * 1 + 0,
    which is exact.
    """
    factor = _per_sample(torch.where(use_c, contrast, torch.ones_like(contrast)))
    mean = x.mean(dim=(2, 3), keepdim=True)
    offset = torch.where(_per_sample(use_c), (1.0 - factor) * mean, _per_sample(brightness * use_b))
    return torch.addcmul(offset, x, factor)


def _hsv_jitter(x: Tensor, saturation: Tensor, hue: Tensor) -> Tensor:
    """TF adjust_saturation and adjust_hue in one HSV round trip.

    Mathematically identical to TF/DeepMind rgb_to_hsv -> (h + delta, clip(s * f, 0, 1), v)
    -> hsv_to_rgb; the HSV -> RGB step uses the closed form
    channel_n = v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B,
    which equals the six-sector table without branching. Pass factor 1 / shift 0 for the op a
    sample does not use; results agree with the reference to float rounding (~1e-7).
    """
    r, g, b = x.unbind(dim=1)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    # For chroma > 0 the clamp changes nothing; for gray pixels (chroma 0) the numerators below
    # are 0, the hue is finite and irrelevant, because their new chroma is 0 as well.
    inv_chroma = chroma.clamp(min=torch.finfo(x.dtype).tiny).reciprocal()
    # Hue in sixths of a turn (TF: where R is the max, else where G is the max, else B).
    hue6 = torch.where(
        r == v,
        (g - b) * inv_chroma,
        torch.where(g == v, (b - r) * inv_chroma + 2.0, (r - g) * inv_chroma + 4.0),
    )
    hue6 = hue6 + 6.0 * hue.view(-1, 1, 1)
    # New chroma v * clip(s * f, 0, 1) with s = chroma / v, written without the division.
    new_chroma = torch.minimum((chroma * saturation.view(-1, 1, 1)).clamp(min=0.0), v)
    n = _channel_constant((5.0, 3.0, 1.0), x)
    k = torch.remainder(n + hue6.unsqueeze(1), 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v.unsqueeze(1) - new_chroma.unsqueeze(1) * weight


# Each sample runs its four jitter ops in its own order. Rather than four full-batch passes of
# every op, the ops are scheduled on this fixed template of stages: every one of the 24 orders
# is a subsequence of it once adjacent saturation and hue share one HSV round trip (they
# commute, and neither leaves [0, 1], so TF's clip between them is a no-op). That halves the
# expensive HSV work: 2 round trips per batch instead of 4. Samples idle in a stage get the
# identity, so one code path serves every order with no host-device sync.
JITTER_STAGES = ("affine", "hsv", "affine", "affine", "hsv", "affine")


def _next_stage_table(kind: str) -> list[int]:
    """table[c + 1] = first stage of `kind` after stage c (c = -1: before the first stage)."""
    stages = range(len(JITTER_STAGES))
    return [
        next((i for i in stages if i > c and JITTER_STAGES[i] == kind), len(JITTER_STAGES))
        for c in range(-1, len(JITTER_STAGES))
    ]


_NEXT_AFFINE = tuple(_next_stage_table("affine"))
_NEXT_HSV = tuple(_next_stage_table("hsv"))


def jitter_stages(order: Tensor) -> Tensor:
    """Assigns each sample's jitter ops to template stages, respecting the sample's order.

    Args:
        order: int64 [B, 4], order[b, p] = op run at position p.

    Returns:
        int64 [B, 4], stage[b, op] = index into the stage template where sample b runs op.
    """
    batch = order.shape[0]
    next_affine = _constant(_NEXT_AFFINE, order.device, order.dtype)
    next_hsv = _constant(_NEXT_HSV, order.device, order.dtype)
    stage = torch.empty_like(order)
    cursor = torch.full((batch,), -1, dtype=order.dtype, device=order.device)
    previous_hsv = torch.zeros(batch, dtype=torch.bool, device=order.device)
    for position in range(NUM_JITTER_OPS):
        op = order[:, position]
        is_hsv = op >= SATURATION
        slot = torch.where(is_hsv, next_hsv[cursor + 1], next_affine[cursor + 1])
        slot = torch.where(is_hsv & previous_hsv, cursor, slot)  # share the HSV round trip
        stage.scatter_(1, op.unsqueeze(1), slot.unsqueeze(1))
        cursor, previous_hsv = slot, is_hsv
    return stage


def color_jitter(x: Tensor, params: AugmentParams) -> Tensor:
    """Brightness, contrast, saturation and hue in each sample's own random order.

    Batched over samples (no Python loop over samples, no host-device sync); each op's result
    is clipped to [0, 1], as in the reference.

    Args:
        x: float32 images in [0, 1], [B, 3, H, W].
        params: per-sample parameters from sample_params.

    Returns:
        Jittered float32 images in [0, 1]; samples with jitter_applied False are unchanged.
    """
    runs_in = params.jitter_applied.view(-1, 1, 1) & (
        jitter_stages(params.order).unsqueeze(2)
        == torch.arange(len(JITTER_STAGES), device=x.device)
    )  # [B, op, stage]
    for index, kind in enumerate(JITTER_STAGES):
        runs = runs_in[:, :, index]
        if kind == "affine":
            x = _affine_jitter(
                x, params.brightness, params.contrast, runs[:, BRIGHTNESS], runs[:, CONTRAST]
            ).clamp_(0.0, 1.0)
        else:
            use_s, use_h = runs[:, SATURATION], runs[:, HUE]
            saturation = torch.where(use_s, params.saturation, torch.ones_like(params.saturation))
            hue = torch.where(use_h, params.hue, torch.zeros_like(params.hue))
            # The HSV round trip is not bit-exact at identity: keep idle samples as they are.
            # No clip needed: v - c * w with 0 <= c <= v <= 1 and 0 <= w <= 1 stays in [0, 1]
            # even after float rounding.
            x = torch.where(_per_sample(use_s | use_h), _hsv_jitter(x, saturation, hue), x)
    return x


def to_grayscale(x: Tensor, apply: Tensor) -> Tensor:
    """Replaces the selected samples by their luma (0.2989 R + 0.5870 G + 0.1140 B) on 3 channels.

    Args:
        x: float32 images, [B, 3, H, W].
        apply: bool [B], which samples turn gray.

    Returns:
        float32 images, [B, 3, H, W].
    """
    weights = _channel_constant(GRAYSCALE_WEIGHTS, x)
    gray = (x * weights).sum(dim=1, keepdim=True)
    return torch.where(_per_sample(apply), gray.expand_as(x), x)


def gaussian_blur(x: Tensor, sigma: Tensor, apply: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma and zero ('SAME') padding.

    Zero padding follows DeepMind's reference (conv 'SAME'), so pixels within kernel_size // 2
    of the border darken; torchvision pads by reflection instead.

    Args:
        x: float32 images, [B, C, H, W].
        sigma: float [B], per-sample standard deviation in pixels.
        apply: bool [B], which samples are blurred; the others are returned unchanged.
        kernel_size: odd number of taps.

    Returns:
        float32 images, [B, C, H, W].
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size={kernel_size}: must be odd")
    radius = kernel_size // 2
    if radius == 0:
        return x
    batch, channels, height, width = x.shape
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2.0 * sigma.to(x.dtype).view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    # One depthwise group per (sample, channel): each sample uses its own kernel.
    kernel = kernel.repeat_interleave(channels, dim=0).view(batch * channels, 1, 1, kernel_size)
    flat = x.reshape(1, batch * channels, height, width)
    flat = torch.nn.functional.conv2d(flat, kernel, padding=(0, radius), groups=batch * channels)
    flat = torch.nn.functional.conv2d(
        flat, kernel.transpose(2, 3), padding=(radius, 0), groups=batch * channels
    )
    return torch.where(_per_sample(apply), flat.view_as(x), x)


def solarize(x: Tensor, apply: Tensor, threshold: float) -> Tensor:
    """x < threshold ? x : 1 - x on the selected samples.

    Args:
        x: float32 images in [0, 1], [B, C, H, W].
        apply: bool [B], which samples are solarised.
        threshold: solarisation threshold in [0, 1].

    Returns:
        float32 images, [B, C, H, W].
    """
    flipped = torch.where(x < threshold, x, 1.0 - x)
    return torch.where(_per_sample(apply), flipped, x)


def normalize_channels(x: Tensor, view: ViewAugment) -> Tensor:
    """(x - mean) / std per channel with the view's statistics."""
    mean = _channel_constant(view.mean, x)
    std = _channel_constant(view.std, x)
    return (x - mean) / std


def _to_unit_float(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"images must be uint8 (0..255) or floating point (0..1), got {images.dtype}")


@torch.no_grad()
def apply_params(
    images_uint8: Tensor, params: AugmentParams, view: ViewAugment, normalize: bool = True
) -> Tensor:
    """Applies the reference pipeline: jitter -> grayscale -> blur -> solarise -> clip -> normalise.

    Args:
        images_uint8: [B, 3, H, W] uint8 in 0..255 (a floating tensor is taken as already in
            [0, 1]), on any device; params must live on the same device.
        params: per-sample parameters from sample_params(B, view, ...).
        view: the view's recipe; supplies the blur kernel size, solarise threshold, mean/std.
        normalize: False returns the augmented image in [0, 1] before normalisation.

    Returns:
        float32 [B, 3, H, W].
    """
    x = _to_unit_float(images_uint8)
    if params.batch_size != x.shape[0]:
        raise ValueError(f"params are for {params.batch_size} samples, images have {x.shape[0]}")
    x = color_jitter(x, params)
    x = to_grayscale(x, params.grayscale)
    x = gaussian_blur(x, params.blur_sigma, params.blur_applied, view.blur_kernel_size(x.shape[2]))
    x = solarize(x, params.solarize, view.solarize_threshold)
    # In place from here on: x is a fresh tensor, and on CPU every new full-size tensor costs
    # page faults.
    x = x.clamp_(0.0, 1.0)
    if normalize:
        x = x.sub_(_channel_constant(view.mean, x)).div_(_channel_constant(view.std, x))
    return x


def augment_view(
    images_uint8: Tensor, view: ViewAugment, generator: torch.Generator, normalize: bool = True
) -> Tensor:
    """Augments one BYOL view of a batch: sample_params followed by apply_params.

    Args:
        images_uint8: [B, 3, H, W] uint8, already cropped and flipped by the loader.
        view: VIEW1 or VIEW2 (or any ViewAugment).
        generator: seeded torch.Generator on the images' device.
        normalize: False returns the augmented image in [0, 1] before normalisation.

    Returns:
        float32 [B, 3, H, W], normalised with the view's mean/std.
    """
    params = sample_params(images_uint8.shape[0], view, generator, images_uint8.device)
    return apply_params(images_uint8, params, view, normalize=normalize)
