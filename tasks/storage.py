"""Storage through fsspec: any URL (local path, file://, gs://, memory://, ...) with optional storage options.

Writes are atomic for readers: on a local disk the bytes go to a hidden temporary name in the same folder
and are renamed into place; object stores (GCS, S3, memory) make a single-shot put visible only when
it is complete.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from stylecore.images import INPUT_EXTENSIONS as IMAGE_EXTENSIONS



class StorageError(Exception):
    """A location cannot be listed, read or written."""


@dataclass(frozen=True)
class Location:
    """A storage URL plus the options its filesystem needs (e.g. a GCS project, token or endpoint_url)."""

    url: str
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        options = dict(self.options)
        fs, path = url_to_fs(self.url, **options)
        return fs, path.rstrip("/") or "/"

    def child(self, relative: str) -> "Location":
        return Location(join(self.url, relative), self.options)

    def __str__(self) -> str:
        return self.url


def join(url: str, relative: str) -> str:
    relative = relative.lstrip("/")
    return url.rstrip("/") + "/" + relative if relative else url


def unstrip_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URL of a filesystem path (local paths stay plain paths)."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def read_bytes(location: Location) -> bytes:
    fs, path = location.filesystem()
    return fs.cat_file(path)


def write_bytes(location: Location, data: bytes) -> None:
    """Write so that no reader ever sees a partial object under the final name."""
    fs, path = location.filesystem()
    if isinstance(fs, LocalFileSystem):
        parent = posixpath.dirname(path)
        os.makedirs(parent, exist_ok=True)
        temporary = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    else:
        fs.pipe_file(path, data)


def exists(location: Location) -> bool:
    fs, path = location.filesystem()
    return fs.exists(path)


def list_files(location: Location, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
               exclude: str | None = None) -> list[tuple[str, int, str]]:
    """(relative key, size, version tag) of every file under ``location`` with one of ``extensions``,
    sorted by key. The tag is an etag/generation/mtime where the store has one, for change detection."""
    fs, root = location.filesystem()
    try:
        if not fs.exists(root):
            raise StorageError(f"{location.url} does not exist")
        if not fs.isdir(root):
            raise StorageError(f"{location.url} is not a folder or prefix")
        entries = fs.find(root, detail=True, withdirs=False)
    except StorageError:
        raise
    except Exception as error:
        raise StorageError(f"cannot list {location.url}: {error}") from error
    exclude_prefix = exclude.rstrip("/") + "/" if exclude else None
    found = []
    for path, info in entries.items():
        if info.get("type") != "file":
            continue
        if exclude_prefix and (path + "/").startswith(exclude_prefix):
            continue
        relative = path[len(root):].lstrip("/") if path.startswith(root) else path
        if not relative.lower().endswith(extensions):
            continue
        tag = str(info.get("etag") or info.get("generation") or info.get("md5Hash") or info.get("mtime") or "")
        found.append((relative, int(info.get("size") or 0), tag))
    return sorted(found)
