"""Batched, per-sample BYOL colour augmentation on the training device, with TF/DeepMind semantics."""

# Reference: DeepMind's byol/utils/augmentations.py
# (https://github.com/google-deepmind/deepmind-research/blob/master/byol/utils/augmentations.py).
# Same ops, order, ranges, probabilities, kernel size and zero padding. Differences are float
# rounding only: saturation and hue share one HSV round trip when adjacent in a sample's order
# (see JITTER_STAGES), saturation alone skips the hue (a closed form, _saturation_jitter), TF's
# branches are computed as exact 0/1 weights, and contrast is evaluated as x * f + (1 - f) * mean.
#
# Speed on a CPU (profiled at 32 px; docs/benchmarks.md has the end-to-end figures): each op runs
# only on the samples that use it, in place, with temporaries in buffers kept between calls, and
# with float arithmetic only (comparisons, torch.where and remainder cost 5 to 30 adds each).

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from byol_ray.augment_recipe import VIEW1, VIEW2, ViewAugment  # noqa: F401 - the recipe's home; re-exported

# Index of each colour-jitter op inside AugmentParams.order (same numbering as DeepMind's
# byol/utils/augmentations.py: brightness 0, contrast 1, saturation 2, hue 3).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
NUM_JITTER_OPS = 4

GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)


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

    def rows(self, index: slice) -> "AugmentParams":
        """The parameters of some samples (e.g. one rank's every world_size-th of a global batch)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


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


# Devices where each op runs on the gathered samples that use it, written back in place. Finding
# those samples (nonzero) waits for the device, so elsewhere an op runs on the whole batch and a
# mask selects its result: no host-device sync in a training step.
SUBSET_DEVICES = ("cpu",)

# torch intra-op threads for the CPU path (None: whatever torch is set to). Its ops are short (tens
# of microseconds at 32 px) and the loader's threads (FFCV) decode on the same cores meanwhile:
# with 2 OpenMP threads an op waits at its barrier for a core the loader holds. Measured with 2
# cores already loaded by other jobs (paired rounds, FFCV loader + both views): 1 thread gave
# 5-14k pairs/s, 2 threads 0.2-6.5k (median ratio 5.8x); `scripts/bench_data.py --augment-threads`
# compares the two. One thread also makes the output independent of the caller's thread count.
CPU_THREADS: int | None = 1


@contextlib.contextmanager
def _cpu_threads(device: torch.device):
    """torch's thread count set to CPU_THREADS meanwhile on a CPU, then restored."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or CPU_THREADS is None or CPU_THREADS == threads:
        yield
        return
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_scratch_buffers = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Uninitialised float memory for a temporary, reused between calls on a CPU.

    A fresh multi-megabyte tensor on a CPU costs a page fault per 4 KiB page (glibc returns
    large freed blocks to the OS and maps them again, zero-filled): about half the pipeline's
    time at 32 px. So temporaries live in one buffer per slot and thread, kept between calls.
    Never return a scratch tensor: the next call of the same slot overwrites it. Elsewhere the
    device's caching allocator already reuses memory, and this is torch.empty.
    """
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    buffers = _scratch_buffers.__dict__.setdefault("by_slot", {})
    numel = math.prod(shape)
    buffer = buffers.get(slot)
    if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
        buffer = buffers[slot] = torch.empty(numel, dtype=like.dtype)
    return buffer[:numel].view(shape)


def _planes(x: Tensor, count: int) -> tuple[Tensor, ...]:
    """`count` scratch planes shaped like one channel of x, [B, H, W] each."""
    batch, _, height, width = x.shape
    return _scratch("op", (count, batch, height, width), x).unbind(0)


def _own(x: Tensor) -> Tensor:
    """A contiguous copy for the in-place ops, so a caller's tensor is never modified."""
    return x.clone(memory_format=torch.contiguous_format)


def _apply_selected(x: Tensor, apply: Tensor, op, *values: Tensor) -> Tensor:
    """x with op on the samples where `apply` is True; the others stay bit for bit.

    Args:
        x: float32 [B, C, H, W], the pipeline's own tensor: updated in place on SUBSET_DEVICES.
        apply: bool [B].
        op: op(images, *per_sample_values) updates `images` in place and returns it.
        values: per-sample tensors with leading dim B, gathered alongside the images.
    """
    if x.device.type not in SUBSET_DEVICES:
        return torch.where(_per_sample(apply), op(x.clone(), *values), x)
    rows = apply.nonzero().squeeze(1)
    if rows.numel() == x.shape[0]:
        return op(x, *values)
    if rows.numel() == 0:
        return x
    chosen = _scratch("rows", (rows.numel(), *x.shape[1:]), x)
    torch.index_select(x, 0, rows, out=chosen)
    op(chosen, *(v.index_select(0, rows) for v in values))
    return x.index_copy_(0, rows, chosen)


def _max_and_chroma(x: Tensor, value: Tensor, chroma: Tensor) -> None:
    """Writes V = max(R, G, B) and chroma V - min(R, G, B) per pixel, [B, H, W] each."""
    r, g, b = x.unbind(dim=1)
    torch.maximum(torch.maximum(r, g, out=value), b, out=value)
    torch.minimum(torch.minimum(r, g, out=chroma), b, out=chroma)
    torch.sub(value, chroma, out=chroma)


def _affine_jitter(
    x: Tensor, brightness: Tensor, contrast: Tensor, use_b: Tensor, use_c: Tensor
) -> Tensor:
    """Brightness or contrast, whichever each sample runs now, as one per-channel affine map.

    Brightness is TF adjust_brightness, x + delta. Contrast is TF adjust_contrast,
    (x - m) * f + m with m the per-image, per-channel mean over H and W, computed here as
    x * f + (1 - f) * m (equal up to float rounding). Samples running neither get x * 1 + 0,
    which is exact. The result is clipped to [0, 1], as after every jitter op in the reference.
    Updates x in place.
    """
    factor = _per_sample(torch.where(use_c, contrast, torch.ones_like(contrast)))
    mean = x.mean(dim=(2, 3), keepdim=True)
    offset = torch.where(_per_sample(use_c), (1.0 - factor) * mean, _per_sample(brightness * use_b))
    return x.mul_(factor).add_(offset).clamp_(0.0, 1.0)


def _hsv_jitter(x: Tensor, saturation: Tensor, hue: Tensor) -> Tensor:
    """TF adjust_saturation and adjust_hue in one HSV round trip; updates x in place.

    Mathematically identical to TF/DeepMind rgb_to_hsv -> (h + delta, clip(s * f, 0, 1), v)
    -> hsv_to_rgb; the HSV -> RGB step uses the closed form
    channel_n = v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B,
    which equals the six-sector table without branching. Pass factor 1 / shift 0 for the op a
    sample does not use; results agree with the reference to float rounding (~1e-7).

    Float arithmetic only: on a CPU, comparisons, torch.where and remainder cost 5 to 30 times
    an add per element. TF's branches are exact 0/1 weights from sign() and lerp() (exact at
    weights 0 and 1), and the wrap mod 6 is a distance to the nearest integer, in turns.
    """
    r, g, b = x.unbind(dim=1)
    value, chroma, other = _planes(x, 3)
    work = _scratch("op3", x.shape, x)
    r_is_max, g_is_max, sixths = work.unbind(dim=1)
    _max_and_chroma(x, value, chroma)
    # Hue in sixths of a turn, TF's branches: where R is the max, else where G is, else B.
    # sign(channel - max) is 0 where the channel is the max, -1 elsewhere.
    torch.sub(r, value, out=r_is_max).sign_().add_(1.0)
    torch.sub(g, value, out=g_is_max).sign_().add_(1.0)
    torch.sub(r, g, out=sixths).add_(chroma, alpha=4.0)  # B the max: (r - g) / c + 4
    sixths.lerp_(torch.sub(b, r, out=other).add_(chroma, alpha=2.0), g_is_max)  # G: (b-r)/c + 2
    sixths.lerp_(torch.sub(g, b, out=other), r_is_max)  # R: (g - b) / c
    # For chroma > 0 the clamp changes nothing; for gray pixels (chroma 0) the numerator is 0 and
    # the hue irrelevant, because their new chroma is 0 as well.
    sixths.div_(torch.clamp(chroma, min=torch.finfo(x.dtype).tiny, out=other))
    # k / 6 - 1/3 in turns for R, G, B (x is free now); u = its distance to the nearest integer
    # is in [-1/2, 1/2], and clamp(min(k, 4 - k), 0, 1) = clamp(2 - 6 |u|, 0, 1).
    turns = sixths.mul_(1.0 / 6.0).add_(hue.view(-1, 1, 1))
    offsets = _channel_constant((0.5, 1.0 / 6.0, -1.0 / 6.0), x)
    shifted = torch.add(turns.unsqueeze(1), offsets, out=x)
    shifted.sub_(torch.round(shifted, out=work))
    weight = shifted.abs_().mul_(-6.0).add_(2.0).clamp_(0.0, 1.0)
    # New chroma v * clip(s * f, 0, 1) with s = chroma / v, written without the division.
    new_chroma = chroma.mul_(saturation.clamp(min=0.0).view(-1, 1, 1))
    torch.minimum(new_chroma, value, out=new_chroma)
    # v - c * w stays in [0, 1] (0 <= c <= v <= 1, 0 <= w <= 1) even after float rounding.
    return torch.addcmul(value.unsqueeze(1), new_chroma.unsqueeze(1), weight, value=-1.0, out=x)


def _saturation_jitter(x: Tensor, saturation: Tensor) -> Tensor:
    """TF adjust_saturation alone: the HSV round trip with the hue kept, in closed form.

    The hue, hence (v - x_n) / c for every channel, is unchanged and the new chroma is
    v * clip(s * f, 0, 1) = c * clip(f, 0, v / c), so x_n' = v + clip(f, 0, v / c) * (x_n - v):
    the reference's math without computing the hue (a third of the work of _hsv_jitter).
    Updates x in place.
    """
    value, chroma, ratio = _planes(x, 3)
    _max_and_chroma(x, value, chroma)
    # Gray pixels (chroma 0) have x_n - v = 0: any finite ratio leaves them at v.
    torch.div(value, chroma.clamp_(min=torch.finfo(x.dtype).tiny), out=ratio)
    torch.minimum(ratio, saturation.clamp(min=0.0).view(-1, 1, 1), out=ratio)
    out = torch.lerp(value.unsqueeze(1), x, ratio.unsqueeze(1), out=x)
    return out.clamp_(0.0, 1.0)  # a rounded ratio may overshoot v / c by an ulp


# Each sample runs its four jitter ops in its own order. Rather than four full-batch passes of
# every op, the ops are scheduled on this fixed template of stages: every one of the 24 orders
# is a subsequence of it once adjacent saturation and hue share one HSV round trip (they
# commute, and neither leaves [0, 1], so TF's clip between them is a no-op). That halves the
# expensive HSV work: 2 round trips per batch instead of 4. Samples idle in a stage are left
# alone, so one code path serves every order.
JITTER_STAGES = ("affine", "hsv", "affine", "affine", "hsv", "affine")


def _schedule(order: tuple[int, ...]) -> tuple[int, ...]:
    """stage[op] for one order: each op at the first stage of its kind after the previous op's
    stage, except that saturation and hue share one HSV stage when adjacent in the order.
    len(JITTER_STAGES) (never run) where nothing fits, which no permutation needs."""
    stage, cursor, previous_hsv = [len(JITTER_STAGES)] * NUM_JITTER_OPS, -1, False
    for op in order:
        is_hsv = op >= SATURATION
        kind = "hsv" if is_hsv else "affine"
        if not (is_hsv and previous_hsv):
            later = range(cursor + 1, len(JITTER_STAGES))
            cursor = next((i for i in later if JITTER_STAGES[i] == kind), len(JITTER_STAGES))
        stage[op], previous_hsv = cursor, is_hsv
    return tuple(stage)


# _schedule of every order, indexed by its base-4 code order[0] * 64 + ... + order[3].
_STAGE_TABLE = tuple(
    _schedule(order) for order in itertools.product(range(NUM_JITTER_OPS), repeat=NUM_JITTER_OPS)
)
_CODE_WEIGHTS = tuple(NUM_JITTER_OPS ** (NUM_JITTER_OPS - 1 - p) for p in range(NUM_JITTER_OPS))


def jitter_stages(order: Tensor) -> Tensor:
    """Assigns each sample's jitter ops to template stages, respecting the sample's order.

    Args:
        order: int64 [B, 4], order[b, p] = op run at position p.

    Returns:
        int64 [B, 4], stage[b, op] = index into the stage template where sample b runs op.
    """
    code = (order * _constant(_CODE_WEIGHTS, order.device, order.dtype)).sum(dim=1)
    return _constant(_STAGE_TABLE, order.device, order.dtype).index_select(0, code)


def _color_jitter(x: Tensor, params: AugmentParams) -> Tensor:
    """color_jitter on a tensor the pipeline owns (updated in place on SUBSET_DEVICES)."""
    runs_in = params.jitter_applied.view(-1, 1, 1) & (
        jitter_stages(params.order).unsqueeze(2)
        == torch.arange(len(JITTER_STAGES), device=x.device)
    )  # [B, op, stage]
    for index, kind in enumerate(JITTER_STAGES):
        runs = runs_in[:, :, index]
        if kind == "affine":
            # Exact at identity and cheap: the whole batch costs less than gathering samples.
            use_b, use_c = runs[:, BRIGHTNESS], runs[:, CONTRAST]
            x = _affine_jitter(x, params.brightness, params.contrast, use_b, use_c)
        else:
            # Saturation alone skips the hue (the cheaper closed form); with hue, one round trip.
            use_s, use_h = runs[:, SATURATION], runs[:, HUE]
            saturation = torch.where(use_s, params.saturation, torch.ones_like(params.saturation))
            x = _apply_selected(x, use_h, _hsv_jitter, saturation, params.hue)
            x = _apply_selected(x, use_s & ~use_h, _saturation_jitter, params.saturation)
    return x


def color_jitter(x: Tensor, params: AugmentParams) -> Tensor:
    """Brightness, contrast, saturation and hue in each sample's own random order.

    Batched over samples (no Python loop over samples, no host-device sync on an accelerator);
    each op's result is clipped to [0, 1], as in the reference.

    Args:
        x: float32 images in [0, 1], [B, 3, H, W]; left unchanged.
        params: per-sample parameters from sample_params.

    Returns:
        Jittered float32 images in [0, 1]; samples with jitter_applied False are unchanged.
    """
    return _color_jitter(_own(x), params)


def _gray(x: Tensor) -> Tensor:
    """Luma on all three channels; updates x in place."""
    (gray,) = _planes(x, 1)
    r, g, b = x.unbind(dim=1)
    w_r, w_g, w_b = GRAYSCALE_WEIGHTS
    torch.mul(r, w_r, out=gray).add_(g, alpha=w_g).add_(b, alpha=w_b)
    return x.copy_(gray.unsqueeze(1).expand_as(x))


def to_grayscale(x: Tensor, apply: Tensor) -> Tensor:
    """Replaces the selected samples by their luma (0.2989 R + 0.5870 G + 0.1140 B) on 3 channels.

    Args:
        x: float32 images, [B, 3, H, W]; left unchanged.
        apply: bool [B], which samples turn gray.

    Returns:
        float32 images, [B, 3, H, W].
    """
    return _apply_selected(_own(x), apply, _gray)


def _blur_taps(sigma: Tensor, kernel_size: int, dtype: torch.dtype) -> Tensor:
    """Normalised Gaussian taps, [B, kernel_size], one kernel per sample."""
    radius = kernel_size // 2
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=dtype)
    kernel = torch.exp(-(taps**2) / (2.0 * sigma.to(dtype).view(-1, 1) ** 2))
    return kernel / kernel.sum(dim=1, keepdim=True)


def _shifted_sum(x: Tensor, kernel: Tensor, dim: int, out: Tensor) -> Tensor:
    """1-D correlation of x along `dim` with per-sample symmetric taps, zero padding ('SAME')."""
    radius = kernel.shape[1] // 2
    size = x.shape[dim]
    torch.mul(x, _per_sample(kernel[:, radius]), out=out)
    for shift in range(1, min(radius, size - 1) + 1):
        weight = _per_sample(kernel[:, radius + shift])  # = kernel[:, radius - shift]
        out.narrow(dim, 0, size - shift).addcmul_(x.narrow(dim, shift, size - shift), weight)
        out.narrow(dim, shift, size - shift).addcmul_(x.narrow(dim, 0, size - shift), weight)
    return out


def _blur_shifted(x: Tensor, kernel: Tensor) -> Tensor:
    """Separable blur as sums of shifted copies (2 * radius + 1 multiply-adds per direction)."""
    rows = _shifted_sum(x, kernel, dim=3, out=_scratch("op3", x.shape, x))
    return _shifted_sum(rows, kernel, dim=2, out=x)


def _blur_conv(x: Tensor, kernel: Tensor) -> Tensor:
    """Separable blur as two grouped conv2d, one depthwise group per (sample, channel)."""
    batch, channels, height, width = x.shape
    kernel_size = kernel.shape[1]
    radius = kernel_size // 2
    kernel = kernel.repeat_interleave(channels, dim=0).view(batch * channels, 1, 1, kernel_size)
    flat = x.reshape(1, batch * channels, height, width)
    flat = torch.nn.functional.conv2d(flat, kernel, padding=(0, radius), groups=batch * channels)
    flat = torch.nn.functional.conv2d(
        flat, kernel.transpose(2, 3), padding=(radius, 0), groups=batch * channels
    )
    return x.copy_(flat.view_as(x))


def _blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur, one kernel per sample; updates x in place.

    On a CPU the shifted sums beat the grouped conv2d at every size measured (7x at 3 taps and
    32 px, 2x at 23 taps and 224 px); on accelerators one conv kernel beats 2 * kernel_size passes.
    """
    kernel = _blur_taps(sigma, kernel_size, x.dtype)
    return _blur_shifted(x, kernel) if x.device.type == "cpu" else _blur_conv(x, kernel)


def gaussian_blur(x: Tensor, sigma: Tensor, apply: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma and zero ('SAME') padding.

    Zero padding follows DeepMind's reference (conv 'SAME'), so pixels within kernel_size // 2
    of the border darken; torchvision pads by reflection instead.

    Args:
        x: float32 images, [B, C, H, W]; left unchanged.
        sigma: float [B], per-sample standard deviation in pixels.
        apply: bool [B], which samples are blurred; the others are returned unchanged.
        kernel_size: odd number of taps.

    Returns:
        float32 images, [B, C, H, W].
    """
    return _gaussian_blur(_own(x), sigma, apply, kernel_size)


def _gaussian_blur(x: Tensor, sigma: Tensor, apply: Tensor, kernel_size: int) -> Tensor:
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size={kernel_size}: must be odd")
    if kernel_size == 1:
        return x
    return _apply_selected(x, apply, functools.partial(_blur, kernel_size=kernel_size), sigma)


def _solarized(x: Tensor, threshold: float) -> Tensor:
    """x < t ? x : 1 - x, updating x in place.

    As lerp(x, 1 - x, [x >= t]) with the 0/1 weight from sign() (torch.where and comparisons
    are slow on a CPU); lerp is exact at weights 0 and 1.
    """
    at_or_above = _scratch("op3", x.shape, x)
    torch.sub(x, threshold, out=at_or_above).sign_().add_(1.0).clamp_(max=1.0)
    flipped = torch.neg(x, out=_scratch("op", x.shape, x)).add_(1.0)
    return x.lerp_(flipped, at_or_above)


def solarize(x: Tensor, apply: Tensor, threshold: float) -> Tensor:
    """x < threshold ? x : 1 - x on the selected samples.

    Args:
        x: float32 images in [0, 1], [B, C, H, W]; left unchanged.
        apply: bool [B], which samples are solarised.
        threshold: solarisation threshold in [0, 1].

    Returns:
        float32 images, [B, C, H, W].
    """
    solarized = functools.partial(_solarized, threshold=threshold)
    return _apply_selected(_own(x), apply, solarized)


def normalize_channels(x: Tensor, view: ViewAugment) -> Tensor:
    """(x - mean) / std per channel with the view's statistics."""
    mean = _channel_constant(view.mean, x)
    std = _channel_constant(view.std, x)
    return (x - mean) / std


def _to_unit_float(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    # Always a new contiguous tensor: the pipeline updates it in place, plane by plane.
    if images.dtype == torch.uint8:
        return images.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    if images.is_floating_point():
        return images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
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
    with _cpu_threads(images_uint8.device):
        x = _to_unit_float(images_uint8)
        if params.batch_size != x.shape[0]:
            raise ValueError(
                f"params are for {params.batch_size} samples, images have {x.shape[0]}"
            )
        return _augment(x, params, view, normalize)


def _augment(x: Tensor, params: AugmentParams, view: ViewAugment, normalize: bool) -> Tensor:
    # x is the pipeline's own tensor: each op updates its samples in place (on a CPU, every
    # new full-size tensor costs page faults).
    x = _color_jitter(x, params)
    x = _apply_selected(x, params.grayscale, _gray)
    x = _gaussian_blur(x, params.blur_sigma, params.blur_applied, view.blur_kernel_size(x.shape[2]))
    threshold = view.solarize_threshold
    x = _apply_selected(x, params.solarize, functools.partial(_solarized, threshold=threshold))
    x = x.clamp_(0.0, 1.0)
    if normalize:
        x = x.sub_(_channel_constant(view.mean, x)).div_(_channel_constant(view.std, x))
    return x


def augment_view(
    images_uint8: Tensor, view: ViewAugment, generator: torch.Generator, normalize: bool = True,
    share: tuple[int, int] | None = None,
) -> Tensor:
    """Augments one BYOL view of a batch: sample_params followed by apply_params.

    Args:
        images_uint8: [B, 3, H, W] uint8, already cropped and flipped by the loader.
        view: VIEW1 or VIEW2 (or any ViewAugment).
        generator: seeded torch.Generator on the images' device.
        normalize: False returns the augmented image in [0, 1] before normalisation.
        share: (offset, global_batch) when the batch is one rank's chunk of a global batch, starting at
            ``offset`` (byol_ray.data.order.batch_share): the parameters are drawn for all global_batch
            samples and this rank keeps its rows, so a sample's augmentation does not depend on how many
            ranks share the batch.

    Returns:
        float32 [B, 3, H, W], normalised with the view's mean/std.
    """
    size = images_uint8.shape[0]
    offset, total = share if share is not None else (0, size)
    params = sample_params(total, view, generator, images_uint8.device)
    if total != size:
        params = params.rows(slice(offset, offset + size))
    return apply_params(images_uint8, params, view, normalize=normalize)
