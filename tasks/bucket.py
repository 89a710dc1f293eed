"""Stylising a bucket: listing it into stable shards, and streaming one shard through the models.

Inside a shard, reading and decoding run ahead in background threads, the models run in mini-batches,
and encoding and writing run behind in background threads, with bounded queues so memory does not grow
with the shard. A bad image becomes an ``error`` row; a storage failure raises, failing the shard (its
task is retried by Prefect). Each shard's manifest part is written last, so a part means "shard done".
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from stylecore.images import (
    DEFAULT_MAX_PIXELS,
    EXTENSIONS,
    ImageDecodeError,
    decode_image,
    encode_image,
    image_to_tensor,
    output_format,
    tensor_to_image,
)
from stylecore.model import UNet
from stylecore.stylize import stylize_images

from . import manifest
from .storage import IMAGE_EXTENSIONS, Location, exists, list_files, read_bytes, write_bytes

PARTS_FOLDER = "_manifest_parts"
MANIFEST_NAME = "manifest.parquet"


@dataclass(frozen=True)
class Shard:
    shard_id: str
    keys: tuple[str, ...]
    sizes: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.keys)


def make_shards(files: list[tuple[str, int, str]], shard_size: int) -> list[Shard]:
    """Split a sorted listing into shards; a shard's id hashes its keys, sizes and version tags."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    shards = []
    for start in range(0, len(files), shard_size):
        chunk = files[start : start + shard_size]
        digest = hashlib.sha256(json.dumps(chunk, separators=(",", ":")).encode()).hexdigest()[:16]
        shards.append(Shard(digest, tuple(k for k, _, _ in chunk), tuple(s for _, s, _ in chunk)))
    return shards


def list_shards(source: Location, shard_size: int, exclude: Location | None = None) -> list[Shard]:
    exclude_path = None
    if exclude is not None:
        source_fs, _ = source.filesystem()
        exclude_fs, exclude_path = exclude.filesystem()
        if type(source_fs) is not type(exclude_fs):
            exclude_path = None
    return make_shards(list_files(source, IMAGE_EXTENSIONS, exclude=exclude_path), shard_size)


def safe_relative(key: str) -> str:
    """A relative key that cannot climb out of its destination: '.', '..' and empty segments are dropped."""
    parts = [part for part in key.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"key {key!r} has no usable path segments")
    return "/".join(parts)


def output_key(key: str, model: str, several_models: bool, fmt: str) -> str:
    stem, _ = posixpath.splitext(safe_relative(key))
    relative = f"{stem}{EXTENSIONS[output_format(fmt)]}"
    return f"{model}/{relative}" if several_models else relative


def part_location(destination: Location, shard_id: str) -> Location:
    return destination.child(f"{PARTS_FOLDER}/{shard_id}.parquet")


@dataclass
class ShardOptions:
    output_format: str = "jpeg"
    quality: int = 90
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    io_threads: int = 8
    flow_run_id: str | None = None


@dataclass
class ShardResult:
    shard_id: str
    counts: dict[str, int] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    part_uri: str = ""


@dataclass
class _Decoded:
    key: str
    data_size: int = 0
    tensor: torch.Tensor | None = None
    error: str | None = None
    seconds: float = 0.0


def stylize_shard(
    shard: Shard,
    source: Location,
    destination: Location,
    models: dict[str, UNet],
    options: ShardOptions,
) -> ShardResult:
    """Stylise every image of ``shard`` with every model, write outputs and the shard's manifest part."""
    started = time.perf_counter()
    several = len(models) > 1
    previous = _previous_rows(destination, shard.shard_id)
    rows: list[dict] = []

    def output_location(key: str, model: str) -> Location:
        return destination.child(output_key(key, model, several, options.output_format))

    with ThreadPoolExecutor(options.io_threads) as readers, ThreadPoolExecutor(options.io_threads) as writers:
        # What is already done (previous ok/skipped row and its output still there) is skipped.
        def done_models(key: str) -> list[str]:
            input_uri = source.child(key).url
            return [
                name for name in models
                if (input_uri, name) in previous and exists(output_location(key, name))
            ]

        todo: list[tuple[str, list[str]]] = []
        for key, done in zip(shard.keys, readers.map(done_models, shard.keys)):
            for name in done:
                rows.append({**previous[(source.child(key).url, name)], "status": "skipped", "error": None,
                             "shard_id": shard.shard_id, "duration_ms": 0.0, "flow_run_id": options.flow_run_id,
                             "finished_at": manifest.now()})
            remaining = [name for name in models if name not in done]
            if remaining:
                todo.append((key, remaining))

        def read_and_decode(item: tuple[str, list[str]]) -> tuple[_Decoded, list[str]]:
            key, names = item
            began = time.perf_counter()
            data = read_bytes(source.child(key))  # a storage error propagates: the shard fails and is retried
            decoded = _Decoded(key, len(data))
            try:
                decoded.tensor = image_to_tensor(decode_image(data, options.max_pixels))
            except ImageDecodeError as error:
                decoded.error = str(error)
            decoded.seconds = time.perf_counter() - began
            return decoded, names

        pending: deque[tuple[Future, str]] = deque()
        window = max(options.batch_size * 4, 8)
        for group in _windows(bounded_map(readers, read_and_decode, todo, ahead=window), window):
            for model_name, model in models.items():
                wanted = [decoded for decoded, names in group if model_name in names]
                for decoded in wanted:
                    if decoded.error is not None:
                        rows.append(_row(source, decoded, model_name, shard, options, "error", error=decoded.error))
                good = [decoded for decoded in wanted if decoded.tensor is not None]
                outputs = stylize_images(model, (decoded.tensor for decoded in good), batch_size=options.batch_size)
                for decoded, output in zip(good, outputs):
                    target = output_location(decoded.key, model_name)
                    pending.append((writers.submit(_encode_and_write, target, output, options, decoded), model_name))
                    while len(pending) > window:
                        rows.append(_finish(*pending.popleft(), source, shard, options))
        while pending:
            rows.append(_finish(*pending.popleft(), source, shard, options))

    table = manifest.to_table(rows)
    part = part_location(destination, shard.shard_id)
    manifest.write_table(part, table)
    return ShardResult(
        shard_id=shard.shard_id,
        counts=manifest.counts(table),
        images=len(shard),
        seconds=time.perf_counter() - started,
        part_uri=part.url,
    )


def _encode_and_write(target: Location, output: torch.Tensor, options: ShardOptions,
                      decoded: _Decoded) -> tuple[_Decoded, Location, int, float]:
    began = time.perf_counter()
    data = encode_image(tensor_to_image(output), options.output_format, options.quality)
    write_bytes(target, data)  # a storage error propagates to the shard
    return decoded, target, len(data), time.perf_counter() - began


def _finish(future: Future, model_name: str, source: Location, shard: Shard, options: ShardOptions) -> dict:
    decoded, target, size, seconds = future.result()
    return _row(source, decoded, model_name, shard, options, "ok", output_uri=target.url, output_bytes=size,
                extra_seconds=seconds)


def _row(source: Location, decoded: _Decoded, model: str, shard: Shard, options: ShardOptions, status: str,
         error: str | None = None, output_uri: str | None = None, output_bytes: int | None = None,
         extra_seconds: float = 0.0) -> dict:
    width = height = None
    if decoded.tensor is not None:
        height, width = (int(side) for side in decoded.tensor.shape[-2:])
    return {
        "input_uri": source.child(decoded.key).url,
        "output_uri": output_uri,
        "model": model,
        "status": status,
        "error": error,
        "width": width,
        "height": height,
        "input_bytes": decoded.data_size,
        "output_bytes": output_bytes,
        "shard_id": shard.shard_id,
        "duration_ms": round((decoded.seconds + extra_seconds) * 1000, 3),
        "flow_run_id": options.flow_run_id,
        "finished_at": manifest.now(),
    }


def _previous_rows(destination: Location, shard_id: str) -> dict[tuple[str, str], dict]:
    table = manifest.read_table(part_location(destination, shard_id))
    if table is None:
        return {}
    return {(row["input_uri"], row["model"]): row for row in table.to_pylist() if row["status"] in ("ok", "skipped")}


def _windows(items: Iterable, size: int) -> Iterator[list]:
    window = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def bounded_map(pool: ThreadPoolExecutor, function, items: list, ahead: int) -> Iterator:
    """``pool.map`` that keeps at most ``ahead`` calls in flight, so memory does not grow with the input."""
    iterator = iter(items)
    # range first: zip must not pull an item from the iterator that it then drops
    futures: deque[Future] = deque(pool.submit(function, item) for _, item in zip(range(ahead), iterator))
    while futures:
        result = futures.popleft().result()
        for item in iterator:
            futures.append(pool.submit(function, item))
            break
        yield result
