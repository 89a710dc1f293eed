"""Storage through fsspec: any URL (local path, file://, gs://, memory://, ...) with optional storage options.

Writes are atomic for readers: on a local disk the bytes go to a hidden temporary name in the same folder
and are renamed into place; object stores (GCS, S3, memory) make a single-shot put visible only when
it is complete.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import fsspec
import fsspec.asyn
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from stylecore.checkpoint import CheckpointError
from stylecore.images import INPUT_EXTENSIONS as IMAGE_EXTENSIONS
from stylecore.train import TrainingDiverged
from stylecore.vgg import VGGWeightsError

from .secrets import redact, reveal_options


class StorageError(Exception):
    """A location cannot be listed, read or written."""


class InputError(Exception):
    """One input cannot be used (gone, a folder, not readable, too large): that input gets an error row,
    unlike a StorageError, which means the store itself is failing and the work should be retried."""


@dataclass(frozen=True)
class Location:
    """A storage URL plus the options its filesystem needs (e.g. a GCS project, token or endpoint_url)."""

    url: str
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        if self.url.startswith("/") and not self.options:  # a local path: what url_to_fs gives, in a fifth of its time
            fs, path = _LOCAL, _LOCAL._strip_protocol(self.url)  # (15 us a call, three calls an image in a shard)
        else:
            fs, path = _url_filesystem(self.url, dict(self.options))
        return fs, path.rstrip("/") or "/"

    def child(self, relative: str) -> "Location":
        return Location(join(self.url, relative), self.options)

    @property
    def display(self) -> str:
        """The URL with any credentials masked: the only form that goes into logs, manifests and artifacts. A local
        path's "?name=value" is part of a file's name, not a query, and stays as it is."""
        local = "::" not in self.url and ("://" not in self.url or self.url.lower().startswith("file://"))
        return printable(redact(self.url, self.options, queries=not local))

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"Location({self.display!r})"


_LOCAL = LocalFileSystem()


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a local file name that is not (old archives' Latin-1 names, which Python holds as
    lone surrogates) gets its raw bytes as ``\\xe9`` escapes, so logs and the manifest (Parquet) can hold it."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode()


class Listed(NamedTuple):
    """One entry of a listing: relative key, size, version tag, and why it cannot be used (None if it can)."""

    key: str
    size: int
    tag: str
    problem: str | None = None


def join(url: str, relative: str) -> str:
    """``url``/``relative``, keeping ``relative`` exactly (object stores allow keys like ``/a`` or ``a//b``)."""
    return url.rstrip("/") + "/" + relative if relative else url


_CHAIN_LINK = re.compile(r"::([A-Za-z][A-Za-z0-9+.-]*)(://|::|$)")


def _is_chained(url: str) -> bool:
    """Whether a link after a "::" names a file system: "::file://…", or a bare known protocol ("::zip")."""
    return any(match.group(2) == "://" or match.group(1) in fsspec.available_protocols()
               for match in _CHAIN_LINK.finditer(url))


def _url_filesystem(url: str, options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    """``url_to_fs``, but where the URL is not a chain of file systems, "::" in it is part of a name: fsspec reads
    every "::" as a link of a chain, so an object named "10::30 sunrise.jpg" led to "…/10". A chained URL
    ("simplecache::gs://…", "zip://member::file://…": a link that names a protocol) is fsspec's to parse."""
    protocol, separator, _ = url.partition("://")
    if not separator or "::" in protocol or _is_chained(url):
        return url_to_fs(url, **options)
    cls = fsspec.get_filesystem_class(protocol)
    return fsspec.filesystem(protocol, **{**cls._get_kwargs_from_urls(url), **options}), cls._strip_protocol(url)


def unstrip_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URL of a filesystem path (local paths stay plain paths)."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def read_bytes(location: Location) -> bytes:
    fs, path = location.filesystem()
    return fs.cat_file(path)


def read_input(location: Location, max_bytes: int) -> bytes:
    """An input file's bytes, reading at most ``max_bytes`` + 1 of them. Problems with this one file raise
    InputError; anything else (the store failing) propagates, for the caller to retry."""
    fs, path = location.filesystem()
    try:
        if isinstance(fs, LocalFileSystem):  # 3x faster than fsspec's cat_file for small files
            with open(path, "rb") as file:  # read(n) sets n bytes aside first: not more than the file holds
                data = file.read(min(max_bytes, os.fstat(file.fileno()).st_size) + 1)
        else:
            data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except FileNotFoundError:
        raise InputError("file not found (deleted or moved since the listing)") from None
    except IsADirectoryError:
        raise InputError("a folder, not an image file") from None
    except PermissionError:
        raise InputError("permission denied") from None
    if len(data) > max_bytes:
        raise InputError(f"file is larger than the limit of {max_bytes:,} bytes")
    return data


def write_bytes(location: Location, data: bytes) -> None:
    """Write so that no reader ever sees a partial object under the final name."""
    fs, path = location.filesystem()
    if isinstance(fs, LocalFileSystem):
        parent = posixpath.dirname(path)
        temporary = posixpath.join(parent, f".{posixpath.basename(path)[:200]}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        try:
            try:
                file = open(temporary, "wb")
            except FileNotFoundError:  # the folder is new (cheaper than makedirs before every write)
                os.makedirs(parent, exist_ok=True)
                file = open(temporary, "wb")
            with file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            if isinstance(error, OSError) and error.filename == temporary:
                error.filename = path  # name the file the user knows, not the temporary one that is gone
            raise
    else:
        fs.pipe_file(path, data)


def remove(location: Location) -> None:
    """Delete a file or folder (recursively) if it is there; best effort (a leftover is harmless)."""
    fs, path = location.filesystem()
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception:
        pass


PARTIAL_SUFFIX = ".partial"


def remove_partial_files(destination: Location) -> int:
    """Delete the temporary files of writes that a killed process left behind (local disks only: object
    stores never show a partial object). Returns how many were removed."""
    fs, root = destination.filesystem()
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(root):
        return 0
    removed = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


class InsideCheck:
    """Whether targets really lie under ``root``: on a local disk symbolic links are resolved, so a link inside
    the destination cannot lead a write elsewhere (object stores have no links). Each folder's links are
    resolved once: resolving every path in full cost a bucket run 16 lstat calls an image."""

    def __init__(self, root: Location):
        fs, root_path = root.filesystem()
        self.local = isinstance(fs, LocalFileSystem)
        self.real_root = os.path.realpath(root_path) if self.local else ""
        self.real_folders: dict[str, str] = {}

    def allows(self, target: Location) -> bool:
        if not self.local:
            return True
        _, path = target.filesystem()
        folder, name = posixpath.split(path)
        real_folder = self.real_folders.get(folder)
        if real_folder is None:
            real_folder = self.real_folders[folder] = os.path.realpath(folder)
        real = os.path.realpath(path) if os.path.islink(path) else posixpath.join(real_folder, name)
        return os.path.commonpath([real, self.real_root]) == self.real_root


def exists(location: Location) -> bool:
    fs, path = location.filesystem()
    return fs.exists(path)


def missing_bucket(location: Location) -> str | None:
    """The bucket of an object-store URL (gs://, s3://, ...) where the store says it does not exist; None otherwise,
    and where it cannot tell (a key that may write objects without reading the bucket). Writing into a missing bucket
    fails only at the first write: after a whole priming, or as a failed run that "run again" never mends."""
    fs, path = location.filesystem()
    if getattr(fs, "root_marker", "/") != "" or not hasattr(fs, "split_path"):  # not a store of buckets
        return None
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)
        return None
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001 (no permission to look, a flaky call: the first write will tell)
        return None
    try:  # gcsfs answers "not found" for an empty bucket it may not read as a bucket (403): its listing says
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        return bucket
    except Exception:  # noqa: BLE001
        return None
    return None


class MissingBucket(ValueError):
    """A location to write into lies in a bucket that does not exist."""


def check_bucket_exists(location: Location, what: str) -> None:
    """Raise MissingBucket, naming ``what`` the location is (model store, destination), where its bucket is missing."""
    bucket = missing_bucket(location)
    if bucket:
        raise MissingBucket(f"the {what} {location.display} lies in bucket {bucket!r}, which does not exist; "
                            "create it first")


def file_size(location: Location) -> int | None:
    """The size of the file (the object) there, or None where there is none: nothing, a folder or a prefix."""
    fs, path = location.filesystem()
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return int(info.get("size") or 0) if info.get("type") == "file" else None


def list_files(location: Location, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
               exclude: str | None = None) -> list[Listed]:
    """Every entry under ``location`` whose name ends in one of ``extensions``, sorted by key. The tag is an
    etag/generation/mtime where the store has one, for change detection. Entries that cannot be used are
    listed too, with their problem, so that each gets a manifest row: folders named like images, and (on a
    local disk) symbolic links that are broken or lead outside ``location``."""
    fs, root = location.filesystem()
    exclude_prefix = exclude.rstrip("/") + "/" if exclude else None
    found = []
    try:
        if not fs.exists(root):
            raise StorageError(f"{location.display} does not exist")
        if not fs.isdir(root):
            raise StorageError(f"{location.display} is not a folder or prefix")
        for path, info in _entries(fs, root):
            if exclude_prefix and (path + "/").startswith(exclude_prefix):
                continue
            # exactly what follows "root/": an object key may itself start with "/" or hold "//"
            relative = path[len(root) + 1:] if path.startswith(root.rstrip("/") + "/") else ""
            if relative and info.get("islink") and isinstance(fs, LocalFileSystem) and os.path.isdir(path):
                # a link to a folder is not walked (links can loop), but its images must not vanish unnoticed
                found.append(Listed(relative, 0, "", "a symbolic link to a folder, not followed; give the folder "
                                                     "it leads to as a source of its own"))
                continue
            if not relative or not relative.lower().endswith(extensions):
                continue
            tag = _version_tag(info)
            problem = None
            if info.get("type") == "directory":
                problem = "a folder, not an image file"
            elif info.get("islink") or info.get("type") != "file":
                problem = _link_problem(fs, root, path)
            found.append(Listed(relative, int(info.get("size") or 0), tag, problem))
    except StorageError:
        raise
    except Exception as error:
        raise StorageError(f"cannot list {location.display}: {redact(error, location.options)}") from error
    finally:
        _forget_listing(fs, root)
    # An object store can hold an object "x.jpg" beside objects under "x.jpg/": one key, an image and a folder.
    # The image is the input (the folder's images are listed on their own): one entry, one row.
    found.sort(key=lambda entry: (entry.key, entry.problem is not None))
    return [entry for index, entry in enumerate(found) if index == 0 or entry.key != found[index - 1].key]


# What stores call an object's version, most telling first: GCS and gcsfs (etag, generation, md5Hash), local disks
# (mtime), S3 (ETag, LastModified), fsspec's memory:// and others (created). "" where none: the version is unknown.
_VERSION_FIELDS = ("etag", "ETag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "created")


def _version_tag(info: dict) -> str:
    return str(next((info[field] for field in _VERSION_FIELDS if info.get(field)), ""))


def _entries(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, dict]]:
    """(path, details) of everything under ``root``. Where ``find`` is fsspec's generic one (local disks), the walk
    behind it is taken a folder at a time, as ``find`` would hold every file's details at once (``list_files`` of
    100,000 files in 100 folders peaked 104 MB above its start that way, 28 MB now); object stores keep their own
    flat ``find``, but gcsfs's is read a page at a time (``_gcs_entries``)."""
    if _lists_gcs_in_pages(fs):
        yield from _gcs_entries(fs, root)
        return
    if type(fs).find is not fsspec.AbstractFileSystem.find:
        yield from fs.find(root, detail=True, withdirs=True).items()
        return
    folders = [root]
    while folders:  # fsspec's walk leaves out subfolders it cannot list (and drops on_error below the top)
        folder = folders.pop()
        try:
            listing = fs.ls(folder, detail=True)
        except FileNotFoundError:  # deleted since its parent was listed: nothing to do there
            if folder == root:
                raise
            continue
        for info in listing:
            path = info["name"].rstrip("/")
            if path == folder:
                continue
            yield path, info
            if info["type"] == "directory" and not info.get("islink"):  # links can loop: not walked
                folders.append(path)


GCS_PAGE = 1000  # objects per listing request: the most GCS returns


def _lists_gcs_in_pages(fs: fsspec.AbstractFileSystem) -> bool:
    return type(fs).__name__ == "GCSFileSystem" and hasattr(fs, "_call_list_objects") and hasattr(fs, "split_path")


def _gcs_entries(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, dict]]:
    """What gcsfs's ``find(root, detail=True, withdirs=True)`` gives, one page of the flat listing at a time.
    ``find`` gathers every object's details before returning any (about 3.7 KB an object: gigabytes for a bucket
    of millions, all at once); here each page's are dropped once read. Folders are not objects in GCS: as ``find``
    does, each folder on the way to an object is given once (a placeholder object named ``folder/`` included)."""
    bucket, key, _ = fs.split_path(root)
    prefix = key.rstrip("/") + "/" if key else None
    base = root.rstrip("/")
    folders: set[str] = set()
    token = None
    while True:
        page = fsspec.asyn.sync(fs.loop, fs._call_list_objects, bucket, delimiter="", prefix=prefix,  # noqa: SLF001
                                maxResults=GCS_PAGE, pageToken=token)
        for item in page.get("items", []):
            path = f"{bucket}/{item['name']}"
            parts = path[len(base) + 1:].split("/")
            for depth in range(1, len(parts)):
                folder = "/".join([base, *parts[:depth]])
                if folder not in folders:
                    folders.add(folder)
                    yield folder, {"name": folder, "type": "directory", "size": 0}
            if not path.endswith("/"):  # a placeholder's folder was given above
                yield path, {"name": path, "type": "file", "size": int(item.get("size") or 0),
                             "etag": item.get("etag"), "generation": item.get("generation"),
                             "md5Hash": item.get("md5Hash")}
        token = page.get("nextPageToken")
        if not token:
            return


def _forget_listing(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Drop the listing cache's entries under ``root``. Object stores' file systems (gcsfs, s3fs) keep every
    object's metadata a ``find`` returned (about 1.7 KB an object with gcsfs: 1.7 GB for a million images) for the
    life of the file system instance, which fsspec shares across the process; nothing here reads them again."""
    cache = getattr(fs, "dircache", None)
    if not cache:
        return
    root = root.rstrip("/")
    try:
        stale = [key for key in list(cache) if key == root or key.startswith(root + "/")]
    except RuntimeError:  # another thread changed the cache meanwhile: it is only a cache, leave it
        return
    for key in stale:
        cache.pop(key, None)


def _link_problem(fs: fsspec.AbstractFileSystem, root: str, path: str) -> str | None:
    """Why a local symbolic link (or other special file) is not followed; None for a link to a file inside root."""
    if not isinstance(fs, LocalFileSystem) or not os.path.islink(path):
        return "not a regular file"
    target = os.path.realpath(path)
    if not os.path.isfile(target):
        return "broken symbolic link" if not os.path.exists(target) else "symbolic link to something not a file"
    if os.path.commonpath([target, os.path.realpath(root)]) != os.path.realpath(root):
        return "symbolic link leading outside the source folder, not followed"
    return None


@contextlib.contextmanager
def masked_errors(what: str, storage: dict) -> Iterator[None]:
    """Whatever fails in here reaches Prefect (its state message, its logs of each retry) with credentials masked:
    a store's own errors quote the request's URL, user and password included. Errors that are this project's own
    words (a bad checkpoint, a bad value, unusable VGG weights, a training that diverged) pass unchanged: they are
    not storage failures that a retry could mend."""
    try:
        yield
    except (CheckpointError, StorageError, ValueError, VGGWeightsError, TrainingDiverged):
        raise
    except Exception as error:
        raise StorageError(f"{what}: {type(error).__name__}: {redact(error, storage)}") from None


def masking_errors(function: Callable) -> Callable:
    """``function`` (a task taking ``storage_options``) under ``masked_errors``."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def masked(*args, **kwargs):
        options = signature.bind_partial(*args, **kwargs).arguments.get("storage_options")
        with masked_errors(f"{function.__name__.removesuffix('_task')} failed", reveal_options(options)):
            return function(*args, **kwargs)

    return masked
