"""Checkpoint files: atomic save (write, fsync, rename), validated load, latest-in-folder lookup."""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from byol_ray.config import ConfigError, NoSpaceError

CHECKPOINT_NAME = "state.pt"
REQUIRED_KEYS = ("online", "target", "optimizer", "scaler", "step", "epoch", "rng", "config")


def save_checkpoint(state: dict[str, Any], path: str | Path, *, durable: bool = True) -> Path:
    """Write ``state`` so that ``path`` is either the old file or the complete new one, never half.

    Args:
        state: an engine state dict.
        path: destination file; its folder is created.
        durable: fsync before the rename. False for a staging copy that is uploaded elsewhere (Ray Train's
            storage): the upload is what must survive a crash, and the fsync would only stall the step loop.

    Returns:
        The path written.
    """
    path = Path(path)
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        # torch's zip writer reports a full disk as "[enforce fail at inline_container.cc] ... unexpected pos"
        needed, free = _tensor_bytes(state), shutil.disk_usage(path.parent).free
        if created:
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        if getattr(exc, "errno", None) == errno.ENOSPC or free < needed:
            raise NoSpaceError(errno.ENOSPC, f"no space left on device for checkpoint {path} (about "
                               f"{needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free); earlier checkpoints "
                               "are intact: free space (or lower ray.num_to_keep), then --resume the run") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its checkpoint file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: a ``state.pt`` file, or a folder holding one.
        map_location: device for the tensors.

    Returns:
        The state dict; raises ``FileNotFoundError``/``ValueError`` naming the file when it is missing,
        unreadable or not a byol-ray checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a state.pt file or a checkpoint folder")
    try:
        # weights_only: tensors, containers and numbers only, plus the numpy pieces of np.random.get_state();
        # a file that asks for anything else (a crafted pickle that would run a command) is refused unrun
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names what the file asked for: "... unsupported GLOBAL posix.system ..." / "Unsupported global: ..."
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:
            reason = " ".join(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".split())[:200]
            raise ConfigError(f"checkpoint {path} is unreadable ({reason}); it may be truncated or not a "
                              "checkpoint") from None
        raise ConfigError(f"checkpoint {path} asks to load {found.group(1)}, which no byol-ray checkpoint holds; "
                          "refused without running it (checkpoints are loaded with torch.load(weights_only=True))"
                          ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise ConfigError(f"checkpoint {path} is unreadable ({reason}); it may be truncated or not a checkpoint") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(f"{path} is not a byol-ray checkpoint (missing {', '.join(missing)})")
    return state


def _numpy_rng_globals() -> list:
    """What ``np.random.get_state()`` pickles as: an array of uint32 (numpy 1 and 2 spell the module differently)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


CHECKPOINT_DIR_RE = re.compile(r"epoch_(\d+)(?:-step_(\d+))?")


def checkpoint_dir_name(epoch: int, step: int | None = None) -> str:
    """``epoch_NNNN`` at the end of epoch NNNN, ``epoch_NNNN-step_SSSSSSSS`` inside the next epoch (NNNN epochs
    done, at global step SSSSSSSS): names sort in training order."""
    return f"epoch_{epoch:04d}" if step is None else f"epoch_{epoch:04d}-step_{step:08d}"


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what a save killed mid-write (``kill -9``, a lost node) left under ``folder``: ``.state.pt.tmp-PID``
    files whose writer is gone, and checkpoint folders left empty by them. Returns the paths removed."""
    removed = []
    for tmp in Path(folder).glob(f"epoch_*/.{CHECKPOINT_NAME}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is writing it right now
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
        with contextlib.suppress(OSError):  # only when nothing else is in it
            tmp.parent.rmdir()
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``epoch_NNNN[-step_SSSSSSSS]/state.pt`` under ``folder`` (epoch-end or mid-epoch), or None."""
    folder = Path(folder)
    found = []
    for candidate in folder.glob(f"epoch_*/{CHECKPOINT_NAME}"):
        match = CHECKPOINT_DIR_RE.fullmatch(candidate.parent.name)
        if match:
            found.append((int(match.group(1)), int(match.group(2) or -1), candidate))
    return max(found)[2] if found else None
