"""data.loader=memory: the data set on the device, crops and flips batched (run here on the CPU device)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from byol_ray.config import ConfigError, derive, load_config
from byol_ray.data import check_training_data
from byol_ray.data.loaders import build_train_loader
from byol_ray.data.memory import load_to_device, resized_crops
from byol_ray.data.order import CROP_DRAWS, CROP_LAWS, CropLaw, crop_box, crop_boxes, shard_order
from byol_ray.data.sources import open_source

CPU = torch.device("cpu")


def _images(b=3, h=24, w=32, seed=0):
    return torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_whole_image_box_is_identity_and_flip_mirrors():
    square = _images(h=32, w=32)
    full = torch.tensor([[0, 0, 32, 32]] * 3, dtype=torch.float32)
    assert torch.equal(resized_crops(square, full, torch.zeros(3, dtype=torch.bool), 32), square)
    assert torch.equal(resized_crops(square, full, torch.ones(3, dtype=torch.bool), 32), square.flip(-1))


def test_same_size_crop_is_the_exact_pixels_of_the_box():
    images = _images(h=32, w=32)
    boxes = torch.tensor([[4, 8, 16, 16], [0, 16, 16, 16], [16, 0, 16, 16]], dtype=torch.float32)
    out = resized_crops(images, boxes, torch.tensor([False, True, False]), 16)
    assert torch.equal(out[0], images[0, :, 4:20, 8:24])
    assert torch.equal(out[1], images[1, :, 0:16, 16:32].flip(-1))
    assert torch.equal(out[2], images[2, :, 16:32, 0:16])


def _uniforms(n, seed):
    return torch.rand((n, CROP_DRAWS), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("law", CROP_LAWS)
def test_batched_law_is_the_scalar_law_draw_for_draw(law):
    """crop_boxes (memory loader) and crop_box (torch loader as is, FFCV decoder compiled) on the same uniforms."""
    u = _uniforms(4000, 3)
    for height, width, scale, ratio in ((32, 48, (0.08, 1.0), (3 / 4, 4 / 3)), (375, 500, (0.3, 0.9), (0.5, 2.0))):
        crop = CropLaw(law, scale, ratio)
        batched = crop_boxes(u, height, width, crop).numpy().astype(np.int64)
        scalar = np.array([crop_box(row, height, width, *crop.args()) for row in u.numpy()])
        assert np.array_equal(batched, scalar)
        top, left, h, w = batched.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        assert (h >= 1).all() and (w >= 1).all()


def test_laws_differ_where_a_crop_does_not_fit():
    """Torchvision rejects a crop wider or taller than the image (ten tries, then the centred fallback);
    the reference clamps its sides to the image. Seeded: the same generator state, the same boxes."""
    tall = crop_boxes(_uniforms(5, 0), 100, 10, CropLaw("torchvision", (0.9, 1.0)))
    assert torch.equal(tall, torch.tensor([[43.0, 0.0, 13.0, 10.0]] * 5, dtype=torch.float64))
    clamped = crop_boxes(_uniforms(500, 0), 100, 10, CropLaw("reference", (0.9, 1.0)))
    assert (clamped[:, 3] == 10).all() and (clamped[:, 2] >= 26).all() and (clamped[:, 2] <= 37).all()
    assert len(set(clamped[:, 0].tolist())) > 20  # placed anywhere along the strip, not centred
    assert torch.equal(crop_boxes(_uniforms(50, 4), 32, 48, CropLaw()), crop_boxes(_uniforms(50, 4), 32, 48, CropLaw()))
    with pytest.raises(ValueError, match="crop_law='paper'.*'reference', 'torchvision'"):
        CropLaw("paper")


def test_loader_shards_disjointly_and_repeats_an_epoch_exactly():
    src = open_source("demo")
    ranks = [build_train_loader("demo", backend="memory", batch_size=64, resolution=32, seed=1, distributed=True,
                                rank=r, world_size=2) for r in range(2)]
    assert all(len(loader) == (len(src) // 2) // 64 for loader in ranks)
    seen = []
    for loader in ranks:
        loader.set_epoch(0)
        labels = torch.cat([batch[2] for batch in loader])
        seen.append(labels)
    assert sum(len(s) for s in seen) == 2 * len(ranks[0]) * 64
    loader = ranks[0]
    loader.set_epoch(2)
    first = [tuple(t.clone() for t in batch) for batch in loader]
    loader.set_epoch(2)
    second = [tuple(t.clone() for t in batch) for batch in loader]
    loader.set_epoch(3)
    third = next(iter(loader))
    v1, v2, labels = first[0]
    assert v1.dtype == torch.uint8 and v1.shape == (64, 3, 32, 32) and not torch.equal(v1, v2)
    assert all(torch.equal(a, b) for x, y in zip(first, second) for a, b in zip(x, y))
    assert not torch.equal(third[0], v1)


def test_shards_hold_disjoint_images():
    images, labels = load_to_device(open_source("demo"), CPU)
    assert images.shape == (1797, 3, 32, 32) and labels.shape == (1797,)
    a = shard_order(1797, 0, seed=1, shuffle=True, rank=0, world_size=2)
    b = shard_order(1797, 0, seed=1, shuffle=True, rank=1, world_size=2)
    assert not set(a.tolist()) & set(b.tolist())


def test_memory_loader_trains_and_rejects_a_beton(tmp_path):
    from byol_ray.engine import fit

    cfg = load_config(["demo"], ["data.loader=memory", "train.epochs=1", "train.batch_size=128",
                                 "model.projector_hidden_dim=128", "model.predictor_hidden_dim=128",
                                 "mlflow.enabled=false", f"output_dir={tmp_path}"])
    loader = build_train_loader("demo", backend="memory", batch_size=128, resolution=32, seed=0)
    result = fit(cfg, derive(cfg, loader.num_samples, 1), loader, CPU)
    assert result.steps == 1797 // 128 and np.isfinite(result.metrics["epoch_loss"])

    beton = tmp_path / "x.beton"
    beton.write_bytes(b"\0")
    with pytest.raises(ConfigError, match="data.loader=memory reads source images"):
        check_training_data(str(beton), "memory")


def test_mixed_image_sizes_fail_with_the_fix(tmp_path):
    from PIL import Image

    for cls, size in (("a", (32, 32)), ("b", (40, 32))):
        (tmp_path / cls).mkdir()
        Image.new("RGB", size, (10, 20, 30)).save(tmp_path / cls / "x.png")
    with pytest.raises(ValueError, match="every image must be .*use data.loader=ffcv"):
        load_to_device(open_source(str(tmp_path)), CPU)
