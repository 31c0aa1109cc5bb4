"""Data layer on real images and real FFCV files: sources, prepare, the two-view and eval loaders."""

import errno
import importlib.util
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# FFCV compiles every loader's pipeline with numba; without LLVM optimisation that takes a third
# of the time, and these tests time compilation, not decoding. Only effective if numba was not
# imported earlier in the session.
os.environ.setdefault("NUMBA_OPT", "0")

from byol_ray.data.demo import load_demo
from byol_ray.config import ConfigError
from byol_ray.data import check_training_data
from byol_ray.data.check import validate_beton
from byol_ray.data.loaders import build_eval_loader, build_train_loader
from byol_ray.data.order import CROP_DRAWS, CROP_LAWS, CropLaw, crop_boxes, shard_order
from byol_ray.data.prepare import PrepareError, label_subset_indices, prepare, val_path_for
from byol_ray.data.sources import ArraySource, ImageFolderSource, fingerprint, open_source

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"
PER_CLASS = 10
needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None,
                                reason="FFCV is not installed (the torch-backend tests still run)")
BACKENDS = [pytest.param("ffcv", marks=needs_ffcv), "torch"]
# numba's dispatcher finaliser raises a harmless KeyError when an FFCV loader's compiled helpers are
# garbage-collected mid-run (at exit it skips itself): FFCV loaders built here live until exit.
_FFCV_LOADERS: list = []


def _kept(loader):
    if loader.backend == "ffcv":
        _FFCV_LOADERS.append(loader)
    return loader


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def cifar_jpegs(tmp_path_factory) -> dict[str, list[Path]]:
    """The first PER_CLASS real CIFAR-10 train JPEGs of the first three classes in the archive."""
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs not found at {ARCHIVE} (../shared/datasets beside the repo)")
    out = tmp_path_factory.mktemp("cifar10-jpg")
    found: dict[str, list[Path]] = {}
    with tarfile.open(ARCHIVE) as tar:
        for member in tar:  # stream: stop as soon as three classes are complete
            parts = member.name.split("/")
            if not (member.isfile() and parts[0] == "train" and len(parts) == 3):
                continue
            files = found.setdefault(parts[1], [])
            if len(files) < PER_CLASS and (len(found) <= 3):
                target = out / parts[1] / parts[2]
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                files.append(target)
            if len(found) >= 3 and all(len(v) == PER_CLASS for v in list(found.values())[:3]):
                break
    return dict(list(found.items())[:3])


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="session")
def image_folder(cifar_jpegs, tmp_path_factory):
    """An ImageFolder of real JPEGs plus the awkward cases; returns (root, {label: [expected RGB]})."""
    root = tmp_path_factory.mktemp("folder")
    classes = sorted(cifar_jpegs)
    expected = {i: [] for i in range(len(classes))}
    for label, cls in enumerate(classes):
        (root / cls).mkdir()
        for src in cifar_jpegs[cls][:6]:
            (root / cls / src.name).write_bytes(src.read_bytes())
            expected[label].append(_rgb(src))
    a, b, c = classes
    spare = cifar_jpegs[a][6:]
    grey = Image.open(spare[0]).convert("L")
    grey.save(root / a / "grey.png")
    expected[0].append(np.repeat(np.asarray(grey)[..., None], 3, axis=-1))
    Image.open(spare[1]).convert("CMYK").save(root / a / "cmyk.jpg", quality=95)  # as print workflows write them
    expected[0].append(_rgb(root / a / "cmyk.jpg"))
    rgba = Image.open(spare[2]).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / b / "alpha.png")
    expected[1].append(np.asarray(rgba.convert("RGB")))
    palette = Image.open(spare[3]).convert("P", palette=Image.ADAPTIVE)
    palette.save(root / b / "palette.png")
    expected[1].append(np.asarray(palette.convert("RGB")))
    data = cifar_jpegs[c][0].read_bytes()
    (root / c / "truncated.jpg").write_bytes(data[: len(data) // 2])  # corrupt: cut mid-stream
    (root / c / "fake.jpg").write_bytes(b"this is not a JPEG")
    (root / c / "notes.txt").write_text("not an image")
    (root / c / ".DS_Store").write_bytes(b"\0\0")
    return root, expected


def _read_raw(path) -> tuple[list[np.ndarray], np.ndarray]:
    """Stored images and labels of a raw-mode .beton, read straight from the file (no decoding)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    images = []
    for meta in reader.metadata["f0"]:
        assert meta["mode"] == 1, "expected raw storage"
        size = int(meta["height"]) * int(meta["width"]) * 3
        ptr = int(meta["data_ptr"])
        images.append(np.array(data[ptr: ptr + size]).reshape(int(meta["height"]), int(meta["width"]), 3))
    return images, np.array(reader.metadata["f1"], dtype=np.int64)


@pytest.fixture(scope="session")
def tagged_demo() -> ArraySource:
    """The real digits with each image's index written into pixel (0, 0), so stored samples can be identified."""
    images, labels, names = load_demo()
    images = images.copy()
    index = np.arange(len(images))
    images[:, 0, 0, 0], images[:, 0, 0, 1] = index // 256, index % 256
    return ArraySource(images, labels, names, name="tagged-demo")


def _tags(images) -> list[int]:
    return [int(im[0, 0, 0]) * 256 + int(im[0, 0, 1]) for im in images]


N_COORD = 97  # odd, so distributed shares are uneven unless trimmed


def coordinate_source() -> ArraySource:
    """64x64 images whose red/green channels are the pixel's x/y (x4) and blue the sample index (x2):
    from a crop's pixels one can read back where it was cut, how big it was, and which image it came from."""
    y, x = np.mgrid[0:64, 0:64]
    images = np.empty((N_COORD, 64, 64, 3), dtype=np.uint8)
    images[..., 0], images[..., 1] = x * 4, y * 4
    images[..., 2] = (2 * np.arange(N_COORD))[:, None, None]
    return ArraySource(images, np.arange(N_COORD), [str(i) for i in range(N_COORD)], name="coordinates")


@pytest.fixture(scope="module")
def coord_beton(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coord") / "coord.beton"
    prepare(coordinate_source(), out, compress_probability=0.0, num_workers=1, progress=False)
    return out


def _crop_geometry(view: torch.Tensor):
    """(area fraction, aspect w/h, flipped) of a crop of a coordinate image, from its pixel values."""
    r, g = view[0].float(), view[1].float()
    side_x = (r.max() - r.min()).item() / 4 + 1
    side_y = (g.max() - g.min()).item() / 4 + 1
    flipped = r[:, 0].mean() > r[:, -1].mean()
    return side_x * side_y / 64 ** 2, side_x / side_y, bool(flipped)


def _collect(loader, epoch: int):
    loader.set_epoch(epoch)
    out = [(a.clone(), b.clone(), lab.clone()) for a, b, lab in loader]  # FFCV reuses batch buffers
    return [torch.cat(t) for t in zip(*out)]


# ------------------------------------------------------------------------------------ sources


def test_demo_set_is_real_digits_as_rgb():
    images, labels, names = load_demo()
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10)) and names[3] == "3"
    assert (images[..., 0] == images[..., 2]).all() and images.max() == 255 and images.min() == 0
    assert load_demo(size=8)[0].shape == (1797, 8, 8, 3)


def test_demo_set_is_read_without_importing_scikit_learn_and_equals_load_digits():
    code = ("import sys; from byol_ray.data.demo import _digits; scans, target = _digits(); "
            "print(scans.shape, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1797,", "8,", "8)", "False"], out
    from sklearn.datasets import load_digits

    from byol_ray.data.demo import _digits

    digits, (scans, target) = load_digits(), _digits()
    assert scans.dtype == digits.images.dtype and np.array_equal(scans, digits.images)
    assert np.array_equal(target, digits.target)


def test_bad_sources_fail_with_clear_errors(tmp_path, cifar_jpegs):
    with pytest.raises(FileNotFoundError, match="does not exist.*'demo'"):
        open_source(tmp_path / "nope")
    with pytest.raises(ValueError, match="empty folder"):
        open_source(tmp_path)
    (tmp_path / "loose.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="no class folders.*one folder per class"):
        open_source(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(next(iter(cifar_jpegs.values()))[0].read_bytes())
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*dog holds no images"):
        open_source(tmp_path)
    with pytest.raises(ValueError, match="only the 'train' split"):
        open_source("demo", split="test")


def test_split_folders_and_fingerprint(tmp_path, image_folder):
    root, _ = image_folder
    (tmp_path / "train").symlink_to(root, target_is_directory=True)
    (tmp_path / "val").mkdir()
    src = open_source(tmp_path, split="train")
    assert isinstance(src, ImageFolderSource) and src.root == root.resolve()
    with pytest.raises(ValueError, match="holds the splits.*not 'test'"):
        open_source(tmp_path, split="test")
    fp = fingerprint(root)
    assert fp["num_files"] == len(src) == 3 * 6 + 4 + 2 and fp["class_names"] == src.class_names
    assert fp["skipped_files"] == {"not_image": 1, "hidden": 1}
    assert len(fp["sha256"]) == 64 and fingerprint(root) == fp
    (root / src.class_names[0] / "x.png").write_bytes(b"12345")
    try:
        assert fingerprint(root)["sha256"] != fp["sha256"]  # a new file changes the listing
    finally:
        (root / src.class_names[0] / "x.png").unlink()


def test_cifar_python_folder(tmp_path, cifar_jpegs):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    classes = sorted(cifar_jpegs)
    images = np.stack([_rgb(p) for c in classes for p in cifar_jpegs[c][:4]])
    labels = [i for i in range(len(classes)) for _ in range(4)]
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR rows are CHW planes
    for name, rows in (("data_batch_1", slice(0, 8)), ("data_batch_2", slice(8, None)), ("test_batch", slice(0, 3))):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": flat[rows], b"labels": labels[rows]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes]}, f)
    src = open_source(tmp_path)  # the parent of cifar-10-batches-py works too
    assert src.name == "cifar10" and src.class_names == classes and len(src) == len(images)
    assert np.array_equal(src.load(5), images[5]) and src.labels.tolist() == labels
    assert len(open_source(folder, split="test")) == 3
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Path("x")}, f)  # a pickle that would construct a non-numpy object
    with pytest.raises(ValueError, match="not a readable CIFAR python batch"):
        open_source(folder)


# ------------------------------------------------------------------------------------ prepare


@needs_ffcv
def test_prepare_round_trips_images_and_counts_skips(tmp_path, image_folder):
    root, expected = image_folder
    out = tmp_path / "folder.beton"
    result = prepare(root, out, compress_probability=0.0, num_workers=2, progress=False)
    n_expected = sum(len(v) for v in expected.values())
    assert result.num_written == n_expected == validate_beton(out)["num_samples"]
    assert result.skipped == {"not_image": 1, "hidden": 1, "unreadable": 2}
    manifest = json.loads((tmp_path / "folder.beton.json").read_text())
    assert manifest["counts"]["written"] == n_expected and manifest["class_names"] == sorted(os.listdir(root))
    assert sorted(Path(p.split(":")[0]).name for p in manifest["skipped_examples"]["unreadable"]) == \
        ["fake.jpg", "truncated.jpg"]
    # Decode through the real FFCV eval path (ratio 1 at the stored size: an exact copy).
    seen = {k: [] for k in expected}
    for images, labels in _kept(build_eval_loader(out, batch_size=8, resolution=32, center_crop_ratio=1.0)):
        for image, label in zip(images, labels):
            seen[int(label)].append(image.permute(1, 2, 0).numpy().copy())
    for label, wanted in expected.items():
        assert len(seen[label]) == len(wanted)
        for image in wanted:  # every source image comes back exactly once, under its own label
            assert sum(np.array_equal(image, s) for s in seen[label]) == 1


@needs_ffcv
def test_prepare_jpeg_is_close_and_max_resolution_downscales(tmp_path, image_folder):
    from ffcv.reader import Reader

    root, expected = image_folder
    out = tmp_path / "jpeg.beton"
    prepare(root, out, compress_probability=1.0, jpeg_quality=95, num_workers=1, progress=False)
    reader = Reader(str(out))
    data = np.memmap(out, dtype=np.uint8, mode="r")
    sizes = {int(ptr): int(size) for ptr, size in zip(reader.alloc_table["ptr"], reader.alloc_table["size"])}
    errors = []
    for meta, label in zip(reader.metadata["f0"], reader.metadata["f1"]):
        assert meta["mode"] == 0  # jpg
        start = int(meta["data_ptr"])
        decoded = _rgb(io.BytesIO(bytes(data[start: start + sizes[start]])))
        errors.append(min(np.abs(decoded.astype(int) - e).mean() for e in expected[int(label)]))
    assert max(errors) < 4.0, f"re-encoded JPEGs differ from their sources by {max(errors):.1f} grey levels"
    small = tmp_path / "small.beton"
    prepare(root, small, max_resolution=16, num_workers=1, progress=False)
    meta = Reader(str(small)).metadata["f0"]
    assert (meta["width"] == 16).all() and (meta["height"] == 16).all()


@needs_ffcv
def test_prepare_refuses_to_overwrite(tmp_path, tagged_demo):
    out = tmp_path / "d.beton"
    prepare(tagged_demo, out, num_workers=1, progress=False)
    with pytest.raises(FileExistsError, match=r"d\.beton already exists; pass overwrite=True"):
        prepare(tagged_demo, out, num_workers=1, progress=False)
    assert prepare(tagged_demo, out, num_workers=1, overwrite=True, progress=False).num_written == 1797


class FailingSource(ArraySource):
    """A source whose reading breaks part-way, as a disk or network error would."""

    def load(self, index):
        if index == 700:
            raise OSError("simulated read failure")
        return super().load(index)


@needs_ffcv
def test_failed_write_leaves_nothing_under_the_output_name(tmp_path, tagged_demo):
    source = FailingSource(tagged_demo.images, tagged_demo.labels, tagged_demo.class_names)
    out = tmp_path / "f.beton"
    with pytest.raises(PrepareError, match="simulated read failure"):
        prepare(source, out, num_workers=2, progress=False)
    assert os.listdir(tmp_path) == []  # neither the file nor temporaries
    out.write_bytes(b"previous good file")
    with pytest.raises(PrepareError):
        prepare(source, out, num_workers=2, overwrite=True, val_fraction=0.1, progress=False)
    assert out.read_bytes() == b"previous good file" and os.listdir(tmp_path) == ["f.beton"]


@needs_ffcv
def test_truncated_or_foreign_beton_is_a_clear_error(tmp_path, tagged_demo, cifar_jpegs):
    out = tmp_path / "t.beton"
    prepare(tagged_demo, out, num_workers=1, progress=False)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"t\.beton is truncated.*byol-ray prepare"):
        validate_beton(out)
    with pytest.raises(ValueError, match="byol-ray prepare"):
        build_train_loader(out, batch_size=8, resolution=32)
    out.write_bytes(data[:20])
    with pytest.raises(ValueError, match="byol-ray prepare"):
        validate_beton(out)
    foreign = tmp_path / "photo.beton"
    foreign.write_bytes(next(iter(cifar_jpegs.values()))[0].read_bytes())
    with pytest.raises(ValueError, match=r"photo\.beton is not a readable FFCV file.*byol-ray prepare"):
        validate_beton(foreign)
    # The driver's check: the same causes as ConfigError, in one line.
    for bad, why in ((out, "truncated"), (foreign, "not a readable FFCV file")):
        with pytest.raises(ConfigError, match=why) as caught:
            check_training_data(str(bad), "ffcv")
        assert "\n" not in str(caught.value)


@needs_ffcv
def test_label_fraction_is_class_balanced_and_seeded(tmp_path, tagged_demo):
    counts = np.bincount(tagged_demo.labels)
    kept = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.beton"
        result = prepare(tagged_demo, out, label_fraction=0.1, seed=seed, compress_probability=0.0,
                         num_workers=2, progress=False)
        images, labels = _read_raw(out)
        assert np.array_equal(np.bincount(labels, minlength=10), np.round(counts * 0.1).astype(int))
        assert result.num_written == len(images)
        tags = _tags(images)
        assert all(tagged_demo.labels[t] == label for t, label in zip(tags, labels))  # labels stay with images
        kept[name] = set(tags)
    assert kept["a"] == kept["b"] and kept["a"] != kept["c"]


@needs_ffcv
def test_val_split_is_disjoint_and_stratified(tmp_path, tagged_demo):
    out = tmp_path / "tv.beton"
    result = prepare(tagged_demo, out, val_fraction=0.2, compress_probability=0.0, num_workers=2, progress=False)
    assert result.val_path == val_path_for(out) == tmp_path / "tv.val.beton"
    train, val = _read_raw(out), _read_raw(result.val_path)
    train_tags, val_tags = set(_tags(train[0])), set(_tags(val[0]))
    assert not train_tags & val_tags and train_tags | val_tags == set(range(1797))
    assert np.array_equal(np.bincount(val[1]), np.round(np.bincount(tagged_demo.labels) * 0.2).astype(int))


# ------------------------------------------------------------------------------------ loaders


@pytest.fixture(scope="module")
def ffcv_ranks(coord_beton):
    """Rank 0 and rank 1 of a two-rank FFCV loader with the default crop range."""
    return [_kept(build_train_loader(coord_beton, batch_size=16, resolution=32, seed=3, distributed=True,
                                     rank=r, world_size=2, num_workers=1)) for r in (0, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_views_differ_and_crops_span_the_scale_range(backend, request):
    loader = request.getfixturevalue("ffcv_ranks")[0] if backend == "ffcv" else build_train_loader(
        coordinate_source(), backend="torch", batch_size=16, resolution=32, seed=3, num_workers=0)
    view1, view2, labels = _collect(loader, 0)
    assert view1.shape == view2.shape == (len(labels), 3, 32, 32) and view1.dtype == torch.uint8
    assert view1.is_contiguous() and view2.is_contiguous()  # NCHW, like the torch backend
    assert labels.dtype == torch.int64
    assert (view1[:, 2, 0, 0] == 2 * labels).all() and (view2[:, 2, 0, 0] == 2 * labels).all()  # same image
    differ = (view1 != view2).flatten(1).any(1).float().mean()
    assert differ > 0.9, f"only {differ:.0%} of the view pairs differ"
    geometry = [_crop_geometry(v) for v in torch.cat([view1, view2])]
    areas = np.array([a for a, _, _ in geometry])
    aspects = np.array([r for _, r, _ in geometry])
    flips = np.mean([f for _, _, f in geometry])
    assert areas.min() > 0.06 and areas.max() < 1.05 and aspects.min() > 0.7 and aspects.max() < 1.45
    assert areas.min() < 0.2 and areas.max() > 0.7, "crops do not span the configured 0.08..1 area range"
    assert 0.25 < flips < 0.75


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_crop_scale_is_respected(backend, request):
    path = request.getfixturevalue("coord_beton") if backend == "ffcv" else coordinate_source()
    loader = _kept(build_train_loader(path, backend=backend, batch_size=32, resolution=32, crop_scale=(0.25, 0.25),
                                      crop_ratio=(1.0, 1.0), flip_prob=0.0, num_workers=1 if backend == "ffcv" else 0))
    view1, view2, _ = _collect(loader, 0)
    for view in torch.cat([view1, view2]):
        area, aspect, flipped = _crop_geometry(view)
        assert abs(area - 0.25) < 0.02 and abs(aspect - 1) < 0.05 and not flipped
    # Random positions: a 32-px window of a 64-px image lands in many places.
    assert len({int(v[0].min()) for v in view1}) > 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_is_deterministic_and_ranks_do_not_overlap(backend, request):
    if backend == "ffcv":
        ranks = request.getfixturevalue("ffcv_ranks")
        stored_labels = _read_raw(request.getfixturevalue("coord_beton"))[1]  # the file's order is shuffled
    else:
        stored_labels = np.arange(N_COORD)
        ranks = [build_train_loader(coordinate_source(), backend="torch", batch_size=16, resolution=32, seed=3,
                                    distributed=True, rank=r, world_size=2, num_workers=1) for r in (0, 1)]
    labels = [[_collect(loader, epoch)[2].tolist() for epoch in (0, 1, 0)] for loader in ranks]
    for rank, (e0, e1, e0_again) in enumerate(labels):
        assert e0 == e0_again and e0 != e1
        assert e0 == stored_labels[shard_order(N_COORD, 0, seed=3, shuffle=True, rank=rank, world_size=2)].tolist()
        assert len(ranks[rank]) == 3 and ranks[rank].num_samples == N_COORD and len(e0) == 48
    assert not set(labels[0][0]) & set(labels[1][0])
    if backend == "torch":  # the torch backend also seeds the crops: same epoch, same pixels
        a, b = _collect(ranks[0], 0), _collect(ranks[0], 0)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_centre_crops_every_sample_once(backend, request):
    path = request.getfixturevalue("coord_beton") if backend == "ffcv" else coordinate_source()
    seen = []
    for rank in (0, 1):
        loader = _kept(build_eval_loader(path, backend=backend, batch_size=16, resolution=32,
                                         num_workers=1 if backend == "ffcv" else 0, distributed=True, rank=rank,
                                         world_size=2))
        assert len(loader) == (4 if rank == 0 else 3)  # 49 and 48 samples: uneven, never repeated
        for images, labels in loader:
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
            for image, label in zip(images, labels):
                r = image[0].float()
                side = (r.max() - r.min()).item() / 4 + 1
                assert abs(side - 56) <= 2.5 and abs(r.max() + r.min() - 252) <= 8  # centred 56/64 crop
                assert int(image[2, 0, 0]) == 2 * int(label)
                seen.append(int(label))
    assert sorted(seen) == list(range(N_COORD))


@needs_ffcv
def test_backend_mismatches_are_clear_errors(coord_beton, image_folder):
    with pytest.raises(ValueError, match="backend='torch' reads the source.*backend='ffcv'"):
        build_train_loader(coord_beton, backend="torch", batch_size=8, resolution=32)
    with pytest.raises(ValueError, match="backend='memory' reads the source.*backend='ffcv'"):
        build_train_loader(coord_beton, backend="memory", batch_size=8, resolution=32)
    with pytest.raises(ValueError, match="backend='ffcv' reads a .beton.*byol-ray prepare.*data.loader=torch"):
        build_train_loader(image_folder[0], backend="ffcv", batch_size=8, resolution=32)
    with pytest.raises(ValueError, match="distributed=True"):
        build_train_loader("demo", backend="torch", batch_size=8, resolution=32, rank=1, world_size=2)


def test_missing_ffcv_points_to_the_torch_loader(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # what an `import ffcv` sees where it is not installed
    with pytest.raises(ImportError, match=r"FFCV is not importable.*data\.loader=torch"):
        build_train_loader(tmp_path / "x.beton", backend="ffcv", batch_size=8, resolution=32)
    with pytest.raises(ImportError, match=r"FFCV is not importable.*data\.loader=torch"):
        prepare("demo", tmp_path / "d.beton", progress=False)


def test_torch_fallback_on_an_image_folder(cifar_jpegs, image_folder):
    clean_root = next(iter(cifar_jpegs.values()))[0].parents[1]
    loader = build_train_loader(clean_root, backend="torch", batch_size=8, resolution=24, num_workers=2)
    assert loader.num_samples == 3 * PER_CLASS and len(loader) == 3 * PER_CLASS // 8
    batches = list(loader)
    assert len(batches) == len(loader)
    for view1, view2, labels in batches:
        assert view1.shape == view2.shape == (8, 3, 24, 24) and view1.dtype == torch.uint8
        assert labels.dtype == torch.int64 and labels.shape == (8,)
    # The torch backend reads files as it goes: an unreadable one stops the epoch with its name.
    broken = build_train_loader(image_folder[0], backend="torch", batch_size=8, resolution=24, num_workers=0)
    with pytest.raises(ValueError, match=r"cannot decode .*(truncated|fake)\.jpg.*byol-ray prepare"):
        list(broken)


def _gloo_rank(rank: int, pg_file: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=2)
    try:
        loader = build_train_loader(coordinate_source(), backend="torch", batch_size=8, resolution=16,
                                    distributed=True, num_workers=0)  # rank and world size from the group
        labels = torch.cat([lab for _, _, lab in loader])
        gathered = [torch.zeros_like(labels) for _ in range(2)]
        torch.distributed.all_gather(gathered, labels)
        if rank == 0:
            torch.save(gathered, results)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_of_a_real_process_group_cover_the_data_without_overlap(tmp_path):
    results = tmp_path / "labels.pt"
    # fork: the children need nothing but the torch backend, and skip re-importing torch (~10 s)
    torch.multiprocessing.start_processes(_gloo_rank, args=(str(tmp_path / "pg"), str(results)), nprocs=2,
                                          start_method="fork")
    rank0, rank1 = (set(t.tolist()) for t in torch.load(results))
    assert len(rank0) == len(rank1) == 48 and not rank0 & rank1


# ------------------------------------------------------------------------------------ crop law

IMG_H, IMG_W, DRAWS = 375, 500, 20000  # a typical ImageNet photo


def deepmind_reference_boxes(n: int, rng: np.random.Generator) -> np.ndarray:
    """An independent numpy port of DeepMind's BYOL crop (byol/utils/dataset.py, _decode_and_random_crop):
    one draw, area U[0.08, 1] of the image, log-uniform aspect in [3/4, 4/3], sides rounded then clamped
    to the image, offsets uniform over the valid range. Returns (top, left, h, w) rows."""
    target_area = rng.uniform(0.08, 1.0, n) * (IMG_H * IMG_W)
    aspect_ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), n))
    w = np.minimum(np.round(np.sqrt(target_area * aspect_ratio)), IMG_W).astype(np.int64)
    h = np.minimum(np.round(np.sqrt(target_area / aspect_ratio)), IMG_H).astype(np.int64)
    return np.stack([rng.integers(0, IMG_H - h + 1), rng.integers(0, IMG_W - w + 1), h, w], axis=1)


def torchvision_boxes(n: int) -> np.ndarray:
    """torchvision.transforms.RandomResizedCrop.get_params itself, n draws."""
    transforms = pytest.importorskip("torchvision.transforms")
    torch.manual_seed(0)
    image = torch.empty((3, IMG_H, IMG_W), dtype=torch.uint8)
    return np.array([transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])


def crop_stats(boxes: np.ndarray) -> np.ndarray:
    """(mean area fraction, share of crops above 80 % of the image, mean aspect w/h) of (top, left, h, w) rows."""
    top, left, h, w = np.asarray(boxes, dtype=np.float64).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= IMG_H).all() and (left + w <= IMG_W).all()
    area = h * w / (IMG_H * IMG_W)
    return np.array([area.mean(), (area > 0.8).mean(), (w / h).mean()])


def sampled_boxes(sampler: str, law: str) -> np.ndarray:
    """DRAWS boxes from one backend's own sampler for a 500x375 image."""
    crop = CropLaw(law)
    if sampler == "ffcv":  # the numba-compiled law of the FFCV decoder
        from byol_ray.data.two_view import view_params

        return np.array([view_params(1, e, i, v, IMG_H, IMG_W, law=law)[:4]
                         for e in range(5) for i in range(DRAWS // 10) for v in range(2)])
    if sampler == "torch":  # the per-sample draws of the torch loader's dataset
        from byol_ray.data.torch_loader import view_boxes

        return np.array([box[:4] for i in range(DRAWS // 2) for box in view_boxes(1, 0, i, IMG_H, IMG_W, crop, 0.5)])
    u = torch.rand((DRAWS, CROP_DRAWS), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return crop_boxes(u, IMG_H, IMG_W, crop).numpy()  # the memory loader's batched law


@pytest.fixture(scope="module")
def law_stats() -> dict[str, np.ndarray]:
    """What each law should give: the independent port of the reference, and torchvision's own get_params."""
    return {"reference": crop_stats(deepmind_reference_boxes(DRAWS, np.random.default_rng(0))),
            "torchvision": crop_stats(torchvision_boxes(DRAWS))}


def test_the_laws_differ_as_the_issue_says(law_stats):
    ref, tv = law_stats["reference"], law_stats["torchvision"]
    assert abs(ref[0] - 0.52) < 0.01 and abs(tv[0] - 0.43) < 0.01  # mean area fraction
    assert 0.3 < tv[1] / ref[1] < 0.6  # crops above 80 % of the image: about half as common under torchvision


@pytest.mark.parametrize("law", CROP_LAWS)
@pytest.mark.parametrize("sampler", [pytest.param("ffcv", marks=needs_ffcv), "torch", "memory"])
def test_every_sampler_follows_its_law(sampler, law, law_stats):
    got, want, other = crop_stats(sampled_boxes(sampler, law)), law_stats[law], law_stats[{
        "reference": "torchvision", "torchvision": "reference"}[law]]
    assert np.abs(got - want).max() < 0.012, f"{sampler} {law}: {got.round(3)} vs {want.round(3)}"
    assert np.abs(got - other)[:2].min() > 0.05, "the test cannot tell the two laws apart"


# ------------------------------------------------------------------------------------ bad input, early


class Untouchable(ArraySource):
    """A source that fails the test if prepare decodes or checks any of its images."""

    needs_check = True

    def check(self, index):
        raise AssertionError("an image was checked before the bad input was reported")

    def load(self, index):
        raise AssertionError("an image was decoded before the bad input was reported")


@pytest.fixture()
def untouchable(tagged_demo) -> Untouchable:
    return Untouchable(tagged_demo.images[:50], tagged_demo.labels[:50], tagged_demo.class_names)


def _one_line_config_error(call, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value), str(caught.value)


@needs_ffcv
def test_bad_prepare_input_fails_in_one_line_before_any_decode(tmp_path, untouchable, cifar_jpegs, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_config_error(lambda: prepare(empty, tmp_path / "a.beton", progress=False), "empty folder")
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "dog").mkdir()
    (tmp_path / "src" / "cat" / "a.jpg").write_bytes(next(iter(cifar_jpegs.values()))[0].read_bytes())
    (tmp_path / "src" / "dog" / "notes.txt").write_text("no images here")
    _one_line_config_error(lambda: prepare(tmp_path / "src", tmp_path / "a.beton", progress=False),
                           r"class folder .*dog holds no images.*add images or remove the folder")
    (tmp_path / "taken.beton").mkdir()
    _one_line_config_error(lambda: prepare(untouchable, tmp_path / "taken.beton", overwrite=True, progress=False),
                           r"taken\.beton is a directory; give a file path")
    _one_line_config_error(lambda: prepare(untouchable, tmp_path / "missing" / "a.beton", progress=False),
                           "output folder .*missing does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the folder refuse files another way
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    try:
        _one_line_config_error(lambda: prepare(untouchable, locked / "a.beton", progress=False),
                               r"output folder .*locked is not writable \(Permission denied\)")
    finally:
        locked.chmod(0o755)
    assert os.listdir(locked) == []
    with pytest.raises(PrepareError):  # a ConfigError, so the CLI reports it in one line
        prepare(untouchable, locked / "a.beton", label_fraction=0.1, label_subset=tmp_path / "x.txt", progress=False)


@pytest.fixture(scope="session")
def cifar_class(cifar_archive, tmp_path_factory) -> Path:
    """One real CIFAR-10 class (5,000 train JPEGs) as an ImageFolder: seconds of work for prepare."""
    root = tmp_path_factory.mktemp("cifar-class")
    with tarfile.open(cifar_archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and parts[:2] == ["train", "airplane"]:
                (root / "airplane").mkdir(exist_ok=True)
                (root / "airplane" / parts[2]).write_bytes(tar.extractfile(member).read())
    return root


def _workers(pid: int) -> list[int]:
    """The worker processes of ``pid``: its children but multiprocessing's resource tracker."""
    def command(child: str) -> bytes:
        try:
            return Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            return b"resource_tracker"

    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in children if b"resource_tracker" not in command(c)]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs_ffcv
@pytest.mark.parametrize("phase", ["checking", "writing"])
def test_ctrl_c_stops_prepare_promptly_and_leaves_no_file(phase, cifar_class, tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to the whole process group) while the decode-check pool or the
    writer processes run: prepare exits within seconds, its workers gone, no output or temporary file left."""
    out = tmp_path / "out"
    out.mkdir()
    code = "import sys; from byol_ray.data.prepare import prepare; prepare(sys.argv[1], sys.argv[2], num_workers=2)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(cifar_class), str(out / "c.beton")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120

    def under_way() -> bool:
        writing = any(".tmp-" in p.name for p in out.iterdir())
        return len(_workers(proc.pid)) >= 2 and writing == (phase == "writing")

    try:
        while not under_way():
            assert proc.poll() is None, f"prepare ended before {phase}: {proc.communicate()[0][-2000:]}"
            assert time.monotonic() < deadline, f"prepare never reached {phase}"
            time.sleep(0.01)
        workers = _workers(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        proc.wait(timeout=15)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    # about 1-2 s on an idle machine; 6.5 s was seen with the whole suite on three xdist workers (load 15-26)
    assert proc.returncode != 0 and took < 10, f"exit code {proc.returncode} after {took:.1f} s"
    assert list(out.iterdir()) == [], "an interrupted prepare left files behind"
    assert not any(map(_running, workers)), "worker processes outlived the interrupted prepare"


# ------------------------------------------------------------------------------------ training-data check


def test_check_training_data_is_one_line_per_problem(tmp_path, cifar_jpegs):
    check_training_data("demo", "memory")
    clean_root = next(iter(cifar_jpegs.values()))[0].parents[1]
    for loader in ("ffcv", "torch", "memory"):
        check_training_data(str(clean_root), loader)
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    (cifar / "data_batch_1").write_bytes(b"")  # recognised by its files; no image is read
    check_training_data(str(cifar.parent), "torch")
    (tmp_path / "bare" / "cat" / ".hidden").mkdir(parents=True)
    (tmp_path / "bare" / "cat" / "notes.txt").write_text("no image")
    (tmp_path / "bare" / "cat" / ".hidden" / "x.jpg").write_bytes(b"hidden folders do not count")
    beton = tmp_path / "x.beton"
    beton.write_bytes(b"\0")
    cases = [((str(tmp_path / "nope"), "torch"), r"data.train=.*nope' does not exist"),
             ((str(tmp_path / "bare"), "ffcv"), r"bare' is a folder without images"),
             ((str(beton), "torch"), r"\.beton file, which only the FFCV loader reads \(data.loader=torch"),
             ((str(beton), "memory"), "data.loader=memory reads source images"),
             ((str(tmp_path / "bare" / "cat" / "notes.txt"), "ffcv"), "is a file but not a .beton"),
             (("demo", "dali"), "data.loader='dali': choose one of")]
    for args, match in cases:
        _one_line_config_error(lambda: check_training_data(*args), match)


@needs_ffcv
def test_check_training_data_accepts_a_complete_beton(coord_beton):
    check_training_data(str(coord_beton), "ffcv")


# ------------------------------------------------------------------------------------ label subset


@pytest.fixture()
def imagenet_like(tmp_path, cifar_jpegs) -> Path:
    """Real JPEGs under ImageNet's names: <wnid>/<wnid>_<n>.JPEG, four per class."""
    root = tmp_path / "imagenet"
    for wnid, files in zip(("n01440764", "n01443537"), cifar_jpegs.values()):
        (root / wnid).mkdir(parents=True)
        for n, src in enumerate(files[:4]):
            (root / wnid / f"{wnid}_{10026 + n}.JPEG").write_bytes(src.read_bytes())
    return root


@needs_ffcv
def test_label_subset_selects_the_listed_images(tmp_path, imagenet_like):
    names = ["n01440764_10026.JPEG", "n01440764_10028.JPEG", "n01443537_10027.JPEG"]
    listing = tmp_path / "1percent.txt"
    listing.write_text("\n".join(names) + "\n\n")
    out = tmp_path / "sub.beton"
    result = prepare(imagenet_like, out, label_subset=listing, compress_probability=0.0, num_workers=1,
                     progress=False)
    assert result.num_written == 3
    manifest = json.loads((tmp_path / "sub.beton.json").read_text())
    assert manifest["class_counts"]["written"] == [2, 1] and manifest["options"]["label_subset"]["listed"] == 3
    images, labels = _read_raw(out)
    wanted = {(_rgb(imagenet_like / n.split("_")[0] / n).tobytes(), int(n.startswith("n01443537"))) for n in names}
    assert {(im.tobytes(), int(lab)) for im, lab in zip(images, labels)} == wanted


@needs_ffcv
def test_label_subset_names_unknown_images_before_decoding(tmp_path, imagenet_like, untouchable):
    listing = tmp_path / "list.txt"
    listing.write_text("n01440764_10026.JPEG\n" + "".join(f"n09999999_{i}.JPEG\n" for i in range(8)))
    _one_line_config_error(
        lambda: prepare(imagenet_like, tmp_path / "a.beton", label_subset=listing, progress=False),
        r"8 of 9 listed images are not in .*imagenet, e\.g\. \['n09999999_0\.JPEG', .*'n09999999_4\.JPEG'\]; check")
    _one_line_config_error(lambda: prepare(untouchable, tmp_path / "a.beton", label_subset=listing, progress=False),
                           "selects images by file name")
    _one_line_config_error(lambda: prepare(imagenet_like, tmp_path / "a.beton", label_subset=tmp_path / "no.txt",
                                           progress=False), r"no\.txt does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet", "list.txt"]
    twin = imagenet_like / "n01443537" / "n01440764_10026.JPEG"  # the same name in two class folders
    twin.write_bytes((imagenet_like / "n01440764" / twin.name).read_bytes())
    source = open_source(imagenet_like)
    with pytest.raises(ConfigError, match=r"1 listed names match several files.*paths below the root"):
        label_subset_indices(source, [twin.name])
    assert source.files[label_subset_indices(source, [f"n01443537/{twin.name}"])[0]] == f"n01443537/{twin.name}"


def test_numba_finalizer_race_message_is_dropped_and_other_unraisables_are_kept(monkeypatch):
    """numba's dispatcher finalizer can meet a dict changing under it (a loader collected while another thread
    compiles) and print `Exception ignored ... KeyError: (Array(uint8, ...` at the end of a successful run. The
    filter that FFCV's import installs drops exactly that one; anything else still reaches the previous hook."""
    import gc
    import weakref

    import numba

    from byol_ray.data.check import _ignore_numba_finalizer_race

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    _ignore_numba_finalizer_race()

    class Racing(dict):
        def values(self):  # what iterating an OrderedDict that another thread mutates raises
            raise KeyError(("Array(uint8, 1, 'C')",))

    @numba.njit
    def add(a, b):
        return a + b

    add(1, 2)
    add.overloads = Racing(add.overloads)
    finalizer = add._make_finalizer()

    class Owner:
        pass

    owner = Owner()
    weakref.finalize(owner, finalizer)
    del owner
    gc.collect()

    def other():
        raise ValueError("a real problem")

    owner = Owner()
    weakref.finalize(owner, other)
    del owner
    gc.collect()
    assert [type(u.exc_value).__name__ for u in seen] == ["ValueError"]
