"""Stylising a bucket: listing it into stable shards, and streaming one shard through the models.

Inside a shard, reading runs ahead in background threads, the stylisation engine (stylecore.engine) decodes,
stylises and encodes in overlapped batches, and writing runs behind in background threads; every queue is
bounded by count and by bytes, so memory does not grow with the shard or with the size of its images.

Nothing is lost and nothing is done twice: every input gets exactly one row per model (``ok``; ``skipped`` when
an earlier run already made it, while a retry within the same run keeps its earlier attempt's ``ok``; or
``error`` with a reason: undecodable, too large, a folder, a broken link, ...). A storage failure raises instead,
failing the shard (its task is retried). While a shard runs, the rows of finished outputs are journaled every few
seconds, so a crash (even kill -9) costs only the images since the last journal entry; the shard's manifest part,
written last, means "shard done".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from fsspec.implementations.local import LocalFileSystem

from stylecore.engine import EngineConfig, Job, Outcome, StylizeEngine
from stylecore.images import DEFAULT_MAX_PIXELS, EXTENSIONS, output_format
from stylecore.model import UNet

from . import manifest
from .lease import DestinationLease
from .storage import (
    IMAGE_EXTENSIONS, InputError, InsideCheck, Listed, Location, StorageError, file_size, list_files, read_input, remove,
    remove_partial_files, write_bytes,
)

PARTS_FOLDER = "_manifest_parts"
MANIFEST_NAME = "manifest.parquet"
DEFAULT_MAX_IMAGE_BYTES = 100_000_000
MAX_SEGMENT_BYTES = 180  # file systems allow 255 bytes a name; leave room for the hash and the extension
SAME_FORMAT = "same"  # output format: keep each input's own (JPEG, PNG, WebP; anything else becomes PNG)


@dataclass(frozen=True)
class Shard:
    shard_id: str
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    problems: tuple[str | None, ...] = ()  # per key: why it cannot be read (a folder, a broken link), or None
    # Keys whose output name would clash with another input's (a.jpg and a.png -> a.jpg): they get a hash in it.
    clashing: frozenset[str] = frozenset()
    tags: tuple[str, ...] = ()  # per key: its version as listed (etag, generation or mtime)

    def __len__(self) -> int:
        return len(self.keys)

    def problem(self, index: int) -> str | None:
        return self.problems[index] if self.problems else None

    def tag(self, index: int) -> str | None:
        return self.tags[index] if self.tags else None


def make_shards(files: list[Listed | tuple], shard_size: int) -> list[Shard]:
    """Split a sorted listing into shards; a shard's id hashes its keys, sizes and version tags."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    files = [Listed(*entry) for entry in files]
    by_stem: dict[str, list[str]] = {}
    for entry in files:  # case-insensitively, as on macOS and Windows disks
        by_stem.setdefault(posixpath.splitext(entry.key)[0].lower(), []).append(entry.key)
    clashing = {key for keys in by_stem.values() if len(keys) > 1 for key in keys}
    shards = []
    for start in range(0, len(files), shard_size):
        chunk = files[start : start + shard_size]
        digest = hashlib.sha256(json.dumps(chunk, separators=(",", ":")).encode()).hexdigest()[:16]
        shards.append(Shard(digest, tuple(f.key for f in chunk), tuple(f.size for f in chunk),
                            tuple(f.problem for f in chunk) if any(f.problem for f in chunk) else (),
                            frozenset(f.key for f in chunk if f.key in clashing), tuple(f.tag for f in chunk)))
    return shards


def check_apart(source: Location, destination: Location) -> None:
    """Refuse a destination that is the source or holds it: outputs would land among the inputs (``a.jpg`` over
    ``a.jpg``), and the listing, which leaves the destination out, would find nothing to do. A destination inside
    the source is fine: it is left out of the listing."""
    source_fs, source_path = source.filesystem()
    destination_fs, destination_path = destination.filesystem()
    if type(source_fs) is not type(destination_fs):
        return
    if isinstance(source_fs, LocalFileSystem):
        source_path, destination_path = os.path.realpath(source_path), os.path.realpath(destination_path)
    if source_path == destination_path:
        raise StorageError(f"the destination {destination.display} is the source itself: outputs would overwrite "
                           "the inputs; choose a destination outside the source")
    if source_path.startswith(destination_path.rstrip("/") + "/"):
        raise StorageError(f"the source {source.display} lies inside the destination {destination.display}: "
                           "outputs could overwrite inputs; choose a destination outside the source")


def list_shards(source: Location, shard_size: int, exclude: Location | None = None,
                limit: int | None = None) -> list[Shard]:
    """The source's shards (of its first ``limit`` files, where given); ``exclude`` (the destination) is checked
    against the source and left out."""
    exclude_path = None
    if exclude is not None:
        check_apart(source, exclude)
        source_fs, _ = source.filesystem()
        exclude_fs, exclude_path = exclude.filesystem()
        if type(source_fs) is not type(exclude_fs):
            exclude_path = None
    listed = list_files(source, IMAGE_EXTENSIONS, exclude=exclude_path)
    if limit is not None:  # the first ``limit`` image files, as training counts them (not folders named x.jpg)
        listed = [entry for entry in listed if entry.problem is None][:limit]
    return make_shards(listed, shard_size)


def safe_relative(key: str, tag: bool = False) -> str:
    """A relative key that cannot climb out of its destination and that every file system accepts: '.', '..'
    and empty segments are dropped and over-long names shortened. A key changed that way (or any key, with
    ``tag``) gets a hash of the original in its name, so two inputs never share an output (``a/../b.jpg`` and
    ``b.jpg``)."""
    parts = [part for part in key.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    if not parts:
        raise ValueError("the file name has no usable path segments")
    parts = [_shorten(part) for part in parts]
    relative = "/".join(parts)
    if relative != key or tag:
        stem, extension = posixpath.splitext(relative)
        relative = f"{stem}.{hashlib.sha256(_raw(key)).hexdigest()[:8]}{extension}"
    return relative


def _raw(text: str) -> bytes:
    """A key's bytes; a local file name that is not UTF-8 (held as lone surrogates) gives back its own bytes."""
    return text.encode("utf-8", "surrogateescape")


def _shorten(segment: str) -> str:
    if len(_raw(segment)) <= MAX_SEGMENT_BYTES:
        return segment
    stem, extension = posixpath.splitext(segment)
    extension = extension if len(_raw(extension)) <= 16 else ""
    return _raw(stem)[:MAX_SEGMENT_BYTES - 16].decode(errors="ignore") + "~" + extension


def output_key(key: str, model: str, several_models: bool, fmt: str, clashing: bool = False) -> str:
    """Where ``key``'s output goes under the destination: same relative path, the output format's extension;
    ``clashing`` when another input has the same name but for its extension."""
    stem, extension = posixpath.splitext(safe_relative(key, tag=clashing))
    relative = f"{stem}{output_extension(extension, fmt)}"
    # a model's name comes from its metadata, which whoever made the model wrote: it cannot climb out either
    return f"{safe_relative(model)}/{relative}" if several_models else relative


def output_extension(input_extension: str, fmt: str) -> str:
    if fmt == SAME_FORMAT:
        extension = input_extension.lower()
        return extension if extension in (".jpg", ".jpeg", ".png", ".webp") else ".png"
    return EXTENSIONS[output_format(fmt)]


def part_location(destination: Location, shard_id: str) -> Location:
    return destination.child(f"{PARTS_FOLDER}/{shard_id}.parquet")


def journal_location(destination: Location, shard_id: str) -> Location:
    return destination.child(f"{PARTS_FOLDER}/{shard_id}.journal")


@dataclass
class ShardOptions:
    output_format: str = "jpeg"  # jpeg, png, webp, or "same" (each input's own format)
    quality: int = 90
    batch_size: int = 0  # 0: automatic (64 on a GPU, 8 on a CPU)
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image, checked from the header before decoding
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # per input file, checked before and while reading
    max_batch_pixels: int = 0  # 0: automatic (from free GPU memory)
    gpu_codec: bool = True
    gpu_encode_share: float | None = None  # fixed share of JPEG outputs nvjpeg encodes (benchmarks); None: automatic
    gpu_decode: bool = True
    compile: bool = False
    io_threads: int = 16  # reads and writes each: 8 wrote 1,869 files/s on an H200 box, 16 wrote 2,886
    read_ahead_bytes: int = 256 * 2**20  # input bytes read but not yet decoded, at most (one file always fits)
    write_behind_bytes: int = 256 * 2**20  # output bytes encoded but not yet written, at most
    journal_seconds: float = 5.0  # how often finished rows are journaled: what a crash can cost at most
    skip_existing: bool = False  # treat an existing output as done even without a manifest row
    flow_run_id: str | None = None
    model_weights: dict[str, str] | None = None  # model name -> weights_fingerprint, set by stylize_shard
    # Processes running shards side by side on this machine (run_shards), each engine with its share of the cores
    # and of the memory budget; 0 = auto_workers().
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 0 or self.io_threads < 1:
            raise ValueError("workers must not be negative and io_threads must be at least 1")

    def engine_config(self) -> EngineConfig:
        fmt = "jpeg" if self.output_format == SAME_FORMAT else self.output_format
        return EngineConfig(batch_size=self.batch_size, max_batch_pixels=self.max_batch_pixels,
                            output_format=fmt, quality=self.quality, max_pixels=self.max_pixels,
                            gpu_codec=self.gpu_codec, gpu_encode_share=self.gpu_encode_share,
                            gpu_decode=self.gpu_decode, compile=self.compile,
                            cpu_threads=cores_per_worker(self.workers) if self.workers > 1 else 0,
                            memory_fraction=1 / max(self.workers, 1))


@dataclass
class ShardResult:
    shard_id: str
    counts: dict[str, int] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    part_uri: str = ""
    redone: int = 0  # rows made by this run (ok or error), as opposed to skipped as already done
    peak_read_ahead_bytes: int = 0
    peak_write_behind_bytes: int = 0


@dataclass(frozen=True)
class _Input:
    key: str
    models: tuple[str, ...]
    size: int = 0
    read_seconds: float = 0.0
    problem: str | None = None  # why it was not read, or could not be
    tag: str | None = None  # its version as listed


_engines: dict[tuple, StylizeEngine] = {}
_engines_lock = threading.Lock()


def cores_per_worker(workers: int) -> int:
    """A shard worker's share of this machine's cores: its codec threads and its torch threads."""
    return max(1, (os.cpu_count() or 1) // max(workers, 1))


def models_device(models: dict[str, UNet]) -> torch.device:
    return next(next(iter(models.values())).parameters()).device


def engine_for(models: dict[str, UNet], options: ShardOptions) -> StylizeEngine:
    """One engine per set of models and settings, kept for the process: it holds the compiled models and the
    measured batch budget, which later shards reuse."""
    device = models_device(models)
    key = (tuple((name, id(model)) for name, model in models.items()), str(device), options.engine_config())
    with _engines_lock:
        if key not in _engines:
            _engines[key] = StylizeEngine(models, device, options.engine_config())
        return _engines[key]


class _Journal:
    """Rows of finished outputs, flushed to the shard's journal folder every ``seconds`` (atomic small parts)."""

    def __init__(self, folder: Location, seconds: float):
        self.folder, self.seconds = folder, seconds
        self.unflushed: list[dict] = []
        self.flushed_at = time.monotonic()

    def add(self, row: dict) -> None:
        if row["status"] != "error":  # error rows are redone on a rerun anyway
            self.unflushed.append(row)
        if self.unflushed and time.monotonic() - self.flushed_at >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.unflushed:
            manifest.write_table(self.folder.child(f"{time.time_ns():020d}.parquet"), manifest.to_table(self.unflushed))
            self.unflushed = []
        self.flushed_at = time.monotonic()


class ShardStopped(KeyboardInterrupt):
    """The run was interrupted: raised in the shards running in its threads (a KeyboardInterrupt reaches the main
    thread only), so they stop at their next image, recording what they wrote, as a shard on the main thread does."""


_stopping = threading.Event()


def stop_running_shards() -> None:
    """On an interrupt: shards running in this process's threads stop at their next image, queued ones at their
    start."""
    _stopping.set()


def shards_may_run() -> None:
    """After an interrupted run's shards have stopped: shards of a later run in this process may run again."""
    _stopping.clear()


def _check_not_stopping() -> None:
    if _stopping.is_set():
        raise ShardStopped("stopping: the run was interrupted")


def stylize_shard(
    shard: Shard,
    source: Location,
    destination: Location,
    models: dict[str, UNet],
    options: ShardOptions,
    on_progress: Callable[[int], None] | None = None,
) -> ShardResult:
    """Stylise every image of ``shard`` with every model, write outputs and the shard's manifest part.
    ``on_progress(n)`` is called as inputs finish (n of them at a time)."""
    _check_not_stopping()
    started = time.perf_counter()
    several = len(models) > 1
    previous = _previous_rows(destination, shard.shard_id)
    previous_by_output = {row["output_uri"]: row for row in previous.values()}
    weights = {name: weights_fingerprint(model) for name, model in models.items()}
    options = replace(options, model_weights=weights)  # each row records the weights that made it
    rows: list[dict] = []
    journal = _Journal(journal_location(destination, shard.shard_id), options.journal_seconds)
    engine = engine_for(models, options)
    progress = on_progress or (lambda count: None)
    inside = InsideCheck(destination)

    def finished(row: dict) -> None:
        rows.append(row)
        journal.add(row)

    def output_location(key: str, model: str) -> Location:
        return destination.child(output_key(key, model, several, options.output_format, key in shard.clashing))

    def record_written(pending: tuple) -> None:
        finished(_finish(*pending, source, shard, options))

    window = max(engine.batch_size * 2, 16)  # images in flight on each side of the engine
    write_behind = _WriteBehind(options.write_behind_bytes, window)
    # On the way out of a failure or Ctrl-C, the writers shut down first, then every output written is recorded.
    with _recorded_on_failure(write_behind, record_written, journal), \
            ThreadPoolExecutor(options.io_threads) as readers, ThreadPoolExecutor(options.io_threads) as writers:
        def recorded(key: str, model: str) -> dict | None:
            """The earlier row of this input's output, if it was written where this run would write it (not
            before the destination moved, in another format, or under another name since a clash came or went),
            by these very weights (not by the model before it was retrained under the same name) and at this
            run's quality."""
            earlier = previous.get((source.child(key).display, model))
            if earlier is None or earlier["output_uri"] != output_location(key, model).display:
                return None
            return None if made_otherwise(earlier, key) else earlier

        def made_otherwise(earlier: dict, key: str) -> bool:
            """Whether a row says its output was made by other weights or at another quality (older rows say
            neither)."""
            return (earlier.get("model_weights") not in (None, weights[earlier["model"]])
                    or earlier.get("output_quality") not in (None, output_quality(key, options)))

        def recorded_as_made_otherwise(key: str, model: str) -> bool:
            """Whether an earlier row says this very output was made otherwise (by another model, other weights,
            at another quality): skip_existing, which counts outputs without a row as done, does not count those."""
            earlier = previous_by_output.get(output_location(key, model).display)
            return earlier is not None and (earlier["model"] != model or made_otherwise(earlier, key))

        def still_there(key: str, model: str) -> bool:
            """Whether the output is a file of the size its row recorded: one written over since (by a run from
            another source with a photo of the same name, say) is done again, as is an empty one (no image is)."""
            size = file_size(output_location(key, model))
            earlier = recorded(key, model)
            return bool(size) and (earlier is None or earlier.get("output_bytes") in (None, size))

        # What is already done (an earlier ok/skipped row and its output still there) is skipped.
        def done_models(index: int) -> tuple[list[str], str | None]:
            key = shard.keys[index]
            try:
                output_key(key, "", False, options.output_format)  # the key alone: can it have an output?
            except ValueError as error:
                return [], str(error)
            return [name for name in models
                    if (recorded(key, name) is not None
                        or options.skip_existing and not recorded_as_made_otherwise(key, name))
                    and still_there(key, name)], shard.problem(index)

        todo: list[_Input] = []
        # Only an earlier run's rows (or skip_existing) send the check to storage; otherwise a thread per image
        # would just be hand-offs.
        checking = readers.map if previous or options.skip_existing else map
        for index, (done, problem) in enumerate(checking(done_models, range(len(shard)))):
            key = shard.keys[index]
            for name in done:
                earlier = recorded(key, name)
                if earlier is not None and options.flow_run_id and earlier["flow_run_id"] == options.flow_run_id:
                    rows.append({**earlier, "shard_id": shard.shard_id})  # an earlier attempt of this run made it
                    continue
                # Counted done by skip_existing, or by a row from before weights or quality were recorded: from now
                # on, done by these weights at this quality (a retrained model, another quality, redoes it).
                earlier = earlier or {"input_uri": source.child(key).display,
                                      "output_uri": output_location(key, name).display, "model": name,
                                      "input_version": shard.tag(index)}
                rows.append({**earlier, "status": "skipped", "error": None, "shard_id": shard.shard_id,
                             "duration_ms": 0.0, "flow_run_id": options.flow_run_id, "finished_at": manifest.now(),
                             "model_weights": weights[name], "output_quality": output_quality(key, options)})
            remaining = tuple(name for name in models if name not in done)
            if remaining:
                todo.append(_Input(key, remaining, shard.sizes[index], problem=problem, tag=shard.tag(index)))
        progress(len(shard) - len(todo))

        def read(item: _Input) -> Job:
            began = time.perf_counter()
            problem, data = item.problem, b""
            if problem is None and item.size > options.max_image_bytes:
                problem = f"file is {item.size:,} bytes, over the limit of {options.max_image_bytes:,}"
            if problem is None:
                try:
                    data = read_input(source.child(item.key), options.max_image_bytes)
                except InputError as error:
                    problem = str(error)
            # a storage error propagates: the shard fails and is retried
            checked = _Input(item.key, item.models, len(data) or item.size, time.perf_counter() - began, problem,
                             item.tag)
            fmt = output_extension(posixpath.splitext(item.key)[1], SAME_FORMAT) \
                if options.output_format == SAME_FORMAT else None
            return Job(checked, data, item.models if problem is None else (), output_format=fmt)

        read_ahead = BoundedMap(readers, read, todo, ahead=window,
                                cost=lambda item: min(item.size, options.max_image_bytes),
                                budget=options.read_ahead_bytes)
        for outcome in engine.run(read_ahead):
            _check_not_stopping()
            item: _Input = outcome.tag
            error = item.problem or outcome.error
            if error is not None:
                for name in item.models:
                    finished(_row(source, item, outcome, name, shard, options, "error", error=error))
                progress(1)
                continue
            for name, data in outcome.outputs.items():
                target = output_location(item.key, name)
                write_behind.add(writers.submit(_write, inside, target, data), len(data),
                                 (item, outcome, name, target))
            for pending in write_behind.over_budget():
                record_written(pending)
            progress(1)
        for pending in write_behind.drain():
            record_written(pending)

    journal.flush()
    table = manifest.to_table(rows)
    part = part_location(destination, shard.shard_id)
    manifest.write_table(part, table)
    remove(journal_location(destination, shard.shard_id))  # the part supersedes it
    return ShardResult(
        shard_id=shard.shard_id,
        counts=manifest.counts(table),
        images=len(shard),
        seconds=time.perf_counter() - started,
        part_uri=part.display,
        redone=sum(row["status"] != "skipped" for row in rows),
        peak_read_ahead_bytes=read_ahead.peak_cost,
        peak_write_behind_bytes=write_behind.peak_bytes,
    )


@contextlib.contextmanager
def _recorded_on_failure(write_behind: "_WriteBehind", record: Callable[[tuple], None], journal: _Journal):
    """If the block fails or is interrupted, record every write it finished and journal the rows, then re-raise:
    a rerun or retry redoes none of those outputs. Failures while recording do not hide the original one."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            for pending in write_behind.drain():
                record(pending)
        with contextlib.suppress(Exception):
            journal.flush()
        raise


class _WriteBehind:
    """Writes in flight, oldest first, bounded by count and by bytes (the newest is always let in)."""

    def __init__(self, budget_bytes: int, count: int):
        self.budget_bytes, self.count = budget_bytes, count
        self.pending: deque[tuple[Future, int, tuple]] = deque()
        self.bytes = self.peak_bytes = 0

    def add(self, future: Future, size: int, context: tuple) -> None:
        self.pending.append((future, size, context))
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def over_budget(self) -> Iterator[tuple]:
        while self.pending and (len(self.pending) > self.count or
                                (self.bytes > self.budget_bytes and len(self.pending) > 1)):
            yield self._pop()

    def drain(self) -> Iterator[tuple]:
        while self.pending:
            yield self._pop()

    def _pop(self) -> tuple:
        future, size, context = self.pending.popleft()
        future.result()  # a storage error propagates to the shard
        self.bytes -= size
        return (future, *context)


def _write(inside: InsideCheck, target: Location, data: bytes) -> float | str:
    """Seconds the write took, or why it was refused. In a writer thread: resolving the links of every path
    took the shard's main thread 0.85 ms an image (16 lstat calls), a third of its time at 256 px."""
    began = time.perf_counter()
    if not inside.allows(target):
        return "the output path would lead outside the destination (a symbolic link)"
    try:
        write_bytes(target, data)  # a storage error propagates to the shard
    except IsADirectoryError:  # something left in the destination, in this output's way only
        return "a folder of that name is in the output's way in the destination"
    except NotADirectoryError:
        return "a file is in the way of the output's folder in the destination"
    return time.perf_counter() - began


def _finish(future: Future, item: _Input, outcome: Outcome, name: str, target: Location, source: Location,
            shard: Shard, options: ShardOptions) -> dict:
    seconds = future.result()
    if isinstance(seconds, str):
        return _row(source, item, outcome, name, shard, options, "error", error=seconds)
    return _row(source, item, outcome, name, shard, options, "ok", output_uri=target.display,
                output_bytes=len(outcome.outputs[name]), extra_seconds=seconds)


def _row(source: Location, item: _Input, outcome: Outcome, model: str, shard: Shard, options: ShardOptions,
         status: str, error: str | None = None, output_uri: str | None = None, output_bytes: int | None = None,
         extra_seconds: float = 0.0) -> dict:
    return {
        "input_uri": source.child(item.key).display,
        "output_uri": output_uri,
        "model": model,
        "status": status,
        "error": error,
        "width": outcome.width,
        "height": outcome.height,
        "input_bytes": item.size,
        "input_version": item.tag,
        "output_bytes": output_bytes,
        "shard_id": shard.shard_id,
        "duration_ms": round((item.read_seconds + outcome.seconds + extra_seconds) * 1000, 3),
        "flow_run_id": options.flow_run_id,
        "finished_at": manifest.now(),
        "model_weights": options.model_weights.get(model) if options.model_weights else None,
        "output_quality": output_quality(item.key, options) if output_uri else None,
    }


def output_quality(key: str, options: ShardOptions) -> int | None:
    """The quality the output of input ``key`` is encoded at: ``options.quality`` for JPEG and WebP, None for PNG
    (from the output's format, not from its URL, which may be masked where it looks like a credential)."""
    extension = output_extension(posixpath.splitext(key)[1], options.output_format)
    return options.quality if extension in (".jpg", ".jpeg", ".webp") else None


_fingerprints: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights (8 MB of them for the default UNet: milliseconds, once per model object)."""
    model = getattr(model, "_orig_mod", model)  # a compiled model's own
    if model not in _fingerprints:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        _fingerprints[model] = digest.hexdigest()[:16]
    return _fingerprints[model]


def carry_over_rows(source: Location, destination: Location, shards: list[Shard]) -> int:
    """Give shards that have no record of their own the rows their inputs got in earlier runs. A shard's id hashes
    its inputs, so an input added or removed early in the listing gives every later shard a new id; without this,
    each would stylise all its images again. The earlier rows come from the destination's last manifest and from
    the records of shards that are no longer in the listing (an interrupted run's, which never reached a
    manifest). A row is carried over where the input is unchanged (same version as listed now) and was done
    (``ok`` or ``skipped``); it goes into the shard's journal, which the shard reads as after a crash: outputs
    still there are ``skipped``, the rest is done. Returns how many rows were carried over."""
    recorded = _recorded_shard_ids(destination)
    if recorded is None:
        return 0  # a destination never written to
    current = {shard.shard_id for shard in shards}
    lacking = [shard for shard in shards if shard.shard_id not in recorded]
    if not lacking:
        return 0
    tables = [table for table in [manifest.read_table(destination.child(MANIFEST_NAME))] if table is not None]
    for shard_id in sorted(recorded - current):
        tables.extend(_shard_record(destination, shard_id))
    table = manifest.combine(tables)
    if table.num_rows == 0:
        return 0
    uris, versions = table.column("input_uri").to_pylist(), table.column("input_version").to_pylist()
    statuses, models = table.column("status").to_pylist(), table.column("model").to_pylist()
    rows_of: dict[tuple[str, str], dict[str, int]] = {}  # (input, version) -> model -> row; one row each
    for index, (uri, version, status, model) in enumerate(zip(uris, versions, statuses, models)):
        if version and status in ("ok", "skipped"):  # an input of unknown version ("") cannot be known unchanged
            rows_of.setdefault((uri, version), {})[model] = index
    carried = 0
    for shard in lacking:
        picked = [index for position, key in enumerate(shard.keys)
                  for index in rows_of.get((source.child(key).display, shard.tag(position)), {}).values()]
        if picked:
            # named to sort before the journal's own entries (named by the time), which are newer
            manifest.write_table(journal_location(destination, shard.shard_id).child("0-carried-over.parquet"),
                                 table.take(picked))
            carried += len(picked)
    return carried


_SHARD_ID = re.compile(r"^[0-9a-f]{16}$")


def _recorded_shard_ids(destination: Location) -> set[str] | None:
    """Ids of the shards with a part or a journal in the destination; None when it has no parts folder."""
    fs, parts = destination.child(PARTS_FOLDER).filesystem()
    try:
        names = [posixpath.basename(name.rstrip("/")).rsplit(".", 1)[0] for name in fs.ls(parts, detail=False)]
    except FileNotFoundError:
        return None
    return {name for name in names if _SHARD_ID.match(name)}


def _shard_record(destination: Location, shard_id: str) -> list:
    """The tables a shard recorded, oldest first: its part, then its journal (a crash or an interruption). A
    journal beside a part is newer than it (a rerun of a finished shard, stopped before its new part), so where
    both have a row for an output, the journal's says what is in the file now."""
    table = manifest.read_table(part_location(destination, shard_id))
    return ([table] if table is not None else []) + manifest.read_folder(journal_location(destination, shard_id))


def _prune_records(source: Location, destination: Location, shard_ids: set[str]) -> int:
    """Remove the records of this source's shards that are no longer in its listing, once every current shard has
    its part: the rows of their unchanged inputs were carried into the current shards, so keeping them would only
    make every later carry-over read more. Records of another source's runs into the same destination stay.
    Returns how many shards' records were removed."""
    prefix = source.display.rstrip("/") + "/"
    removed = 0
    for shard_id in sorted((_recorded_shard_ids(destination) or set()) - shard_ids):
        tables = _shard_record(destination, shard_id)
        if any(uri.startswith(prefix) for table in tables for uri in table.column("input_uri").to_pylist()[:1]) \
                or not any(table.num_rows for table in tables):
            remove(part_location(destination, shard_id))
            remove(journal_location(destination, shard_id))
            removed += 1
    return removed


def _previous_rows(destination: Location, shard_id: str) -> dict[tuple[str, str], dict]:
    """Rows of outputs earlier runs finished: from the shard's part and its journal (a crash), the newest row of
    each output."""
    return {(row["input_uri"], row["model"]): row for table in _shard_record(destination, shard_id)
            for row in table.to_pylist() if row["status"] in ("ok", "skipped")}


class BoundedMap:
    """``pool.map`` that keeps at most ``ahead`` calls, and about ``budget`` of their ``cost``, in flight, so
    memory grows neither with the number of items nor with their size. An item is in flight from its
    submission until the consumer takes its result; one item is always let in, however costly."""

    def __init__(self, pool: ThreadPoolExecutor, function: Callable, items: list, ahead: int,
                 cost: Callable = lambda item: 0, budget: float = float("inf")):
        self.pool, self.function, self.items = pool, function, items
        self.ahead, self.cost, self.budget = ahead, cost, budget
        self.in_flight = self.peak_cost = 0

    def __iter__(self) -> Iterator:
        iterator = iter(self.items)
        futures: deque[tuple[Future, int]] = deque()
        waiting = next(iterator, _END)
        while True:
            while waiting is not _END and len(futures) < self.ahead and (
                    not futures or self.in_flight + self.cost(waiting) <= self.budget):
                cost = self.cost(waiting)
                futures.append((self.pool.submit(self.function, waiting), cost))
                self.in_flight += cost
                self.peak_cost = max(self.peak_cost, self.in_flight)
                waiting = next(iterator, _END)
            if not futures:
                return
            future, cost = futures.popleft()
            result = future.result()
            self.in_flight -= cost
            yield result


_END = object()


def run_shards(
    source: Location,
    destination: Location,
    models: dict[str, UNet],
    options: ShardOptions,
    shard_size: int = 256,
    on_progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
    limit: int | None = None,
) -> dict:
    """Every shard of ``source`` (of its first ``limit`` images, where given; no Prefect), then the manifest: one after the other in this process, or in
    ``options.workers`` processes side by side (spawned: a calling script needs ``if __name__ == "__main__":``).
    The models run on ``device`` (default: where they are); worker processes get their own copies there, so
    models given on the CPU keep this process off the GPU."""
    shards = list_shards(source, shard_size, exclude=destination, limit=limit)  # refuses a destination in the source
    with DestinationLease(destination):  # one run at a time: another's start would clear this one's temporaries
        remove_partial_files(destination)
        carry_over_rows(source, destination, shards)
        images = sum(len(shard) for shard in shards)
        if on_total is not None:
            on_total(images)
        options = replace(options, workers=workers_for(options.workers, shards))
        if options.workers > 1:
            from .workers import stylize_in_processes  # it imports this module

            results = stylize_in_processes(shards, source, destination, models, options, on_progress,
                                           None if device is None else str(device))
        else:
            if device is not None:
                models = {name: model.to(device) for name, model in models.items()}
            results = [stylize_shard(shard, source, destination, models, options, on_progress) for shard in shards]
        summary = combine_parts(destination, [shard.shard_id for shard in shards], source)
    summary.update({"images": images, "shards": len(shards), "workers": options.workers,
                    "redone": sum(result.redone for result in results)})
    return summary


AUTO_WORKERS_MIN_IMAGES = 2000  # a worker takes seconds to start (imports, CUDA, compile): not worth it for fewer


def workers_for(requested: int, shards: list[Shard]) -> int:
    """Shard worker processes for a run: ``requested``, or ``auto_workers`` when 0; never more than there are
    shards (no idle workers), at least one."""
    if requested < 0:
        raise ValueError(f"workers must not be negative, not {requested}")
    return max(1, min(requested or auto_workers(sum(len(shard) for shard in shards)), len(shards)))


def auto_workers(images: int) -> int:
    """Shard worker processes for a run of ``images``: one per four cores, at least two, for large runs. On 2 CPU
    cores at 64 px (bench/engine_throughput.py) two workers ran 0.81x the model's rate once started, one 0.52x."""
    if images < AUTO_WORKERS_MIN_IMAGES:
        return 1
    return max(2, (os.cpu_count() or 1) // 4)


def combine_parts(destination: Location, shard_ids: list[str], source: Location | None = None) -> dict:
    """Combine the shard parts that exist into ``<destination>/manifest.parquet`` (written atomically); when every
    shard has its part, the records of ``source``'s shards no longer in the listing are removed (see
    ``_prune_records``)."""
    tables = [t for t in (manifest.read_table(part_location(destination, sid)) for sid in shard_ids) if t is not None]
    table = manifest.combine(tables)
    target = destination.child(MANIFEST_NAME)
    manifest.write_table(target, table)
    complete = source is not None and len(tables) == len(shard_ids)
    pruned = _prune_records(source, destination, set(shard_ids)) if complete else 0
    return {"manifest_uri": target.display, "rows": table.num_rows, "shards_with_parts": len(tables),
            "counts": manifest.counts(table), "pruned_shard_records": pruned}


