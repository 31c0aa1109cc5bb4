"""Tests for byol_ray.augment: parameter statistics, golden values against independent references."""

import colorsys
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from byol_ray import augment
from byol_ray.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    VIEW1,
    VIEW2,
    AugmentParams,
    ViewAugment,
    apply_params,
    augment_view,
    sample_params,
)

STAT_BATCH = 20_000  # parameter-only checks are cheap; the binomial 5-sigma band is +-1.4 %
OUTPUT_BATCH = 4_000  # checks that run the full pipeline


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator(seed))


def no_op_params(batch: int) -> AugmentParams:
    """Parameters that leave every image unchanged; tests switch single ops on with replace()."""
    return AugmentParams(
        jitter_applied=torch.zeros(batch, dtype=torch.bool),
        order=torch.arange(4).repeat(batch, 1),
        brightness=torch.zeros(batch),
        contrast=torch.ones(batch),
        saturation=torch.ones(batch),
        hue=torch.zeros(batch),
        grayscale=torch.zeros(batch, dtype=torch.bool),
        blur_applied=torch.zeros(batch, dtype=torch.bool),
        blur_sigma=torch.ones(batch),
        solarize=torch.zeros(batch, dtype=torch.bool),
    )


def jitter_only(batch: int, **values: float) -> AugmentParams:
    """Jitter switched on for every sample, with the given op values and identity elsewhere."""
    params = no_op_params(batch)
    fields = {name: torch.full((batch,), float(v)) for name, v in values.items()}
    return dataclasses.replace(params, jitter_applied=torch.ones(batch, dtype=torch.bool), **fields)


def unit(images: torch.Tensor, params: AugmentParams, view: ViewAugment = VIEW1) -> torch.Tensor:
    return apply_params(images, params, view, normalize=False)


def assert_rate(flags: torch.Tensor, p: float) -> None:
    n = flags.numel()
    tolerance = 5 * math.sqrt(p * (1 - p) / n) + 1e-12
    rate = flags.float().mean().item()
    assert abs(rate - p) <= tolerance, f"rate {rate:.4f} vs p={p} (tolerance {tolerance:.4f})"


# ---------------------------------------------------------------------------------------------
# Independent per-image reference (NumPy float64, colorsys for HSV), following DeepMind's
# byol/utils/augmentations.py step by step.


def ref_brightness(x, delta):
    return np.clip(x + delta, 0, 1)


def ref_contrast(x, factor):
    mean = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - mean) * factor + mean, 0, 1)


def ref_hsv(x, hsv_fn):
    out = np.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*x[:, i, j])
            out[:, i, j] = colorsys.hsv_to_rgb(*hsv_fn(h, s, v))
    return np.clip(out, 0, 1)


def ref_saturation(x, factor):
    return ref_hsv(x, lambda h, s, v: (h, min(max(s * factor, 0.0), 1.0), v))


def ref_hue(x, delta):
    return ref_hsv(x, lambda h, s, v: ((h + delta) % 1.0, s, v))


def ref_blur(x, sigma, kernel_size):
    radius = kernel_size // 2
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(x, ((0, 0), (radius, radius), (radius, radius)))  # zeros, as 'SAME'
    _, height, width = x.shape
    rows = sum(kernel[t] * padded[:, :, t : t + width] for t in range(kernel_size))
    return sum(kernel[t] * rows[:, t : t + height, :] for t in range(kernel_size))


def ref_pipeline(image, params, b, view):
    """One sample through the whole recipe; image is float64 [3, H, W] in [0, 1]."""
    x = image.copy()
    if params.jitter_applied[b]:
        ops = {
            BRIGHTNESS: lambda x: ref_brightness(x, params.brightness[b].item()),
            CONTRAST: lambda x: ref_contrast(x, params.contrast[b].item()),
            SATURATION: lambda x: ref_saturation(x, params.saturation[b].item()),
            HUE: lambda x: ref_hue(x, params.hue[b].item()),
        }
        for op in params.order[b].tolist():
            x = ops[op](x)
    if params.grayscale[b]:
        x = np.repeat(np.tensordot([0.2989, 0.5870, 0.1140], x, axes=1)[None], 3, axis=0)
    if params.blur_applied[b]:
        x = ref_blur(x, params.blur_sigma[b].item(), view.blur_kernel_size(x.shape[1]))
    if params.solarize[b]:
        x = np.where(x < view.solarize_threshold, x, 1 - x)
    return np.clip(x, 0, 1)


# ---------------------------------------------------------------------------------------------
# ViewAugment


def test_view_defaults_are_the_paper_recipe():
    assert VIEW1 == ViewAugment()
    assert (VIEW1.color_jitter_prob, VIEW1.brightness, VIEW1.contrast) == (0.8, 0.4, 0.4)
    assert (VIEW1.saturation, VIEW1.hue, VIEW1.grayscale_prob) == (0.2, 0.1, 0.2)
    assert (VIEW1.blur_prob, VIEW1.blur_sigma, VIEW1.solarize_prob) == (1.0, (0.1, 2.0), 0.0)
    assert VIEW1.mean == (0.485, 0.456, 0.406) and VIEW1.std == (0.229, 0.224, 0.225)


def test_views_differ_only_in_blur_and_solarize_probability():
    view1, view2 = dataclasses.asdict(VIEW1), dataclasses.asdict(VIEW2)
    differing = {k for k in view1 if view1[k] != view2[k]}
    assert differing == {"blur_prob", "solarize_prob"}
    assert (VIEW2.blur_prob, VIEW2.solarize_prob) == (0.1, 0.2)


@pytest.mark.parametrize(
    "field, value",
    [
        ("color_jitter_prob", 1.5),
        ("grayscale_prob", -0.1),
        ("blur_prob", 2.0),
        ("solarize_prob", float("nan")),
        ("brightness", -0.1),
        ("contrast", 1.2),
        ("saturation", -1.0),
        ("hue", 0.6),
        ("blur_sigma", (0.0, 2.0)),
        ("blur_sigma", (2.0, 1.0)),
        ("blur_sigma", (0.1,)),
        ("blur_kernel_fraction", 0.0),
        ("solarize_threshold", 1.5),
        ("std", (0.2, 0.0, 0.2)),
        ("mean", (0.5, 0.5)),
    ],
)
def test_view_rejects_bad_values_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as excinfo:
        ViewAugment(**{field: value})
    message = str(excinfo.value)
    assert field in message and repr(value) in message


def test_view_accepts_lists_from_yaml_and_stores_tuples():
    view = ViewAugment(blur_sigma=[0.1, 2.0], mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert view.blur_sigma == (0.1, 2.0) and view.mean == (0.5, 0.5, 0.5)
    hash(view)


@pytest.mark.parametrize("height, size", [(224, 23), (32, 3), (96, 9), (64, 7), (220, 23), (8, 1)])
def test_blur_kernel_size_is_odd_tenth_of_the_side(height, size):
    assert VIEW1.blur_kernel_size(height) == size


# ---------------------------------------------------------------------------------------------
# Parameter statistics


@pytest.mark.parametrize("view", [VIEW1, VIEW2], ids=["view1", "view2"])
def test_each_op_fires_at_its_probability(view):
    params = sample_params(STAT_BATCH, view, generator(1))
    assert_rate(params.jitter_applied, view.color_jitter_prob)
    assert_rate(params.grayscale, view.grayscale_prob)
    assert_rate(params.blur_applied, view.blur_prob)
    assert_rate(params.solarize, view.solarize_prob)


def test_view1_never_solarises_and_view2_blur_is_rare():
    params = sample_params(STAT_BATCH, VIEW1, generator(2))
    assert not params.solarize.any()
    assert params.blur_applied.all()


@pytest.mark.parametrize("view", [VIEW1, VIEW2], ids=["view1", "view2"])
def test_parameters_cover_their_ranges(view):
    params = sample_params(STAT_BATCH, view, generator(3))
    lo, hi = view.blur_sigma
    ranges = {
        "brightness": (-view.brightness, view.brightness),
        "contrast": (1 - view.contrast, 1 + view.contrast),
        "saturation": (1 - view.saturation, 1 + view.saturation),
        "hue": (-view.hue, view.hue),
        "blur_sigma": (lo, hi),
    }
    for name, (low, high) in ranges.items():
        values = getattr(params, name)
        assert values.dtype == torch.float32 and values.shape == (STAT_BATCH,)
        assert values.min() >= low and values.max() <= high, name
        # Uniform over the whole interval: extremes near the ends, mean at the centre.
        width = high - low
        assert values.min() < low + 0.01 * width and values.max() > high - 0.01 * width, name
        std_of_mean = width / math.sqrt(12 * STAT_BATCH)
        assert abs(values.mean().item() - (low + high) / 2) < 5 * std_of_mean, name


def test_order_is_a_uniform_random_permutation_per_sample():
    params = sample_params(STAT_BATCH, VIEW1, generator(4))
    assert params.order.dtype == torch.int64 and params.order.shape == (STAT_BATCH, 4)
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()
    counts = {}
    for row in params.order.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) == set(itertools.permutations(range(4)))
    p = 1 / 24
    tolerance = 5 * math.sqrt(p * (1 - p) * STAT_BATCH)
    assert all(abs(c - STAT_BATCH * p) < tolerance for c in counts.values()), counts


def test_samples_draw_independent_parameters():
    params = sample_params(STAT_BATCH, VIEW2, generator(5))
    for name in ("brightness", "contrast", "saturation", "hue", "blur_sigma"):
        values = getattr(params, name)
        assert values[0] != values[1], name
        assert values.unique().numel() > 0.99 * STAT_BATCH, name
    # Different parameters of one sample are uncorrelated too.
    stacked = torch.stack([params.brightness, params.contrast, params.hue, params.blur_sigma])
    off_diagonal = torch.corrcoef(stacked) - torch.eye(4)
    assert off_diagonal.abs().max() < 5 / math.sqrt(STAT_BATCH)


# ---------------------------------------------------------------------------------------------
# Output-level behaviour


@pytest.mark.parametrize("view", [VIEW1, VIEW2], ids=["view1", "view2"])
def test_output_stays_in_unit_range_and_normalisation_is_affine(view):
    images = random_images(256, 16, 16)
    params = sample_params(256, view, generator(6))
    raw = unit(images, params, view)
    assert raw.dtype == torch.float32 and raw.min() >= 0 and raw.max() <= 1
    normalised = apply_params(images, params, view)
    mean = torch.tensor(view.mean).view(1, 3, 1, 1)
    std = torch.tensor(view.std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, (raw - mean) / std)


def test_ops_fire_on_the_output_at_their_probability():
    view = dataclasses.replace(VIEW2, blur_kernel_fraction=0.4)  # a 3-tap blur at 8 px
    images = random_images(OUTPUT_BATCH, 8, 8)
    params = sample_params(OUTPUT_BATCH, view, generator(7))
    out = unit(images, params, view)

    off = torch.zeros(OUTPUT_BATCH, dtype=torch.bool)
    for flag, p in [("jitter_applied", 0.8), ("grayscale", 0.2), ("blur_applied", 0.1), ("solarize", 0.2)]:
        fired = getattr(params, flag)
        without = unit(images, dataclasses.replace(params, **{flag: off}), view)
        changed = (without != out).flatten(1).any(dim=1)
        assert not (changed & ~fired).any(), flag
        # Cases where the op cannot show: a sigma near 0.1 rounds back to the input, and an
        # image darker than the threshold has nothing to solarise.
        visible = {
            "blur_applied": params.blur_sigma > 0.3,
            "solarize": without.flatten(1).max(dim=1).values > VIEW2.solarize_threshold,
        }.get(flag, fired)
        assert changed[fired & visible].all(), flag
        assert_rate(fired, p)
    # A grayscale sample has three equal channels; a coloured random image never does.
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(dim=1) & (out[:, 1] == out[:, 2]).flatten(1).all(dim=1)
    assert torch.equal(gray, params.grayscale)


def test_view1_output_equals_the_unsolarised_path():
    images = random_images(64, 16, 16)
    params = sample_params(64, VIEW1, generator(8))
    unsolarised = dataclasses.replace(params, solarize=torch.zeros(64, dtype=torch.bool))
    assert torch.equal(apply_params(images, params, VIEW1), apply_params(images, unsolarised, VIEW1))


def test_identical_images_in_one_batch_come_out_different():
    images = random_images(1, 24, 24).expand(8, -1, -1, -1)
    out = augment_view(images, VIEW1, generator(9))
    for i, j in itertools.combinations(range(8), 2):
        assert not torch.equal(out[i], out[j])


def test_same_seed_same_output_different_seed_different_output():
    images = random_images(16, 20, 20)
    first = augment_view(images, VIEW2, generator(10))
    assert torch.equal(first, augment_view(images, VIEW2, generator(10)))
    assert not torch.equal(first, augment_view(images, VIEW2, generator(11)))


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 3, 1, 1), (3, 3, 17, 23), (5, 3, 33, 9)])
def test_any_batch_size_and_odd_image_sizes(shape):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator(12))
    out = augment_view(images, VIEW1, generator(13))
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_output_carries_no_gradient_and_accepts_float_input():
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    out = augment_view(images, VIEW1, generator(14))
    assert not out.requires_grad
    with torch.no_grad():
        again = augment_view(images, VIEW1, generator(14))
    assert torch.equal(out, again)


def test_input_is_left_untouched():
    images = torch.rand(4, 3, 8, 8, generator=generator(27))
    before = images.clone()
    augment_view(images, VIEW2, generator(28))
    assert torch.equal(images, before)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="generator"):
        sample_params(4, VIEW1, generator(), device="meta")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        augment_view(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), VIEW1, generator())
    with pytest.raises(TypeError, match="uint8"):
        augment_view(torch.zeros(2, 3, 8, 8, dtype=torch.int32), VIEW1, generator())
    with pytest.raises(ValueError, match="samples"):
        apply_params(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), no_op_params(3), VIEW1)


def test_whole_pipeline_matches_the_per_image_reference():
    # Two samples per jitter order, the other flags and values drawn as in training.
    batch = 48
    images = random_images(batch, 11, 13, seed=15)
    params = sample_params(batch, VIEW2, generator(16))
    orders = torch.tensor(list(itertools.permutations(range(4)))).repeat(2, 1)
    on = torch.ones(batch, dtype=torch.bool)
    params = dataclasses.replace(params, order=orders, jitter_applied=on, blur_applied=on)
    view = dataclasses.replace(VIEW2, blur_kernel_fraction=0.5)  # 5 taps at 11 px: blur is visible
    out = unit(images, params, view).double().numpy()
    x = images.double().numpy() / 255
    expected = np.stack([ref_pipeline(x[b], params, b, view) for b in range(batch)])
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_every_order_is_scheduled_in_order_on_the_stage_template():
    orders = torch.tensor(list(itertools.permutations(range(4))))
    stages = augment.jitter_stages(orders)
    for order, stage in zip(orders.tolist(), stages.tolist()):
        sequence = [stage[op] for op in order]
        kinds = [augment.JITTER_STAGES[s] for s in sequence]
        assert kinds == ["hsv" if op in (SATURATION, HUE) else "affine" for op in order]
        for (op_a, s_a), (op_b, s_b) in zip(zip(order, sequence), zip(order[1:], sequence[1:])):
            # Strictly later, except saturation and hue sharing one HSV round trip.
            assert s_b > s_a or (s_b == s_a and {op_a, op_b} == {SATURATION, HUE}), (order, stage)


def test_jitter_order_matters():
    images = random_images(1, 8, 8, seed=17).expand(2, -1, -1, -1)
    params = jitter_only(2, brightness=0.3, contrast=0.5)
    params = dataclasses.replace(params, order=torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]]))
    out = unit(images, params)
    assert not torch.allclose(out[0], out[1])


# ---------------------------------------------------------------------------------------------
# Golden values for single ops


def test_brightness_is_additive_and_clipped():
    images = torch.tensor([0.2, 0.5, 0.8]).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    out = unit(images, jitter_only(3, brightness=0.3))
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([0.5, 0.8, 1.0]).view(3, 1).expand(3, 3))
    out = unit(images, jitter_only(3, brightness=-0.3))
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([0.0, 0.2, 0.5]).view(3, 1).expand(3, 3))


def test_contrast_scales_around_the_per_channel_mean():
    images = torch.rand(2, 3, 6, 5, generator=generator(18))
    out = unit(images, jitter_only(2, contrast=0.6))
    mean = images.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out, ((images - mean) * 0.6 + mean).clamp(0, 1))


def test_saturation_factor_zero_gives_gray_at_the_max_channel():
    images = torch.rand(2, 3, 5, 5, generator=generator(19))
    out = unit(images, jitter_only(2, saturation=0.0))
    # TF semantics: S=0 keeps V = max(R, G, B), unlike torchvision's luma blend.
    value = images.max(dim=1, keepdim=True).values.expand_as(images)
    torch.testing.assert_close(out, value)


def test_saturation_matches_colorsys():
    images = torch.rand(3, 3, 4, 4, generator=generator(20), dtype=torch.float64)
    for factor in (0.5, 1.2, 3.0):
        out = unit(images, jitter_only(3, saturation=factor)).double().numpy()
        expected = np.stack([ref_saturation(x, factor) for x in images.numpy()])
        np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize(
    "delta, rgb",
    [(1 / 3, (0.0, 1.0, 0.0)), (2 / 3, (0.0, 0.0, 1.0)), (-1 / 3, (0.0, 0.0, 1.0)), (1.0, (1.0, 0.0, 0.0))],
)
def test_hue_shift_of_pure_red(delta, rgb):
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    out = unit(red, jitter_only(1, hue=delta))
    torch.testing.assert_close(out.view(3), torch.tensor(rgb), atol=1e-6, rtol=0)


def test_hue_matches_colorsys_and_keeps_gray_pixels():
    images = torch.rand(4, 3, 4, 4, generator=generator(21), dtype=torch.float64)
    images[:, :, 0, 0] = 0.5  # gray: hue undefined, must stay put
    images[:, :, 0, 1] = 0.0  # black
    for delta in (-0.1, 0.05, 0.37):
        out = unit(images, jitter_only(4, hue=delta)).double().numpy()
        expected = np.stack([ref_hue(x, delta) for x in images.numpy()])
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_grayscale_weights():
    images = torch.rand(2, 3, 3, 3, generator=generator(22))
    params = dataclasses.replace(no_op_params(2), grayscale=torch.tensor([True, False]))
    out = unit(images, params)
    gray = 0.2989 * images[0, 0] + 0.5870 * images[0, 1] + 0.1140 * images[0, 2]
    torch.testing.assert_close(out[0], gray.expand(3, -1, -1))
    assert torch.equal(out[1], images[1])


def test_solarize_formula():
    values = torch.linspace(0, 1, 101).view(1, 1, 1, 101).expand(2, 3, 1, 101)
    params = dataclasses.replace(no_op_params(2), solarize=torch.tensor([True, False]))
    out = unit(values, params)
    torch.testing.assert_close(out[0], torch.where(values[0] < 0.5, values[0], 1 - values[0]))
    assert torch.equal(out[1], values[1])


def blur_params(batch: int, sigma: float) -> AugmentParams:
    on = torch.ones(batch, dtype=torch.bool)
    return dataclasses.replace(no_op_params(batch), blur_applied=on, blur_sigma=torch.full((batch,), sigma))


def test_blur_with_tiny_sigma_is_identity():
    images = random_images(2, 96, 96)
    out = unit(images, blur_params(2, 0.1))
    torch.testing.assert_close(out, images.float() / 255, atol=1e-6, rtol=0)


def test_blur_preserves_a_constant_image_away_from_the_zero_padded_border():
    images = torch.full((2, 3, 64, 64), 0.6)
    out = unit(images, blur_params(2, 2.0))
    radius = VIEW1.blur_kernel_size(64) // 2
    interior = out[:, :, radius:-radius, radius:-radius]
    torch.testing.assert_close(interior, torch.full_like(interior, 0.6))
    # Zero padding, as in the reference: the corner keeps only the in-image kernel mass.
    assert out[0, 0, 0, 0] < 0.6
    expected = ref_blur(images[0].double().numpy(), 2.0, 2 * radius + 1)
    np.testing.assert_allclose(out[0].double().numpy(), expected, atol=1e-6)


def test_blur_sigma_is_per_sample():
    images = random_images(1, 32, 32).expand(3, -1, -1, -1)
    params = dataclasses.replace(blur_params(3, 1.0), blur_sigma=torch.tensor([0.5, 1.0, 2.0]))
    params = dataclasses.replace(params, blur_applied=torch.tensor([True, True, False]))
    out = unit(images, params, ViewAugment(blur_kernel_fraction=0.3))
    k = ViewAugment(blur_kernel_fraction=0.3).blur_kernel_size(32)
    x = images[0].double().numpy() / 255
    for b, sigma in enumerate([0.5, 1.0]):
        np.testing.assert_allclose(out[b].double().numpy(), ref_blur(x, sigma, k), atol=1e-6)
    assert torch.equal(out[2], images[2].float() / 255)


def test_saturation_alone_matches_colorsys():
    # Saturation and hue apart in the order (S, B, H, C): saturation runs alone (closed form).
    images = torch.rand(3, 3, 5, 5, generator=generator(29), dtype=torch.float64)
    images[:, :, 0, 0] = 0.5  # gray
    images[:, :, 0, 1] = 0.0  # black
    for factor in (0.0, 0.5, 1.2, 3.0):
        params = jitter_only(3, saturation=factor)
        params = dataclasses.replace(params, order=torch.tensor([[2, 0, 3, 1]] * 3))
        out = unit(images, params).double().numpy()
        expected = np.stack([ref_saturation(x, factor) for x in images.numpy()])
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_wide_blur_kernel_matches_the_reference():
    # 25 taps on 48 px (the 224-px recipe's 23 taps and wider): every tap, zero padding included.
    view = ViewAugment(blur_kernel_fraction=0.5)
    images = random_images(2, 48, 48, seed=30)
    out = unit(images, blur_params(2, 1.7), view)
    x = images[0].double().numpy() / 255
    expected = ref_blur(x, 1.7, view.blur_kernel_size(48))
    np.testing.assert_allclose(out[0].double().numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("kernel_size", [3, 9, 23])
def test_blur_as_shifted_sums_equals_the_grouped_convolution(kernel_size):
    # The CPU path (shifted sums) and the accelerator path (grouped conv2d): the same correlation.
    x = torch.rand(4, 3, 20, 30, generator=generator(31))
    kernel = augment._blur_taps(torch.tensor([0.3, 0.9, 1.6, 2.0]), kernel_size, torch.float32)
    shifted = augment._blur_shifted(x.clone(), kernel)
    conv = augment._blur_conv(x.clone(), kernel)
    torch.testing.assert_close(shifted, conv, atol=1e-6, rtol=0)


@pytest.mark.parametrize("view", [VIEW1, VIEW2], ids=["view1", "view2"])
def test_masked_path_of_accelerators_equals_the_subset_path_of_cpus(view, monkeypatch):
    # CPUs run each op on the gathered samples that use it; accelerators on the batch, masked.
    images = random_images(96, 12, 12, seed=32)
    params = sample_params(96, view, generator(33))
    subset = apply_params(images, params, view)
    monkeypatch.setattr(augment, "SUBSET_DEVICES", ())
    masked = apply_params(images, params, view)
    torch.testing.assert_close(masked, subset, atol=1e-5, rtol=0)


def test_results_survive_later_calls():
    # Temporaries live in buffers reused between calls; no result may share them.
    first_images = random_images(32, 16, 16, seed=34)
    second_images = random_images(32, 16, 16, seed=35)
    first = augment_view(first_images, VIEW2, generator(36))
    kept = first.clone()
    augment_view(second_images, VIEW2, generator(37))
    augment_view(second_images[:5], VIEW1, generator(38))
    assert torch.equal(first, kept)


def test_single_op_functions_leave_their_input_untouched():
    images = torch.rand(8, 3, 10, 10, generator=generator(39))
    before = images.clone()
    params = sample_params(8, VIEW2, generator(40))
    on = torch.ones(8, dtype=torch.bool)
    outputs = [
        augment.color_jitter(images, dataclasses.replace(params, jitter_applied=on)),
        augment.to_grayscale(images, on),
        augment.gaussian_blur(images, params.blur_sigma, on, 3),
        augment.solarize(images, on, 0.5),
    ]
    assert torch.equal(images, before)
    assert all(not torch.equal(out, images) for out in outputs)


def test_channels_last_input_gives_the_same_output():
    images = random_images(8, 16, 16, seed=41)
    params = sample_params(8, VIEW1, generator(42))
    expected = apply_params(images, params, VIEW1)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(apply_params(channels_last, params, VIEW1), expected, atol=0, rtol=0)


def test_cpu_path_runs_on_its_own_thread_count_and_restores_the_callers(monkeypatch):
    seen = []
    gray = augment._gray
    monkeypatch.setattr(augment, "_gray", lambda x: (seen.append(torch.get_num_threads()), gray(x))[1])
    params = dataclasses.replace(no_op_params(4), grayscale=torch.ones(4, dtype=torch.bool))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = apply_params(random_images(4, 8, 8), params, VIEW1)
        assert seen == [augment.CPU_THREADS] and torch.get_num_threads() == 2
        monkeypatch.setattr(augment, "CPU_THREADS", None)  # follow the caller's count
        assert torch.equal(apply_params(random_images(4, 8, 8), params, VIEW1), out)
        assert seen[-1] == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# torchvision agrees where its semantics are the same


tvf = pytest.importorskip("torchvision.transforms.v2.functional")


def test_hue_agrees_with_torchvision():
    images = torch.rand(4, 3, 16, 16, generator=generator(23))
    for delta in (-0.5, -0.1, 0.07, 0.3):
        ours = unit(images, jitter_only(4, hue=delta))
        torch.testing.assert_close(ours, tvf.adjust_hue(images, delta), atol=1e-5, rtol=0)


def test_grayscale_agrees_with_torchvision():
    images = torch.rand(2, 3, 8, 8, generator=generator(24))
    params = dataclasses.replace(no_op_params(2), grayscale=torch.ones(2, dtype=torch.bool))
    expected = tvf.rgb_to_grayscale(images, num_output_channels=3)
    torch.testing.assert_close(unit(images, params), expected, atol=1e-6, rtol=0)


def test_solarize_agrees_with_torchvision():
    images = torch.rand(2, 3, 8, 8, generator=generator(25))
    params = dataclasses.replace(no_op_params(2), solarize=torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(unit(images, params), tvf.solarize(images, 0.5))


def test_blur_agrees_with_torchvision_away_from_the_border():
    # torchvision pads by reflection, the reference with zeros: compare the interior only.
    images = torch.rand(2, 3, 40, 40, generator=generator(26))
    out = unit(images, blur_params(2, 1.3), ViewAugment(blur_kernel_fraction=0.2))
    k = ViewAugment(blur_kernel_fraction=0.2).blur_kernel_size(40)
    expected = tvf.gaussian_blur(images, [k, k], [1.3, 1.3])
    r = k // 2
    torch.testing.assert_close(out[..., r:-r, r:-r], expected[..., r:-r, r:-r], atol=1e-6, rtol=0)


def test_module_stays_free_of_cluster_dependencies():
    source = open(augment.__file__).read()
    for name in ("ray", "mlflow", "ffcv"):
        assert f"import {name}" not in source and f"from {name}" not in source
