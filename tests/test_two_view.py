"""The FFCV two-view decoder: one decode per image, crops and flips seeded by (seed, epoch, index, view)."""

import importlib.util
import os

import numpy as np
import pytest
import torch

# As in test_data.py: these tests time compilation, not decoding (only effective before numba's import).
os.environ.setdefault("NUMBA_OPT", "0")

from byol_ray.data.loaders import TwoViewEpochLoader, build_train_loader  # noqa: E402
from byol_ray.data.order import CROP_DRAWS, CROP_LAWS, CropLaw, crop_box, crop_boxes  # noqa: E402
from byol_ray.data.prepare import prepare  # noqa: E402
from byol_ray.data.sources import ArraySource  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="FFCV is not installed")

N = 50  # samples; batch 16 without drop_last leaves a last batch of 2
SIDE = 64
_KEEP: list = []  # FFCV loaders live until exit (numba's finaliser complains if they are collected mid-run)


def _kept(loader):
    _KEEP.append(loader)
    return loader


def coordinate_images(n: int = N) -> ArraySource:
    """Red/green = pixel x/y (x4), blue = 2 x sample index: a crop's pixels say where it was cut and from what."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    images = np.empty((n, SIDE, SIDE, 3), dtype=np.uint8)
    images[..., 0], images[..., 1] = x * 4, y * 4
    images[..., 2] = (2 * np.arange(n))[:, None, None]
    return ArraySource(images, np.arange(n), [str(i) for i in range(n)], name="coordinates")


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """(raw .beton, mixed raw/JPEG .beton, {label: stored index} of the raw one)."""
    from ffcv.reader import Reader

    root = tmp_path_factory.mktemp("two-view")
    raw, mixed = root / "raw.beton", root / "mixed.beton"
    prepare(coordinate_images(), raw, compress_probability=0.0, num_workers=1, progress=False)
    prepare(coordinate_images(), mixed, compress_probability=0.5, num_workers=1, progress=False)
    modes = Reader(str(mixed)).metadata["f0"]["mode"]
    assert 0 < modes.sum() < N, "the mixed file should hold both JPEG (0) and raw (1) samples"
    stored_labels = np.array(Reader(str(raw)).metadata["f1"], dtype=np.int64).ravel()
    return raw, mixed, {int(label): i for i, label in enumerate(stored_labels)}


def _epoch(loader, epoch=None, stop_after=None):
    """(view1, view2, labels) of one epoch, cloned (FFCV reuses its buffers)."""
    if epoch is not None:
        loader.set_epoch(epoch)
    out = []
    for i, (a, b, lab) in enumerate(loader):
        out.append((a.clone(), b.clone(), lab.clone()))
        if stop_after is not None and i + 1 == stop_after:
            break
    return [torch.cat(t) for t in zip(*out)]


def _geometry(view: torch.Tensor):
    """(area fraction, aspect w/h, flipped) of a crop of a coordinate image, from its pixels."""
    r, g = view[0].float(), view[1].float()
    side_x, side_y = (r.max() - r.min()).item() / 4 + 1, (g.max() - g.min()).item() / 4 + 1
    return side_x * side_y / SIDE ** 2, side_x / side_y, bool(r[:, 0].mean() > r[:, -1].mean())


def test_loaders_agree_bit_for_bit_whatever_the_threads_or_history(betons):
    """A 'resumed' loader (fresh, 1 thread, straight to epoch 1) repeats an 'uninterrupted' one
    (2 threads, a broken-off epoch 0, then epoch 1 by plain re-iteration) exactly, on raw and JPEG samples."""
    _, mixed, _ = betons
    kwargs = dict(batch_size=16, resolution=24, seed=11, crop_scale=(0.2, 1.0))
    resumed = _kept(build_train_loader(mixed, num_workers=1, **kwargs))
    straight = _kept(build_train_loader(mixed, num_workers=2, **kwargs))
    first = _epoch(straight, 0, stop_after=1)  # left early: FFCV's producer thread is stopped mid-epoch
    assert len(first[2]) == 16
    straight.set_epoch(0)
    list(straight)  # a full epoch 0; the next plain iteration serves epoch 1
    got = _epoch(straight)
    want = _epoch(resumed, 1)
    assert all(torch.equal(g, w) for g, w in zip(got, want)), "same seed and epoch gave different views"
    assert straight.epoch == resumed.epoch == 2
    # Another seed, other views.
    other = _kept(build_train_loader(mixed, num_workers=1, **{**kwargs, "seed": 12}))
    assert not torch.equal(_epoch(other, 1)[0], want[0])


def test_views_are_the_seeded_crops_exactly(betons):
    """Every view equals OpenCV INTER_AREA resize of view_params' box, flipped as drawn; labels stay with
    their images; epochs reach the compiled code; a short last batch is laid out right."""
    import cv2

    from byol_ray.data.two_view import view_params

    raw, _, stored_index = betons
    images = coordinate_images().images
    loader = _kept(build_train_loader(raw, batch_size=16, resolution=24, seed=5, num_workers=2, drop_last=False,
                                      crop_scale=(0.1, 0.9), crop_ratio=(0.6, 1.5), flip_prob=0.4))
    assert len(loader) == 4  # 16 + 16 + 16 + 2
    for epoch in (3, 0):
        view1, view2, labels = _epoch(loader, epoch)
        assert sorted(labels.tolist()) == list(range(N)) and labels.dtype == torch.int64
        for view, views in enumerate((view1, view2)):
            assert views.shape == (N, 3, 24, 24) and views.dtype == torch.uint8 and views.is_contiguous()
            assert (views[:, 2, 0, 0] == 2 * labels).all()  # each view comes from its label's image
            for image, label in zip(views, labels.tolist()):
                top, left, h, w, flip = view_params(5, epoch, stored_index[label], view, SIDE, SIDE,
                                                    (0.1, 0.9), (0.6, 1.5), 0.4)
                want = cv2.resize(np.ascontiguousarray(images[label, top:top + h, left:left + w]), (24, 24),
                                  interpolation=cv2.INTER_AREA)
                want = want[:, ::-1] if flip else want
                assert np.array_equal(image.permute(1, 2, 0).numpy(), want), (epoch, view, label)


def test_epochs_and_views_differ_and_crops_follow_the_configuration(betons):
    raw, _, _ = betons
    loader = _kept(build_train_loader(raw, batch_size=16, resolution=32, seed=3, num_workers=2, flip_prob=0.3))
    epochs = [_epoch(loader, e) for e in range(4)]
    same = {}  # label -> [its view1 in epoch 0, in epoch 1] (each epoch drops 2 of the 50 samples)
    for view1, _, labels in epochs[:2]:
        for view, label in zip(view1, labels.tolist()):
            same.setdefault(label, []).append(view)
    pairs = [v for v in same.values() if len(v) == 2]
    assert len(pairs) >= 46
    changed = np.mean([not torch.equal(a, b) for a, b in pairs])
    assert changed > 0.9, f"epoch 1 repeated epoch 0's crops for {1 - changed:.0%} of the samples"
    for view1, view2, labels in epochs:
        assert (view1 != view2).flatten(1).any(1).float().mean() > 0.9, "the two views coincide"
        assert (view1[:, 2, 0, 0] == 2 * labels).all() and (view2[:, 2, 0, 0] == 2 * labels).all()
    geometry = [_geometry(v) for e in epochs for v in torch.cat(e[:2])]
    areas, aspects, flips = (np.array(x) for x in zip(*geometry))
    assert len(areas) == 4 * 2 * 48
    assert areas.min() > 0.06 and areas.max() < 1.05 and aspects.min() > 0.7 and aspects.max() < 1.45
    assert areas.min() < 0.15 and areas.max() > 0.8, "crops do not span the configured 0.08..1 area range"
    assert 0.22 < flips.mean() < 0.38, f"flip rate {flips.mean():.2f}, configured 0.3"


@pytest.mark.parametrize("law", CROP_LAWS)
def test_decoder_draws_are_the_batched_law_draw_for_draw(law):
    """The numba-compiled crop law of the decoder (view_params) and the batched torch law (crop_boxes, the
    memory loader's) give the same box from the same SplitMix64 uniforms, for every view drawn; boxes lie
    inside the image, flips come at flip_prob, and views, epochs and samples all draw afresh."""
    from byol_ray.data.two_view import view_params, view_uniforms

    height, width, scale, ratio = 300, 400, (0.3, 0.9), (0.5, 2.0)  # many torchvision tries miss
    keys = [(e, i, v) for e in range(2) for i in range(1000) for v in range(2)]
    params = np.array([view_params(7, e, i, v, height, width, scale, ratio, 0.25, law) for e, i, v in keys])
    uniforms = np.stack([view_uniforms(7, e, i, v) for e, i, v in keys])
    batched = crop_boxes(torch.from_numpy(uniforms[:, :CROP_DRAWS]), height, width, CropLaw(law, scale, ratio))
    assert np.array_equal(params[:, :4], batched.numpy().astype(np.int64))
    assert np.array_equal(params[:, 4], uniforms[:, CROP_DRAWS] < 0.25)
    top, left, h, w, flip = params.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert abs(flip.mean() - 0.25) < 0.02
    assert np.histogram(left / (width - w + 1), bins=4, range=(0, 1))[0].min() > 800  # placed uniformly
    assert len({tuple(b) for b in params}) > 0.9 * len(params)
    assert view_params(7, 0, 0, 0, height, width, scale, ratio, 0.25, law) == tuple(params[0])  # repeatable


def test_torchvision_law_falls_back_to_the_centred_crop_and_reference_clamps():
    """A 10 x 1000 strip cannot hold 90 % of its area at aspect <= 4/3: every torchvision try misses and the
    largest centred crop within the ratio range is cut; the reference law clamps the height to the strip."""
    from byol_ray.data.two_view import view_params

    strip = (10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), 0.0)
    assert view_params(0, 0, 0, 0, *strip, "torchvision")[:4] == (0, 493, 10, 13)
    assert view_params(0, 0, 0, 0, 1000, 10, *strip[2:], "torchvision")[:4] == (493, 0, 13, 10)
    top, left, h, w, _ = view_params(0, 0, 0, 0, *strip, "reference")
    assert h == 10 and 95 <= w <= 110 and top == 0  # sqrt(0.9..1 * 10000 * 3/4..4/3), then h = min(h, 10)
    u = np.random.default_rng(0).random(CROP_DRAWS)
    assert crop_box(u, 10, 1000, *CropLaw("torchvision", (0.9, 1.0)).args()) == (0, 493, 10, 13)


def test_views_to_device_handles_the_view_major_layout(betons):
    """ViewsToDevice (used for CUDA) run with a CPU target: the same views as without it."""
    from byol_ray.data.two_view import (FFCVBatches, TwoViewBatches, ViewsToDevice, ffcv_label_ops, ffcv_loader,
                                        two_view_image_ops)

    raw, _, _ = betons
    ops, decoder = two_view_image_ops(16, law=CropLaw(), flip_prob=0.5, seed=2, device=torch.device("cpu"))
    pipelines = {"image": ops + [ViewsToDevice(torch.device("cpu"))], "label": ffcv_label_ops(torch.device("cpu"))}
    shard = dict(seed=2, shuffle=True, rank=0, world_size=1, drop_last=True)
    loader, n = ffcv_loader(raw, batch_size=16, num_workers=1, drop_last=False, pipelines=pipelines, shard=shard)
    with_op = _kept(TwoViewEpochLoader(TwoViewBatches(FFCVBatches(loader), decoder), backend="ffcv",
                                       batch_size=16, num_samples=n))
    plain = _kept(build_train_loader(raw, batch_size=16, resolution=16, seed=2, num_workers=1, drop_last=False))
    a, b = _epoch(with_op, 1), _epoch(plain, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].is_contiguous() and len(a[2]) == N
