"""Cheap checks of training data before any work starts: FFCV available, .beton complete, folders holding images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from byol_ray.config import ConfigError
from byol_ray.data.demo import DEMO_NAME
from byol_ray.data.sources import IMAGE_EXTENSIONS, cifar_folder
from byol_ray.storage import Location, check_readable_file, is_uri, redact

LOADERS = ("ffcv", "torch", "memory")
NO_FFCV_HINT = "use the torch loader instead (backend='torch', config data.loader=torch), which reads the source folder"
_FIX = "re-create it with `byol-ray prepare SOURCE {path} --overwrite`"


def require_ffcv(hint: str) -> None:
    """Imports FFCV once, or raises ImportError that names the alternative in ``hint``.

    Importing FFCV calls torch.set_num_threads(1) (its Compiler's default), which would silently
    make a CPU training loop single-threaded; the caller's thread count is restored.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        _cache_numba_typed_dict()
        import ffcv  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
    except Exception as exc:  # ImportError, or OSError when libturbojpeg/OpenCV are missing
        raise ImportError(f"FFCV is not importable here ({type(exc).__name__}: {exc}); {hint}") from exc
    finally:
        torch.set_num_threads(threads)
    _ignore_numba_finalizer_race()


def _cache_numba_typed_dict() -> None:
    """Keep numba's compiled typed-dict operations on disk, so that importing FFCV costs a process about 2 s less.

    FFCV fills a numba typed dict when it is imported (``ffcv.fields.rgb_image.IMAGE_MODES``), and numba compiles
    the dict's operations for it in every process, anew: about 2 s of CPU on the 2-core machine, in each Ray Train
    worker, driver and ``prepare`` (measured: docs/design.md, "The test suite"). Numba's own on-disk cache (what
    ``@njit(cache=True)`` turns on: next to numba's sources, else the user's cache folder, or ``NUMBA_CACHE_DIR``)
    makes that a load. The compiled code is the same; where nothing can be cached, nothing changes.
    """
    try:
        from numba.core.dispatcher import Dispatcher
        from numba.typed import typeddict
    except ImportError:  # no numba: FFCV's own import names what is missing
        return
    for name in ("_make_dict", "_setitem", "_getitem", "_length", "_contains"):
        dispatcher = getattr(typeddict, name, None)
        if isinstance(dispatcher, Dispatcher):
            try:
                dispatcher.enable_caching()
            except RuntimeError:  # no writable cache location: compile as before
                return


def _ignore_numba_finalizer_race() -> None:
    """Drop one harmless message: when a loader's compiled pipeline is garbage-collected while another thread
    compiles, numba's dispatcher finalizer iterates a dict that changes under it and ends with
    ``Exception ignored in: <finalize object ...> KeyError: (Array(uint8, ...)...)`` (it was only releasing
    compiled code; the process is fine). Every other unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "byol_ray_numba_filter", False):
        return

    def in_numba_finalizer(tb) -> bool:
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "finalizer" and code.co_filename.endswith(os.path.join("numba", "core",
                                                                                      "dispatcher.py")):
                return True
            tb = tb.tb_next
        return False

    def hook(unraisable) -> None:
        if unraisable.exc_type is KeyError and in_numba_finalizer(unraisable.exc_traceback):
            return
        previous(unraisable)

    hook.byol_ray_numba_filter = True
    sys.unraisablehook = hook


def validate_beton(path: str | Path) -> dict:
    """Checks that a file is a complete .beton with an RGB 'image' and an int 'label' field.

    Reads the header, the field descriptors and the sample tables, never an image.

    Args:
        path: the .beton file.

    Returns:
        {'path', 'num_samples', 'fields'}; raises FileNotFoundError, or ConfigError (a ValueError) in
        one line naming the file and the command that re-creates it when it is truncated or foreign.
    """
    path = Path(path).expanduser().resolve()
    fix = _FIX.format(path=path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {fix}")
    require_ffcv("reading a .beton needs FFCV; point the torch loader (data.loader=torch) at the source folder")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise ConfigError(f"{path} is truncated: {size} bytes, too few for an FFCV file; {fix}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise ConfigError(f"{path} is not a readable FFCV file (format version field {header['version']}, "
                          f"expected {CURRENT_VERSION}); {fix}")
    ptr = int(header["alloc_table_ptr"])
    if not 0 < ptr <= size or (size - ptr) % ALLOC_TABLE_TYPE.itemsize:
        # The allocation table is written last, at the end: a cut file loses it first.
        raise ConfigError(f"{path} is truncated: {size} bytes, but its allocation table starts at byte {ptr}; {fix}")
    try:
        reader = Reader(str(path))
        table = reader.alloc_table
        complete = (len(reader.metadata) == reader.num_samples and len(table) >= reader.num_samples
                    and (len(table) == 0 or int((table["ptr"] + table["size"]).max()) <= ptr))
    except Exception as exc:  # numpy errors from a damaged field table, unknown field types...
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, whatever numpy says
        raise ConfigError(f"{path} is not a readable FFCV file ({reason}); {fix}") from None
    if not complete:
        raise ConfigError(f"{path} is truncated or damaged (samples point past its data region); {fix}")
    kinds = {name: type(h).__name__ for name, h in reader.handlers.items()}
    if not (isinstance(reader.handlers.get("image"), RGBImageField)
            and isinstance(reader.handlers.get("label"), IntField)):
        raise ConfigError(f"{path} has fields {kinds}, not the 'image' (RGBImageField) and 'label' (IntField) "
                          f"that byol-ray writes; {fix}")
    return {"path": str(path), "num_samples": int(reader.num_samples), "fields": kinds}


def _first_image(root: Path) -> str | None:
    """The first image file under ``root`` (hidden files and folders skipped), or None; stops at the first."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                return os.path.join(dirpath, name)
    return None


def check_training_data(path: str, loader: str) -> None:
    """Fails in one line, before any worker starts, when ``loader`` cannot train on ``path``.

    Cheap: a .beton's header and tables are read (never an image), a folder is walked only up to
    its first image file (a CIFAR python folder is recognised by its batch files).

    Args:
        path: config data.train: 'demo', an image folder, a CIFAR python folder or a .beton file.
        loader: config data.loader: 'ffcv', 'torch' or 'memory'.

    Raises:
        ConfigError: the path does not exist, is a truncated or foreign .beton, is a folder without
            images, or is a .beton given to a loader that reads source images.
    """
    if loader not in LOADERS:
        raise ConfigError(f"data.loader={loader!r}: choose one of {LOADERS}")
    if path == DEMO_NAME:
        return
    if is_uri(path):
        check_remote_beton(path, "data.train", loader)
        return
    where = Path(path).expanduser()
    if not where.exists():
        raise ConfigError(f"data.train={path!r} does not exist; point it at an image folder, a CIFAR folder or a "
                          ".beton written by `byol-ray prepare`")
    if where.is_dir():
        if cifar_folder(where) is None and _first_image(where) is None:
            raise ConfigError(f"data.train={path!r} is a folder without images ({', '.join(IMAGE_EXTENSIONS)}) or "
                              "CIFAR batch files; point it at an ImageFolder (root/<class>/<image>) or a CIFAR folder")
        return
    if where.suffix != ".beton":
        raise ConfigError(f"data.train={path!r} is a file but not a .beton; point it at the image folder, or convert "
                          f"it with `byol-ray prepare SOURCE OUT.beton`")
    if loader != "ffcv":
        raise ConfigError(f"data.train={path!r} is a .beton file, which only the FFCV loader reads (data.loader="
                          f"{loader} reads source images); set data.loader=ffcv or point data.train at the source "
                          "image folder")
    try:
        validate_beton(where)
    except ImportError as exc:
        raise ConfigError(f"data.train={path!r} is a .beton, but FFCV is not importable here "
                          f"({type(exc.__cause__ or exc).__name__}); install FFCV, or set data.loader=torch and "
                          "point data.train at the source image folder") from None
    except ConfigError as exc:  # name the setting: the user fixes data.train, not a file they never named
        raise ConfigError(f"data.train={path!r}: {exc}") from None


def check_remote_beton(uri: str, key: str, loader: str = "ffcv") -> int:
    """Fails in one line when the object-store file ``uri`` (config key ``key``) is not a usable .beton.

    Reads the object's size and its FFCV header (a few hundred bytes), never the data: the store is reachable,
    the object exists, and its allocation table lies where a complete file has it.

    Returns:
        The number of samples the header announces.
    """
    shown = redact(uri)
    if not Location(uri).name.endswith(".beton"):
        raise ConfigError(f"{key}={shown!r}: data in an object store must be a .beton file (it is copied to each "
                          "node's data.cache_dir); convert the images with `byol-ray prepare SOURCE OUT.beton` and "
                          "upload OUT.beton with its OUT.beton.json")
    if loader != "ffcv":
        raise ConfigError(f"{key}={shown!r} is a .beton file, which only the FFCV loader reads; set data.loader=ffcv")
    size = check_readable_file(uri, key)
    require_ffcv("reading a .beton needs FFCV")
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    fix = f"re-create it with `byol-ray prepare` and upload it again to {shown}"
    if size < HeaderType.itemsize:
        raise ConfigError(f"{key}={shown!r} is truncated: {size} bytes, too few for an FFCV file; {fix}")
    where = Location(uri)
    with where.fs.open_input_file(where.path) as fh:
        header = np.frombuffer(fh.read_at(HeaderType.itemsize, 0), dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise ConfigError(f"{key}={shown!r} is not a readable FFCV file (format version field {header['version']}, "
                          f"expected {CURRENT_VERSION}); {fix}")
    ptr = int(header["alloc_table_ptr"])
    if not 0 < ptr <= size or (size - ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise ConfigError(f"{key}={shown!r} is truncated: {size} bytes, but its allocation table starts at byte "
                          f"{ptr}; {fix}")
    return int(header["num_samples"])
