"""Stylising a bucket: listing it into stable shards, and streaming one shard through the models.

Inside a shard, reading runs ahead in background threads, the stylisation engine (stylecore.engine) decodes,
stylises and encodes in overlapped batches, and writing runs behind in background threads, every queue
bounded so memory does not grow with the shard. A bad image becomes an ``error`` row; a storage failure raises, failing the shard (its
task is retried by Prefect). Each shard's manifest part is written last, so a part means "shard done".
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from stylecore.engine import EngineConfig, Job, Outcome, StylizeEngine
from stylecore.images import DEFAULT_MAX_PIXELS, EXTENSIONS, output_format
from stylecore.model import UNet

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
    batch_size: int = 0  # 0: automatic (64 on a GPU, 8 on a CPU)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_pixels: int = 0  # 0: automatic (from free GPU memory)
    gpu_codec: bool = True
    compile: bool = False
    io_threads: int = 8
    flow_run_id: str | None = None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(batch_size=self.batch_size, max_batch_pixels=self.max_batch_pixels,
                            output_format=self.output_format, quality=self.quality, max_pixels=self.max_pixels,
                            gpu_codec=self.gpu_codec, compile=self.compile)


@dataclass
class ShardResult:
    shard_id: str
    counts: dict[str, int] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    part_uri: str = ""


@dataclass(frozen=True)
class _Input:
    key: str
    models: tuple[str, ...]
    size: int = 0
    read_seconds: float = 0.0


_engines: dict[tuple, StylizeEngine] = {}
_engines_lock = threading.Lock()


def engine_for(models: dict[str, UNet], options: ShardOptions) -> StylizeEngine:
    """One engine per set of models and settings, kept for the process: it holds the compiled models and the
    measured batch budget, which later shards reuse."""
    device = next(next(iter(models.values())).parameters()).device
    key = (tuple((name, id(model)) for name, model in models.items()), str(device), options.engine_config())
    with _engines_lock:
        if key not in _engines:
            _engines[key] = StylizeEngine(models, device, options.engine_config())
        return _engines[key]


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
    engine = engine_for(models, options)

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

        todo: list[_Input] = []
        for key, done in zip(shard.keys, readers.map(done_models, shard.keys)):
            for name in done:
                rows.append({**previous[(source.child(key).url, name)], "status": "skipped", "error": None,
                             "shard_id": shard.shard_id, "duration_ms": 0.0, "flow_run_id": options.flow_run_id,
                             "finished_at": manifest.now()})
            remaining = tuple(name for name in models if name not in done)
            if remaining:
                todo.append(_Input(key, remaining))

        def read(item: _Input) -> Job:
            began = time.perf_counter()
            data = read_bytes(source.child(item.key))  # a storage error propagates: the shard fails and is retried
            return Job(_Input(item.key, item.models, len(data), time.perf_counter() - began), data, item.models)

        pending: deque[tuple[Future, _Input, Outcome, str, Location]] = deque()
        window = max(engine.batch_size * 2, 16)
        for outcome in engine.run(bounded_map(readers, read, todo, ahead=window)):
            item: _Input = outcome.tag
            if outcome.error is not None:
                rows.extend(_row(source, item, outcome, name, shard, options, "error", error=outcome.error)
                            for name in item.models)
                continue
            for name, data in outcome.outputs.items():
                target = output_location(item.key, name)
                pending.append((writers.submit(_write, target, data), item, outcome, name, target))
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


def _write(target: Location, data: bytes) -> float:
    began = time.perf_counter()
    write_bytes(target, data)  # a storage error propagates to the shard
    return time.perf_counter() - began


def _finish(future: Future, item: _Input, outcome: Outcome, name: str, target: Location, source: Location,
            shard: Shard, options: ShardOptions) -> dict:
    seconds = future.result()
    return _row(source, item, outcome, name, shard, options, "ok", output_uri=target.url,
                output_bytes=len(outcome.outputs[name]), extra_seconds=seconds)


def _row(source: Location, item: _Input, outcome: Outcome, model: str, shard: Shard, options: ShardOptions,
         status: str, error: str | None = None, output_uri: str | None = None, output_bytes: int | None = None,
         extra_seconds: float = 0.0) -> dict:
    return {
        "input_uri": source.child(item.key).url,
        "output_uri": output_uri,
        "model": model,
        "status": status,
        "error": error,
        "width": outcome.width,
        "height": outcome.height,
        "input_bytes": item.size,
        "output_bytes": output_bytes,
        "shard_id": shard.shard_id,
        "duration_ms": round((item.read_seconds + outcome.seconds + extra_seconds) * 1000, 3),
        "flow_run_id": options.flow_run_id,
        "finished_at": manifest.now(),
    }


def _previous_rows(destination: Location, shard_id: str) -> dict[tuple[str, str], dict]:
    table = manifest.read_table(part_location(destination, shard_id))
    if table is None:
        return {}
    return {(row["input_uri"], row["model"]): row for row in table.to_pylist() if row["status"] in ("ok", "skipped")}


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
