"""Data sources read as (image, label) records: ImageFolder trees, CIFAR python folders, the demo set."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np

from byol_ray.config import ConfigError
from byol_ray.data.demo import DEMO_NAME, load_demo

# torchvision's ImageFolder extensions; anything else in a class folder is skipped and counted.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "validation", "test")
MAX_EXAMPLES = 100  # skipped paths kept per reason for the report; the counts are always complete

_SOURCE_HELP = ("pass 'demo', an ImageFolder split folder (root/<class>/<image>), or a CIFAR-10/100 "
                "python folder (cifar-10-batches-py, cifar-100-python)")


class Source:
    """An indexable data set of RGB uint8 images with int64 labels.

    Attributes:
        name: what the source is ('imagefolder', 'cifar10', 'cifar100', 'demo', or a caller's name).
        root: the folder it was read from (None for in-memory sources).
        class_names: label i is class_names[i].
        labels: int64 [N], the label of every record.
        skipped_counts: reason -> number of files left out while listing (non-image, hidden);
            decoding failures are found later by :meth:`check`.
        skipped: reason -> the first paths of each kind left out.
    """

    name: str = "source"
    root: Path | None = None

    def __init__(self, labels: np.ndarray, class_names: list[str]) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.skipped_counts: dict[str, int] = {}
        self.skipped: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> np.ndarray:
        """The record's image as RGB uint8 [H, W, 3]; raises when it cannot be decoded."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where the record comes from, for error messages and skip reports."""
        return f"{self.name}[{index}]"

    def check(self, index: int) -> str | None:
        """None when the record decodes, else the reason it does not (cheap where possible)."""
        return None

    @property
    def needs_check(self) -> bool:
        """Whether records can fail to decode (files on disk can; in-memory arrays cannot)."""
        return False

    def records(self) -> Iterator[tuple[np.ndarray, int]]:
        """Yields (image, label) for every record that decodes, silently passing over the rest."""
        for index in range(len(self)):
            if self.check(index) is None:
                yield self.load(index), int(self.labels[index])

    def fingerprint(self) -> dict:
        """See :func:`fingerprint`."""
        raise NotImplementedError

    def _fingerprint(self, digest: str, num_files: int) -> dict:
        return {
            "kind": self.name,
            "root": str(self.root) if self.root else None,
            "num_files": num_files,
            "num_samples": len(self),
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "sha256": digest,
        }


def to_rgb(image) -> np.ndarray:
    """A decoded PIL image as RGB uint8 [H, W, 3], whatever its mode.

    Alpha is dropped (as torchvision's loader does), palette images go through RGBA so their
    transparency does not warn, and 16-bit greyscale is scaled down rather than clipped at 255.
    """
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.int64)
        if image.mode != "I" or values.max() > 255:
            values = values // 257  # 0..65535 -> 0..255
        image = Image.fromarray(values.clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def read_image(path: str | Path) -> np.ndarray:
    """Decodes an image file to RGB uint8 [H, W, 3]; truncated or corrupt files raise OSError."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here and not inside a writer
        return to_rgb(image)


class ImageFolderSource(Source):
    """root/<class>/**/<image>, classes in sorted order (the torchvision ImageFolder layout)."""

    name = "imagefolder"

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist; {_SOURCE_HELP}")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            loose = [e.name for e in os.scandir(root) if e.is_file()][:3]
            hint = f" (it holds files such as {loose}: move them into one folder per class)" if loose else ""
            raise ConfigError(f"{root} has no class folders{hint}; an ImageFolder is root/<class>/<image>")
        files, labels, sizes = [], [], []
        skipped: dict[str, list[str]] = {"not_image": [], "hidden": []}
        skipped_counts = {"not_image": 0, "hidden": 0}
        for label, cls in enumerate(classes):
            found = 0
            for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fname in sorted(filenames):
                    rel = os.path.relpath(os.path.join(dirpath, fname), root)
                    # macOS leaves '._x.jpg' AppleDouble files that look like images but are not.
                    reason = ("hidden" if fname.startswith(".")
                              else None if fname.lower().endswith(IMAGE_EXTENSIONS) else "not_image")
                    if reason:
                        skipped_counts[reason] += 1
                        if len(skipped[reason]) < MAX_EXAMPLES:
                            skipped[reason].append(rel)
                        continue
                    files.append(rel)
                    labels.append(label)
                    sizes.append(os.path.getsize(root / rel))
                    found += 1
            if not found:
                raise ConfigError(f"class folder {root / cls} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                  "add images or remove the folder")
        super().__init__(np.array(labels, dtype=np.int64), classes)
        self.root = root
        self.files = files
        self.sizes = sizes
        self.skipped_counts = skipped_counts
        self.skipped = {k: v for k, v in skipped.items() if v}

    def load(self, index: int) -> np.ndarray:
        return read_image(self.root / self.files[index])

    def describe(self, index: int) -> str:
        return str(self.root / self.files[index])

    @property
    def needs_check(self) -> bool:
        return True

    def check(self, index: int) -> str | None:
        from PIL import Image

        try:
            with Image.open(self.root / self.files[index]) as image:
                # JPEG at 1/8 scale: the whole entropy-coded stream is still read (so truncation
                # is caught), at a fraction of the cost of a full decode.
                image.draft("RGB", (1, 1))
                image.load()
                to_rgb(image)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            return f"{type(exc).__name__}: {exc}"
        return None

    def fingerprint(self) -> dict:
        listing = "".join(f"{f}\t{s}\n" for f, s in sorted(zip(self.files, self.sizes)))
        digest = hashlib.sha256(listing.encode()).hexdigest()
        return {**self._fingerprint(digest, len(self.files)), "skipped_files": dict(self.skipped_counts)}


class ArraySource(Source):
    """Images already in memory (CIFAR pickles, the demo set, or a caller's own arrays)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str], *,
                 name: str = "arrays", root: Path | None = None, files: list[Path] | None = None) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{name}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        super().__init__(labels, class_names)
        self.images, self.name, self.root = images, name, root
        self._files = files or []

    def load(self, index: int) -> np.ndarray:
        return self.images[index]

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        if self._files:  # a folder of files: the sorted listing with sizes
            for f in sorted(self._files):
                h.update(f"{f.name}\t{f.stat().st_size}\n".encode())
        else:  # in memory only: the content itself (small data sets)
            h.update(np.ascontiguousarray(self.images).tobytes())
            h.update(self.labels.tobytes())
        return self._fingerprint(h.hexdigest(), len(self._files))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches without running arbitrary code: only numpy array globals resolve."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable CIFAR python batch ({exc}); re-download or re-extract it") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def cifar_folder(root: str | Path) -> Path | None:
    """The CIFAR python folder at ``root`` or in its cifar-10-batches-py / cifar-100-python child, else None."""
    root = Path(root).expanduser()
    for child in ("cifar-10-batches-py", "cifar-100-python"):
        if _cifar_kind(root / child):
            return root / child
    return root if _cifar_kind(root) else None


def _cifar_kind(root: Path) -> str | None:
    if (root / "batches.meta").is_file() or (root / "data_batch_1").is_file():
        return "cifar10"
    if (root / "meta").is_file() and ((root / "train").is_file() or (root / "test").is_file()):
        return "cifar100"
    return None


def cifar_source(root: str | Path, split: str = "train") -> ArraySource:
    """A CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) python folder.

    Args:
        root: the extracted folder (cifar-10-batches-py or cifar-100-python).
        split: 'train' or 'test'.

    Returns:
        An ArraySource of 32x32 images; CIFAR-100 uses the 100 fine labels.
    """
    root = Path(root).expanduser().resolve()
    kind = _cifar_kind(root)
    if split not in ("train", "test"):
        raise ConfigError(f"CIFAR folder {root} has splits 'train' and 'test', not {split!r}; "
                         "use val_fraction for a held-out validation split")
    if kind == "cifar10":
        names = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        meta, label_key, names_key = root / "batches.meta", "labels", "label_names"
    else:
        names, meta, label_key, names_key = [root / split], root / "meta", "fine_labels", "fine_label_names"
    missing = [str(n) for n in [*names, meta] if not n.is_file()]
    if not names or missing:
        raise FileNotFoundError(f"CIFAR folder {root} lacks {missing or 'data_batch_*'}; re-extract the archive")
    batches = [_unpickle(n) for n in names]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(meta)[names_key]]
    return ArraySource(np.ascontiguousarray(images), labels, class_names, name=kind, root=root, files=names)


def demo_source(split: str = "train") -> ArraySource:
    """The built-in digits (see :mod:`byol_ray.data.demo`); it has one split, 'train'."""
    if split != "train":
        raise ConfigError(f"the demo data set has only the 'train' split, not {split!r}; "
                         "use val_fraction for a held-out validation split")
    images, labels, class_names = load_demo()
    return ArraySource(images, labels, class_names, name=DEMO_NAME)


def open_source(source: str | Path | Source, split: str = "train") -> Source:
    """Opens a data source by name or path.

    Args:
        source: 'demo', an ImageFolder folder, a CIFAR python folder, or a Source (returned as is).
        split: for a folder holding split folders (train/, val/, test/) or CIFAR files, which split.

    Returns:
        The Source; raises FileNotFoundError or ConfigError (a ValueError), one line naming the path and the fix.
    """
    if isinstance(source, Source):
        return source
    if str(source) == DEMO_NAME:
        return demo_source(split)
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data source {str(source)!r} does not exist; {_SOURCE_HELP}")
    if root.is_file():
        what = "an FFCV .beton file, which the FFCV loader reads directly" if root.suffix == ".beton" else "a file"
        raise ConfigError(f"data source {root} is {what}, not a source folder; {_SOURCE_HELP}")
    cifar = cifar_folder(root)
    if cifar is not None:
        return cifar_source(cifar, split)
    subdirs = {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")}
    if subdirs and subdirs <= set(SPLIT_NAMES):  # root holds split folders, not class folders
        if split not in subdirs:
            raise ConfigError(f"{root} holds the splits {sorted(subdirs)}, not {split!r}; pick one of those "
                              f"or point at the split folder itself")
        root = root / split
    if not any(os.scandir(root)):
        raise ConfigError(f"data source {root} is an empty folder; {_SOURCE_HELP}")
    return ImageFolderSource(root)


def fingerprint(source: str | Path | Source, split: str = "train") -> dict:
    """Identifies a data source for the run log without decoding any image.

    Args:
        source: as for :func:`open_source`.
        split: as for :func:`open_source`.

    Returns:
        kind, root, num_files, num_samples, num_classes, class_names, and sha256: the SHA-256 of the
        sorted file listing with sizes (of the array contents for in-memory sources).
    """
    return open_source(source, split).fingerprint()


def training_fingerprint(train: str, path: str) -> dict:
    """What a run trained on, for MLflow tags and the model card (no image is decoded): ``train`` is
    ``data.train``, ``path`` the file the loader reads. A .beton carries its source's fingerprint in the
    ``<file>.json`` written by ``byol-ray prepare``."""
    import json

    if path.endswith(".beton"):
        sidecar = Path(f"{path}.json")
        if not sidecar.exists():
            return {"file": path}
        info = json.loads(sidecar.read_text()).get("source", {})
    else:
        info = fingerprint(train)
    return {k: v for k, v in info.items() if k != "class_names"}
