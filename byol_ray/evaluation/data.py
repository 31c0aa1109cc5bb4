"""Evaluation splits: open --train/--test data, seeded held-out slices and label subsets, their loaders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from byol_ray.config import ConfigError
from byol_ray.data.sources import Source, open_source
from byol_ray.preprocess import EVAL_CROP_RATIO

# Shared with `byol-ray prepare`: the same seeds give the same images as a prepared --val-fraction /
# --label-fraction .beton, so torch-backend and FFCV evaluations see identical subsets.
from byol_ray.data.prepare import stratified_sample  # noqa: E402

HOLDOUT_STREAM, LABEL_STREAM, SELECTION_STREAM = 0, 1, 3  # rng streams: [seed, stream]


class SubsetSource(Source):
    """Some records of another source, by position; labels and class names follow the parent."""

    def __init__(self, parent: Source, indices: np.ndarray, what: str) -> None:
        super().__init__(parent.labels[indices], parent.class_names)
        self.parent, self.indices = parent, np.asarray(indices, dtype=np.int64)
        self.name, self.root, self.what = parent.name, parent.root, what

    def load(self, index: int) -> np.ndarray:
        return self.parent.load(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.parent.describe(int(self.indices[index]))

    def check(self, index: int) -> str | None:
        return self.parent.check(int(self.indices[index]))

    @property
    def needs_check(self) -> bool:
        return self.parent.needs_check

    def fingerprint(self) -> dict:
        import hashlib

        return {**self.parent.fingerprint(), "subset": self.what, "num_samples": len(self),
                "subset_sha256": hashlib.sha256(self.indices.tobytes()).hexdigest()}


@dataclass
class Split:
    """One evaluation split as a loader reads it: a .beton path (FFCV) or a Source (torch)."""

    data: str | Source
    backend: str
    description: str
    indices: np.ndarray | None = None  # a .beton's samples to read (None: all)

    @property
    def source(self) -> Source:
        if not isinstance(self.data, Source):
            raise ConfigError(f"{self.description} is a .beton read by FFCV: held-out slices and label subsets "
                              f"need the source images (--loader torch with the source folder), or prepare the "
                              f"subset once with `byol-ray prepare --val-fraction/--label-fraction`")
        return self.data

    def subset(self, positions: np.ndarray, what: str) -> Split:
        return Split(SubsetSource(self.source, positions, what), self.backend, f"{self.description} [{what}]")

    def fingerprint(self) -> dict:
        if isinstance(self.data, Source):
            return self.data.fingerprint()
        return {"kind": "beton", "root": str(self.data)}


def _backend(spec: str, loader: str) -> str:
    if loader == "auto":
        return "ffcv" if spec.endswith(".beton") else "torch"
    if loader == "torch" and spec.endswith(".beton"):
        raise ConfigError(f"{spec} is a .beton file, which only the FFCV loader reads; use --loader ffcv "
                          f"or point at the source folder")
    if loader == "ffcv" and not spec.endswith(".beton"):
        raise ConfigError(f"--loader ffcv reads .beton files; {spec!r} is not one. Prepare it once with "
                          f"`byol-ray prepare {spec} OUT.beton` or use --loader torch")
    return loader


def open_split(spec: str, split: str, loader: str = "auto", *, cache_dir: str = "~/.cache/byol-ray",
               key: str = "data") -> Split:
    """Open ``spec`` ('demo', an ImageFolder/CIFAR folder, or a .beton, local or in an object store) at ``split``
    for evaluation. An object-store .beton is first copied to ``cache_dir`` once per node (the setting ``key``
    names it in messages)."""
    from byol_ray.storage import is_uri

    if is_uri(spec):
        from byol_ray.data.cache import stage
        from byol_ray.data.check import check_remote_beton

        check_remote_beton(spec, key)
        spec = stage(spec, cache_dir, key)
    backend = _backend(spec, loader)
    if backend == "ffcv":
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{spec} does not exist")
        return Split(str(path), "ffcv", str(path))
    try:
        source = open_source(spec, split)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return Split(source, "torch", f"{spec} ({split})")


def open_splits(train: str, test: str | None, *, loader: str = "auto", train_split: str = "train",
                test_split: str = "test", test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split, str]:
    """The train and test splits of an evaluation.

    When the test data is the train data itself (``test`` omitted or equal, e.g. the one-split demo set),
    a seeded class-stratified ``test_fraction`` of it is held out as the test split and the rest trains:
    the same images ``byol-ray prepare SOURCE --val-fraction F --seed S`` writes to its ``.val`` file.

    Args:
        train, test: data specs; ``test`` None means "hold out from train".
        loader: 'auto' (FFCV for .beton, else torch), 'ffcv' or 'torch'.
        train_split, test_split: split names inside CIFAR folders / folders holding split folders.
        test_fraction, seed: the held-out test slice, when one is needed.

    Returns:
        (train, test, a note saying how the test split was made).
    """
    if test is None or (test == train and test_split == train_split) or (test == "demo" and train == "demo"):
        whole = open_split(train, train_split, loader)
        labels = whole.source.labels
        held = stratified_sample(labels, test_fraction, np.random.default_rng([seed, HOLDOUT_STREAM]), keep_one=True)
        rest = np.setdiff1d(np.arange(len(labels)), held)
        note = (f"test = seeded stratified {test_fraction:g} holdout of {whole.description} (seed {seed}), "
                f"train = the rest")
        return (whole.subset(rest, f"train minus {test_fraction:g} holdout, seed {seed}"),
                whole.subset(held, f"{test_fraction:g} holdout, seed {seed}"), note)
    return open_split(train, train_split, loader), open_split(test, test_split, loader), "separate test split"


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions of a class-balanced, seeded ``fraction`` of the labels (1% / 10% semi-supervised)."""
    return stratified_sample(labels, fraction, np.random.default_rng([seed, LABEL_STREAM]), keep_one=False)


@dataclass
class LoaderSettings:
    """How downstream jobs read images."""

    resolution: int = 32
    batch_size: int = 256
    num_workers: int = 0  # torch: DataLoader processes (0 = in this process); FFCV: threads (>= 1)
    device: str = "cpu"
    center_crop_ratio: float = EVAL_CROP_RATIO  # 1.0 keeps whole square images (32-px CIFAR, the demo)


def eval_loader(split: Split, s: LoaderSettings):
    """Centre-cropped (images, labels) batches in stored order."""
    from byol_ray.data.loaders import build_eval_loader

    workers = max(s.num_workers, 1) if split.backend == "ffcv" else s.num_workers
    return build_eval_loader(split.data, backend=split.backend, batch_size=s.batch_size, resolution=s.resolution,
                             num_workers=workers, device=s.device, center_crop_ratio=s.center_crop_ratio,
                             subset=split.indices)


def train_loader(split: Split, s: LoaderSettings, *, seed: int, batch_size: int | None = None):
    """Random-resized-crop + flip batches (the paper's linear/fine-tune training augmentation); the jobs
    use the first view of the two-view loader."""
    from byol_ray.data.loaders import build_train_loader

    workers = max(s.num_workers, 1) if split.backend == "ffcv" else s.num_workers
    return build_train_loader(split.data, backend=split.backend, batch_size=batch_size or s.batch_size,
                              resolution=s.resolution, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                              flip_prob=0.5, num_workers=workers, seed=seed, device=s.device, drop_last=True)


def class_count(split: Split) -> int | None:
    """Number of classes of a split: the source's class names, or a prepared .beton's manifest."""
    import json

    if isinstance(split.data, Source):
        return len(split.data.class_names)
    manifest = Path(f"{split.data}.json")  # written beside every .beton by `byol-ray prepare`
    if manifest.is_file():
        return len(json.loads(manifest.read_text()).get("class_names", [])) or None
    return None
