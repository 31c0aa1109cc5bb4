"""Paths that may be object-store URIs: one filesystem abstraction for every file a run writes or reads.

A :class:`Location` is a local path (``/mnt/shared/byol-ray``) or a URI that pyarrow's filesystem layer
understands (``s3://bucket/prefix``, ``gs://bucket/prefix``), the layer Ray Train itself uses for
``storage_path``. S3-compatible stores take their endpoint either from ``AWS_ENDPOINT_URL`` (then plain
``s3://bucket/prefix`` works, as on AWS) or from the URI's query, pyarrow's form::

    s3://bucket/runs?endpoint_override=minio.internal:9000&scheme=http

Paths are joined as paths, never as text: a child of that URI is
``s3://bucket/runs/<name>?endpoint_override=...``, query kept at the end. Credentials come from the standard
AWS variables or the default chain (instance profile, IRSA, ``~/.aws``), never from the URI: a URI is written
into ``config.yaml`` and MLflow params, so one that carries a key is refused.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import threading
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from byol_ray.config import ConfigError

_CHUNK = 64 * 2**20  # streaming copies move 64 MiB per read: each read is a ranged GET (8 MiB: 4.5x slower here)
PROBE_TIMEOUT_S = 60.0  # a store that has not answered a small write by then is unreachable for our purposes


def is_uri(value: str) -> bool:
    """``scheme://...`` other than ``file://`` (which is a local path)."""
    return "://" in value and not value.startswith("file://")


@dataclass(frozen=True)
class Location:
    """A file or folder, local or in an object store; ``/`` joins a child name."""

    uri: str

    # ------------------------------------------------------------------ naming

    @property
    def remote(self) -> bool:
        return is_uri(self.uri)

    @property
    def name(self) -> str:
        return posixpath.basename(urlsplit(self.uri).path.rstrip("/")) if self.remote else Path(self.uri).name

    def __truediv__(self, child: str) -> "Location":
        if not self.remote:
            return Location(str(Path(self.uri) / child))
        parts = urlsplit(self.uri)
        path = posixpath.join(parts.path.rstrip("/") or "/", child.strip("/"))
        return Location(urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment)))

    @property
    def parent(self) -> "Location":
        if not self.remote:
            return Location(str(Path(self.uri).parent))
        parts = urlsplit(self.uri)
        return Location(urlunsplit((parts.scheme, parts.netloc, posixpath.dirname(parts.path.rstrip("/")),
                                    parts.query, parts.fragment)))

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """A local location is an ``os.PathLike`` (``Path(loc)``, ``open(loc)``); an object-store one is not."""
        if self.remote:
            raise TypeError(f"{self.uri} is an object-store URI, not a local path")
        return str(Path(self.uri.removeprefix("file://")).expanduser())

    # ------------------------------------------------------------------ the filesystem
    # Local paths go through os and pathlib: the pure core (a --no-ray run, a GPU machine with torch alone)
    # must not need pyarrow. Object-store URIs go through pyarrow's filesystem, as Ray Train's storage does.

    @cached_property
    def _fs_path(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        if not self.remote:
            return pafs.LocalFileSystem(), self.path
        if urlsplit(self.uri).username or urlsplit(self.uri).password:
            raise ConfigError(f"{redact(self.uri)} carries credentials in the URI, which would be written to "
                              "config.yaml and MLflow; remove them and set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                              "(or use the cloud's default credentials chain)")
        try:
            return pafs.FileSystem.from_uri(self.uri)
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid (unknown scheme, bad query), OSError (no library)
            scheme = urlsplit(self.uri).scheme
            raise ConfigError(f"no filesystem for {scheme}:// URIs here ({_first_line(exc)}); use a local path, s3://bucket/"
                              "prefix (S3 and S3-compatible stores: endpoint in AWS_ENDPOINT_URL or "
                              "?endpoint_override=HOST:PORT&scheme=http) or gs://bucket/prefix") from None

    @property
    def fs(self):
        """The pyarrow filesystem (what Ray's ``storage_filesystem`` takes)."""
        return self._fs_path[0]

    @cached_property
    def path(self) -> str:
        """The path inside :attr:`fs` (``bucket/prefix`` for an object store, absolute for a local path)."""
        if not self.remote:
            return str(Path(self.uri.removeprefix("file://")).expanduser().resolve())
        return self._fs_path[1]

    def _info(self):
        return self.fs.get_file_info(self.path)

    def _type(self) -> str:
        """'file', 'dir' or 'missing'."""
        if not self.remote:
            local = Path(self.path)
            return "file" if local.is_file() else "dir" if local.is_dir() else "missing"
        import pyarrow.fs as pafs

        kind = self._info().type
        return "file" if kind == pafs.FileType.File else "dir" if kind == pafs.FileType.Directory else "missing"

    def exists(self) -> bool:
        return self._type() != "missing"

    def is_file(self) -> bool:
        return self._type() == "file"

    def is_dir(self) -> bool:
        return self._type() == "dir"

    def size(self) -> int:
        if not self.remote:
            return Path(self.path).stat().st_size
        return int(self._info().size or 0)

    def children(self) -> list[str]:
        """Names directly inside this folder ([] when it does not exist)."""
        if not self.remote:
            return sorted(os.listdir(self.path)) if self.is_dir() else []
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def _open_read(self):
        return open(self.path, "rb") if not self.remote else self.fs.open_input_stream(self.path)

    def read_bytes(self) -> bytes:
        with self._open_read() as fh:
            return fh.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file: a local file is replaced atomically; an object-store PUT is atomic by nature."""
        if not self.remote:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return
        with self.fs.open_output_stream(self.path) as fh:
            fh.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def append_line(self, line: str) -> None:
        """Append one line (a local append; an object store has none, so the small file is rewritten)."""
        if not self.remote:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(line.rstrip("\n") + "\n")
            return
        before = self.read_text() if self.exists() else ""
        self.write_text(before + line.rstrip("\n") + "\n")

    def unlink(self) -> None:
        if not self.is_file():
            return
        if self.remote:
            self.fs.delete_file(self.path)
        else:
            Path(self.path).unlink(missing_ok=True)

    def mkdir(self) -> None:
        """Create the folder (a no-op in an object store, which has no folders until something is in them)."""
        if not self.remote:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def remove_tree(self) -> None:
        if not self.is_dir():
            return
        if self.remote:
            self.fs.delete_dir(self.path)
        else:
            shutil.rmtree(self.path)

    def upload_tree(self, local: str | Path) -> None:
        """Copy the local folder ``local`` into this location (files overwritten, nothing else removed)."""
        if not self.remote:
            shutil.copytree(local, self.path, dirs_exist_ok=True)
            return
        import pyarrow.fs as pafs

        pafs.copy_files(str(Path(local).resolve()), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, dest: str | Path, *, progress: Callable[[int], None] | None = None,
                 digest: Any = None) -> int:
        """Stream this file into the local file ``dest``; returns the bytes copied.

        Args:
            dest: local file written (its folder must exist).
            progress: called with each chunk's size.
            digest: a hashlib object updated with every byte (a checksum without a second read).
        """
        copied = 0
        with self._open_read() as src, open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                if digest is not None:
                    digest.update(chunk)
                if progress is not None:
                    progress(len(chunk))
                copied += len(chunk)
        return copied

    def download_tree(self, dest: str | Path) -> Path:
        """Copy this folder (or file) to the local ``dest`` folder; returns the local copy's path."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if self.is_file():
            target = dest / self.name
            self.download(target)
            return target
        if not self.remote:
            shutil.copytree(self.path, dest, dirs_exist_ok=True)
            return dest
        import pyarrow.fs as pafs

        pafs.copy_files(self.path, str(dest.resolve()), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return dest


def location(value: str | Path | Location) -> Location:
    return value if isinstance(value, Location) else Location(str(value))


def redact(uri: str) -> str:
    """``uri`` without any user:password part (for messages)."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, parts.query, parts.fragment))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _explain(exc: BaseException, where: Location) -> str:
    """What an object store's error means for the user, in a few words."""
    text = str(exc)
    bucket = urlsplit(where.uri).netloc
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return f"the bucket {bucket!r} does not exist (create it first)"
    if any(code in text for code in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                     "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "Forbidden", "403")):
        return ("the store refused the credentials (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the node's "
                "role, and that it may write under this prefix)")
    if any(code in text for code in ("NETWORK_CONNECTION", "Could not connect", "Couldn't resolve", "curlCode")):
        return ("the endpoint cannot be reached (check AWS_ENDPOINT_URL or ?endpoint_override=HOST:PORT&scheme=http, "
                "and that the store is up)")
    return _first_line(exc)


def _with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn`` in a daemon thread; TimeoutError when it has not returned within ``timeout_s``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="byol-ray-storage-probe")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_writable(where: str | Location, key: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail in one line, before any work, when ``where`` (the value of config key ``key``) cannot be written.

    A small probe object is written under it and removed again: this catches an unknown scheme, an unreachable
    endpoint, a missing bucket, refused credentials and a read-only prefix.
    """
    where = location(where)
    try:
        fs = where.fs
        path = posixpath.join(where.path, f".byol-ray-probe-{uuid.uuid4().hex[:12]}")
        where.mkdir()

        def write_and_remove() -> None:
            with fs.open_output_stream(path) as fh:
                fh.write(b"probe")
            fs.delete_file(path)

        _with_timeout(write_and_remove, timeout_s)
    except ConfigError as exc:
        raise ConfigError(f"{key}={redact(where.uri)!r}: {exc}") from None
    except TimeoutError as exc:
        raise ConfigError(f"{key}={redact(where.uri)!r} is not writable: the store did not answer ({exc}); check "
                          "the endpoint and the network") from None
    except OSError as exc:
        reason = exc.strerror if not where.remote and exc.strerror else _explain(exc, where)
        raise ConfigError(f"{key}={redact(where.uri)!r} is not writable: {reason}; choose a writable folder or "
                          "object-store prefix") from None


def check_readable_file(where: str | Location, key: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """The size of the object-store file ``where`` (config key ``key``); a one-line error when it cannot be read."""
    where = location(where)
    try:
        info = _with_timeout(where._info, timeout_s)
    except ConfigError as exc:
        raise ConfigError(f"{key}={redact(where.uri)!r}: {exc}") from None
    except (TimeoutError, OSError) as exc:
        raise ConfigError(f"{key}={redact(where.uri)!r} cannot be read: {_explain(exc, where)}") from None
    import pyarrow.fs as pafs

    if info.type != pafs.FileType.File:
        raise ConfigError(f"{key}={redact(where.uri)!r} does not exist (no such object); check the bucket and "
                          "key, or upload the file written by `byol-ray prepare` there")
    return int(info.size or 0)


def free_bytes(folder: str | Path) -> int:
    """Free space on the disk holding ``folder`` (its nearest existing parent)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
