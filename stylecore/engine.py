"""The stylisation engine: encoded image bytes in, encoded stylised bytes out, in batches, stages overlapped.

Three stages joined by bounded queues, each in its own thread, so the next batch decodes and the last one
encodes while the models run on this one:

    decode  ->  stylise (every model)  ->  encode

On CUDA each stage has its own stream. Decoding and encoding run in a thread pool on the CPU: plain RGB JPEGs
through libjpeg-turbo without the GIL (torchvision), everything else (PNG, WebP, CMYK or EXIF-rotated JPEGs, ...)
and every error through PIL, which gives the same pictures and the same error messages. On CUDA, unless
``gpu_decode`` is off, plain JPEG inputs are decoded on the GPU (nvjpeg); unless ``gpu_codec`` is off, nvjpeg
encodes a share of each batch's JPEG outputs while the CPU threads encode the rest (``EncodeSplit`` picks the
share). A batch is cut by a pixel budget as well as by a count, so memory stays bounded whatever the image sizes:
at most ``queue_batches`` batches wait between two stages.

Knows nothing of storage: callers pass (tag, bytes, model names) and get an ``Outcome`` per input, in order.
"""

from __future__ import annotations

import io
import os
import queue
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image

from .images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    check_pixel_count,
    decode_image,
    decode_plain_jpeg,
    encode_image,
    encode_jpeg_tensor,
    image_to_tensor,
    jpeg_ends_complete,
    output_format,
    srgb_transform,
    tensor_to_image,
)
from .model import UNet
from .stylize import autocast_for, stylize_batch
from .tiling import stylize_tiled

_EXIF_ORIENTATION = 0x0112
_DONE = object()


@dataclass(frozen=True)
class EngineConfig:
    batch_size: int = 0  # images per batch; 0 = 64 on CUDA, 8 on CPU
    max_batch_pixels: int = 0  # pixels per forward pass; 0 = from free GPU memory on CUDA, free memory on CPU
    output_format: str = "jpeg"
    quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image; larger ones become errors before they are decoded
    gpu_codec: bool = True  # JPEG outputs encoded by nvjpeg on CUDA, a share of each batch (EncodeSplit)
    gpu_encode_share: float | None = None  # that share fixed (0 to 1; for benchmarks); None: as EncodeSplit finds
    # Plain RGB JPEG inputs decoded by nvjpeg on CUDA, a batch at a time, instead of in the CPU threads: on an H100
    # (512 px, 16 cores) 15,190 img/s warmed up against 7,700 in CPU threads, and end to end (10,000 images, four
    # workers) 845 img/s once started against 651, with the CPU's cores left to the rest of the pipeline.
    gpu_decode: bool = True
    compile: bool = False  # torch.compile the models (pays off for long runs of few distinct sizes)
    channels_last: bool = True  # on CUDA
    cpu_threads: int = 0  # decode/encode threads; 0 = the number of cores
    queue_batches: int = 2
    # This engine's share of the machine when several processes share it (shard workers): scales the default
    # pixel budget, which is otherwise taken from all the free memory.
    memory_fraction: float = 1.0

    def __post_init__(self) -> None:
        output_format(self.output_format)  # raises ValueError for an unknown format
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be between 1 and 100")
        if self.batch_size < 0 or self.max_batch_pixels < 0 or self.cpu_threads < 0:
            raise ValueError("batch_size, max_batch_pixels and cpu_threads must not be negative")
        if self.max_pixels < 1 or self.queue_batches < 1:
            raise ValueError("max_pixels and queue_batches must be at least 1")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError("memory_fraction must be above 0 and at most 1")
        if self.gpu_encode_share is not None and not 0 <= self.gpu_encode_share <= 1:
            raise ValueError("gpu_encode_share must be between 0 and 1")


class EncodeSplit:
    """The share of a batch's JPEG outputs that nvjpeg encodes while the CPU threads encode the rest.

    Either side costs the run something: nvjpeg takes GPU time from the models (on an H100 at 512 px, 0.16 ms an
    image against the compiled UNet's 0.38), the threads take the host's cores. So after each batch the share
    moves a step by what held the encoding up (``StylizeEngine._held_up_by``): the models (the GPU is the
    slower: the share moves to the CPU, handing GPU time back to the models), the input (reading or decoding is
    the slower: to the GPU, freeing the cores), or nothing (the encoding itself, or the caller after it, is the
    slower: towards the split at which both sides finish together, the fastest a batch can be encoded, from the
    rates each side reached on the batches before). Each side keeps at least a twentieth of a batch (an image a
    batch from twenty images on), so its rate stays known. ``fixed``: always that share.
    """

    STEP = 0.05
    MIN_SHARE = 0.05
    SMOOTHING = 0.3  # the newest batch's weight in each side's rate

    def __init__(self, fixed: float | None = None):
        self.fixed = fixed
        self.share = 0.5 if fixed is None else fixed
        self.gpu_rate: float | None = None  # images a second, each side, while the other side ran too
        self.cpu_rate: float | None = None
        self._batches = 0

    def on_gpu(self, count: int) -> int:
        """How many of ``count`` JPEG outputs nvjpeg encodes (a half rounded up: a lone image at 0.5 goes to it)."""
        return min(count, int(count * self.share + 0.5))

    def update(self, gpu: tuple[int, float], cpu: tuple[int, float], waited_for: str) -> None:
        """After a batch: (images, seconds) each side took from the batch's start, and what the encoding waited for
        before it: "models", "input" or "nothing"."""
        self._batches += 1
        if self._batches > 1:  # the first batch's times are mostly nvjpeg's and the pool's start
            self.gpu_rate = _moving_rate(self.gpu_rate, *gpu, self.SMOOTHING)
            self.cpu_rate = _moving_rate(self.cpu_rate, *cpu, self.SMOOTHING)
        if self.fixed is not None:
            return
        if waited_for == "models":
            target = 0.0
        elif waited_for == "input":
            target = 1.0
        elif self.gpu_rate and self.cpu_rate:
            target = self.gpu_rate / (self.gpu_rate + self.cpu_rate)
        else:
            target = self.share
        self.share += max(-self.STEP, min(self.STEP, target - self.share))
        self.share = min(max(self.share, self.MIN_SHARE), 1 - self.MIN_SHARE)


def _moving_rate(rate: float | None, images: int, seconds: float, smoothing: float) -> float | None:
    if images == 0 or seconds <= 0:
        return rate  # this side had nothing to do: what it did before still says how fast it is
    latest = images / seconds
    return latest if rate is None else (1 - smoothing) * rate + smoothing * latest


@dataclass
class Job:
    tag: object
    data: bytes
    models: tuple[str, ...]
    output_format: str | None = None  # this job's outputs' format; the engine's when None


@dataclass
class Outcome:
    tag: object
    width: int | None = None
    height: int | None = None
    outputs: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0  # this image's share of its batch's decode, stylise and encode time


@dataclass
class _Batch:
    jobs: list[Job]
    outcomes: list[Outcome]
    images: list[torch.Tensor | None]  # decoded (3, H, W) uint8 on the device, None for errors
    results: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    ready: object = None  # CUDA event recorded when the stage that made this batch is done with it
    started: object = None  # CUDA event (timed) recorded on the models' stream as they start on this batch
    began: float = 0.0


class StylizeEngine:
    def __init__(self, models: dict[str, UNet], device: torch.device | str, config: EngineConfig = EngineConfig()):
        if not models:
            raise ValueError("at least one model is needed")
        self.device = torch.device(device)
        self.config = config
        self.cuda = self.device.type == "cuda"
        self.models: dict[str, torch.nn.Module] = {}
        for name, model in models.items():
            model = model.to(self.device).eval()
            if self.cuda and config.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self.models[name] = model
        self.batch_size = config.batch_size or (64 if self.cuda else 8)
        self.max_batch_pixels = config.max_batch_pixels or self._default_batch_pixels()
        if config.compile:
            self.models = {name: torch.compile(model) for name, model in self.models.items()}
        self.gpu_jpeg = self.cuda and config.gpu_codec
        self.encode_split = EncodeSplit(config.gpu_encode_share)
        self.gpu_decode = self.cuda and config.gpu_decode
        self._threads = config.cpu_threads or os.cpu_count() or 2
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="codec")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _map(self, function, items) -> list:
        items = list(items)
        if len(items) <= 1:
            return [function(item) for item in items]
        return self._map_started(function, items)()[0]

    def _map_started(self, function, items) -> Callable[[], tuple[list, float]]:
        """``function`` over ``items`` started in the pool, a few items per task (a task per image wakes a thread
        per image: at 32 px on 2 cores the engine ran 3,600-4,000 img/s so, 4,100-5,400 in tasks of a few). The
        returned call waits for the results, in order, and says when the last task finished (perf_counter)."""
        items = list(items)

        def run_chunk(chunk: list) -> tuple[list, float]:
            return [function(item) for item in chunk], time.perf_counter()

        if not items:
            return lambda: ([], time.perf_counter())
        per_task = -(-len(items) // (2 * self._threads))  # two tasks per thread: slow images even out
        futures = [self._pool.submit(run_chunk, items[i:i + per_task]) for i in range(0, len(items), per_task)]

        def results() -> tuple[list, float]:
            chunks = [future.result() for future in futures]
            return [result for chunk, _ in chunks for result in chunk], max(finished for _, finished in chunks)
        return results

    def __enter__(self) -> "StylizeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        """Stylise every job with its models; one Outcome per job, in input order. Errors in the input
        iterator (a storage failure, say) are raised here, after the outcomes finished before it."""
        stop = threading.Event()
        decoded: queue.Queue = queue.Queue(self.config.queue_batches)
        stylized: queue.Queue = queue.Queue(self.config.queue_batches)
        stages = [
            threading.Thread(target=self._stage, args=(self._decode_batches(jobs), decoded, stop), daemon=True),
            threading.Thread(target=self._stage, args=(self._stylize_batches(decoded, stop), stylized, stop),
                             daemon=True),
        ]
        for thread in stages:
            thread.start()
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        free_since = None  # when this stage last asked for a batch
        previous_ready = None  # the batch before's event: when the models finished it
        try:
            for batch in _drain(stylized, stop):
                waited_for_input = free_since is not None and time.perf_counter() - free_since > _WAITED
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    if batch.ready is not None:
                        stream.wait_event(batch.ready)
                        for output in batch.results.values():
                            output.record_stream(stream)  # made on the stylise stream, last used here
                    waited_for = self._held_up_by(batch, previous_ready, waited_for_input)
                    previous_ready = batch.ready
                    outcomes = list(self._encode(batch, waited_for))
                # outside the stream's context: the caller's own CUDA work, between outcomes, stays on its stream
                yield from outcomes
                free_since = time.perf_counter()
        finally:
            stop.set()
            for thread in stages:
                thread.join()

    def _held_up_by(self, batch: _Batch, previous_ready, waited_for_input: bool) -> str:
        """What the encoding waited for (EncodeSplit): "models" where, on the GPU, the models started this batch
        the moment they finished the one before (work queues up for them: they, and whatever else runs on the GPU,
        are the slower); else "input" where this stage waited for the batch to come (reading or decoding is the
        slower: the models' stream stood idle too), else "nothing" (this stage, or its caller, is the slower).
        The batch comes to this stage once the models are launched on it, not done, so the wait for the batch
        alone cannot tell the models from the input apart."""
        if self.gpu_jpeg and batch.started is not None and previous_ready is not None:
            batch.ready.synchronize()  # the encoding waits for it anyway
            if previous_ready.elapsed_time(batch.started) < _WAITED * 1000:  # milliseconds
                return "models"
        return "input" if waited_for_input else "nothing"

    # --- stages -------------------------------------------------------------------------------------------

    def _stage(self, produce: Iterator, out: queue.Queue, stop: threading.Event) -> None:
        """Run one stage: put what ``produce`` yields on ``out``, then _DONE, or the exception that ended it."""
        try:
            for item in produce:
                if not _put(out, item, stop):
                    return
            _put(out, _DONE, stop)
        except BaseException as error:  # handed to the consumer, which raises it in the caller's thread
            _put(out, error, stop)

    def _decode_batches(self, jobs: Iterable[Job]) -> Iterator[_Batch]:
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        for group in self._cut_batches(jobs):
            began = time.perf_counter()
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                batch = self._decode(group, began)
                if stream is not None:
                    batch.ready = stream.record_event()
            yield batch

    def _cut_batches(self, jobs: Iterable[Job]) -> Iterator[list[tuple[Job, "_Header"]]]:
        group: list[tuple[Job, _Header]] = []
        pixels = 0
        try:
            for job in jobs:
                fmt = output_format(job.output_format or self.config.output_format)
                header = _Header.read(job.data, self.config.max_pixels, MAX_OUTPUT_SIDE[fmt], fmt)
                if group and (len(group) >= self.batch_size or pixels + header.pixels > self.max_batch_pixels):
                    yield group
                    group, pixels = [], 0
                group.append((job, header))
                pixels += header.pixels
        except Exception:  # the input failed: what was read before the failure is still stylised
            if group:
                yield group
            raise
        if group:
            yield group

    def _decode(self, group: list[tuple[Job, "_Header"]], began: float) -> _Batch:
        outcomes = [Outcome(job.tag) for job, _ in group]
        images: list[torch.Tensor | None] = [None] * len(group)

        def decode(index: int) -> torch.Tensor | str:
            job, header = group[index]
            if header.error is not None:
                return header.error
            try:
                if header.plain_jpeg:
                    tensor = decode_plain_jpeg(job.data, self.config.max_pixels)
                else:
                    tensor = image_to_tensor(decode_image(job.data, self.config.max_pixels))
            except ImageDecodeError as error:
                return str(error)
            return tensor.pin_memory() if self.cuda else tensor

        on_gpu = [i for i, (job, header) in enumerate(group)
                  if self.gpu_decode and header.plain_jpeg and jpeg_ends_complete(job.data)]
        if on_gpu:
            try:
                for index, image in zip(on_gpu, _nvjpeg_decode([group[i][0].data for i in on_gpu], self.device)):
                    images[index] = image
            except RuntimeError:  # nvjpeg refuses the batch (a corrupt JPEG): the CPU path says which, and why
                pass
        on_cpu = [i for i, image in enumerate(images) if image is None]
        for index, result in zip(on_cpu, self._map(decode, on_cpu)):
            if isinstance(result, str):
                outcomes[index].error = result
            else:
                images[index] = result.to(self.device, non_blocking=True)
        for outcome, image in zip(outcomes, images):
            if image is not None:
                outcome.height, outcome.width = (int(side) for side in image.shape[-2:])
        for job, _ in group:
            job.data = b""  # decoded: let the encoded bytes go now, not when the batch is written
        return _Batch([job for job, _ in group], outcomes, images, began=began)

    def _stylize_batches(self, decoded: queue.Queue, stop: threading.Event) -> Iterator[_Batch]:
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        for batch in _drain(decoded, stop):
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                if batch.ready is not None:
                    stream.wait_event(batch.ready)
                if stream is not None:
                    batch.started = stream.record_event(torch.cuda.Event(enable_timing=True))
                self._stylize(batch)
                if stream is not None:
                    batch.ready = stream.record_event(torch.cuda.Event(enable_timing=True))
                    for image in batch.images:
                        if image is not None:
                            image.record_stream(stream)  # made on the decode stream, last used here
            yield batch

    @torch.inference_mode()
    def _stylize(self, batch: _Batch) -> None:
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(batch.images):
            if image is not None:
                by_size[tuple(image.shape[-2:])].append(index)
        for indices in by_size.values():
            stacked = torch.stack([batch.images[i] for i in indices])
            for name, model in self.models.items():
                wanted = [n for n, i in enumerate(indices) if name in batch.jobs[i].models]
                if not wanted:
                    continue
                inputs = stacked if len(wanted) == len(indices) else stacked[wanted]
                for n, output in zip(wanted, self.forward(model, inputs)):
                    batch.results[(indices[n], name)] = output

    @torch.inference_mode()
    def forward(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) on the device to uint8 outputs. A batch too large for the device (out of memory, or
        a tensor past the 2**31 elements some kernels can index) is halved, and later batches are cut smaller;
        an image over the pixel budget on its own, or too large alone, is stylised in tiles (same picture)."""
        count = len(images)
        pixels = images[0, 0].numel()
        if count == 1 and pixels > max(self.max_batch_pixels, MIN_TILE_PIXELS):
            return self._forward_tiled(model, images, self.max_batch_pixels)
        if self.config.compile and count < self.batch_size:
            # a compiled model recompiles for every new shape: keep the batch dimension fixed
            images = torch.cat([images, images[-1:].expand(self.batch_size - count, -1, -1, -1)])
        try:
            if self.cuda and self.config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)  # kept by the float conversion
            return stylize_batch(model, images)[:count].contiguous()
        except RuntimeError as error:
            if not _batch_too_large(error):
                raise
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if count == 1:
                # Not below the smallest tile: that would put every later image, however small, in a batch of its own.
                self.max_batch_pixels = min(self.max_batch_pixels, max(pixels // 2, MIN_TILE_PIXELS))
                return self._forward_tiled(model, images, self.max_batch_pixels)
            half = count // 2
            # Later batches are cut to what fits (also the fixed shape a compiled model is padded to).
            self.batch_size = min(self.batch_size, half)
            self.max_batch_pixels = min(self.max_batch_pixels, half * pixels)
            return torch.cat([self.forward(model, images[:half]), self.forward(model, images[half:count])])

    def _forward_tiled(self, model: torch.nn.Module, images: torch.Tensor, max_pixels: int) -> torch.Tensor:
        eager = getattr(model, "_orig_mod", model)  # tiles vary in shape: a compiled model would recompile for each
        max_pixels = max(max_pixels, MIN_TILE_PIXELS)
        while True:
            try:
                return stylize_tiled(eager, images[0].contiguous(), max_pixels).unsqueeze(0)
            except RuntimeError as error:
                if not _batch_too_large(error) or max_pixels <= MIN_TILE_PIXELS:
                    raise
                if isinstance(error, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                max_pixels = max(max_pixels // 2, MIN_TILE_PIXELS)
                self.max_batch_pixels = min(self.max_batch_pixels, max_pixels)

    def _encode(self, batch: _Batch, waited_for: str = "nothing") -> Iterator[Outcome]:
        def format_of(key: tuple[int, str]) -> str:
            return output_format(batch.jobs[key[0]].output_format or self.config.output_format)

        keys = list(batch.results)
        jpegs = [key for key in keys if self.gpu_jpeg and format_of(key) == "JPEG"]
        on_gpu = jpegs[:self.encode_split.on_gpu(len(jpegs))]
        gpu_keys = set(on_gpu)
        on_cpu = [key for key in keys if key not in gpu_keys]
        began = time.perf_counter()
        # The pool's threads copy on their own CUDA stream, which does not wait for the model's: the outputs they
        # encode come to the host here, on the stream that waited for this batch.
        images = _to_host({key: batch.results[key] for key in on_cpu}) if self.cuda else batch.results

        def cpu_encode(key: tuple[int, str]) -> bytes | str:
            try:
                image = images[key]
                if format_of(key) == "JPEG":
                    return encode_jpeg_tensor(image, self.config.quality)
                return encode_image(tensor_to_image(image), format_of(key), self.config.quality)
            except (OSError, ValueError, RuntimeError) as error:  # the encoder refuses it: its error, not the run's
                return f"cannot encode as {format_of(key)}: {error}"

        cpu_results = self._map_started(cpu_encode, on_cpu)  # the CPU threads encode while nvjpeg does the rest
        try:
            encoded: dict = dict(zip(on_gpu, _nvjpeg_encode([batch.results[k] for k in on_gpu], self.config.quality)))
            refused = []
        except RuntimeError:  # nvjpeg refuses the batch: PIL encodes each, and says which one cannot be encoded
            encoded, refused = {}, on_gpu
        gpu_finished = time.perf_counter()
        cpu_encoded, cpu_finished = cpu_results()
        encoded.update(zip(on_cpu, cpu_encoded))
        if jpegs and not refused:
            self.encode_split.update((len(on_gpu), gpu_finished - began), (len(on_cpu), cpu_finished - began),
                                     waited_for)
        if refused:
            images = _to_host({key: batch.results[key] for key in refused})
            encoded.update(zip(refused, self._map(cpu_encode, refused)))
        share = (time.perf_counter() - batch.began) / max(len(batch.jobs), 1)
        for index, (job, outcome) in enumerate(zip(batch.jobs, batch.outcomes)):
            outcome.seconds = share
            if outcome.error is None:
                failures = [encoded[(index, name)] for name in job.models if isinstance(encoded.get((index, name)), str)]
                if failures:
                    outcome.error = failures[0]
                else:
                    outcome.outputs = {name: encoded[(index, name)] for name in job.models if (index, name) in encoded}
            yield outcome

    def _default_batch_pixels(self) -> int:
        fraction = self.config.memory_fraction
        if not self.cuda:
            return min(cpu_batch_pixels(model, 0.25 * fraction) for model in self.models.values())
        return min(batch_pixels_for_memory(model, self.device, 0.4 * fraction) for model in self.models.values())


_WAITED = 0.001  # seconds: a stage that waited longer than this for its input waited for it
MIN_TILE_PIXELS = 256 * 256  # tiles smaller than this spend most of their work on their margins

# The longest side each output format can hold.
MAX_OUTPUT_SIDE = {"JPEG": 65_500, "WEBP": 16_383, "PNG": 2**31 - 1}


def _batch_too_large(error: RuntimeError) -> bool:
    message = str(error)
    return (isinstance(error, torch.cuda.OutOfMemoryError) or "32-bit index math" in message
            or "can't allocate memory" in message)  # the CPU allocator, where the system refuses the memory


def batch_pixels_for_memory(model: torch.nn.Module, device: torch.device, share: float = 0.4) -> int:
    """How many pixels one forward pass may take: ``share`` of the free GPU memory over the memory one pixel
    needs, measured with a probe batch."""
    probe = torch.rand(2, 3, 256, 256, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), autocast_for(device):
        model(probe)
    torch.cuda.synchronize(device)
    per_pixel = max((torch.cuda.max_memory_allocated(device) - before) / probe[:, 0].numel(), 1.0)
    free, _ = torch.cuda.mem_get_info(device)
    return max(int(free * share / per_pixel), MIN_TILE_PIXELS)


def cpu_batch_pixels(model: torch.nn.Module, share: float = 0.25) -> int:
    """How many pixels one forward pass may take on the CPU: ``share`` of the memory this process may still use
    over the memory one pixel needs (measured peak: about 40 bytes per channel of the first level, plus the
    image's own copies). 8 Mpx where the available memory cannot be read."""
    available = available_memory()
    if available is None:
        return 8 * 1024 * 1024
    base_channels = getattr(getattr(model, "config", None), "base_channels", 16)
    return max(int(available * share / (40 * base_channels + 100)), MIN_TILE_PIXELS)


def available_memory(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory available to this process: the system's, or what its container's limit still allows if
    that is less."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        return None
    headroom = container_headroom(cgroup_root)
    return max(min(available, headroom) if headroom is not None else available, 0)


# (limit, usage, statistics file, its count of page cache not recently used) for cgroup v2, then v1
_CGROUP_FILES = (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                 ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
                  "total_inactive_file"))


def container_headroom(cgroup_root: Path) -> int | None:
    """The container's memory limit minus its usage, or None where there is no limit. The usage counts the page
    cache of every file the container read; the inactive part of it, which the kernel reclaims before it would
    kill anything, is left out (as Kubernetes' working set does), or a pipeline that has read many images would
    see almost no memory and cut its batches to nothing."""
    for limit_name, usage_name, stat_name, inactive_key in _CGROUP_FILES:
        try:
            limit = (cgroup_root / limit_name).read_text().strip()
            usage = int((cgroup_root / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
            return None
        try:
            stat = (cgroup_root / stat_name).read_text()
            inactive = int(re.search(rf"^{inactive_key} (\d+)$", stat, re.MULTILINE).group(1))
        except (OSError, AttributeError):
            inactive = 0
        return int(limit) - max(usage - inactive, 0)
    return None


@dataclass
class _Header:
    """What the image's header says, read without decoding its pixels."""

    pixels: int = 0
    plain_jpeg: bool = False  # RGB, sRGB, upright as stored: decode_plain_jpeg gives decode_image's pixels
    error: str | None = None  # set when the header alone shows the image cannot be used

    @classmethod
    def read(cls, data: bytes, max_pixels: int, max_side: int = 2**31, fmt: str = "PNG") -> "_Header":
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if image.format == "JPEG" else 1
        except Exception:
            return cls()  # the CPU decoder says what is wrong with it
        try:
            check_pixel_count(width, height, max_pixels)
        except ImageTooLargeError as error:
            return cls(error=str(error))
        if max(width, height) > max_side:
            return cls(error=f"{width}x{height} is too large for {fmt} output (at most {max_side:,} pixels a side); "
                             "choose another output format")
        plain_jpeg = (image.format == "JPEG" and image.mode == "RGB" and orientation in (0, 1)
                      and srgb_transform(image.info.get("icc_profile")) is None)
        return cls(pixels=width * height, plain_jpeg=plain_jpeg)


def _nvjpeg_decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas],
                       mode=ImageReadMode.RGB, device=device)


def _to_host(outputs: dict) -> dict:
    """The outputs copied to the host, one copy per image size: a ``.cpu()`` per image waits for the GPU once per
    image, and where several processes share the GPU each wait can be a time slice."""
    by_shape: dict[tuple, list] = defaultdict(list)
    for key, output in outputs.items():
        by_shape[tuple(output.shape)].append(key)
    host = {}
    for keys in by_shape.values():
        host.update(zip(keys, torch.stack([outputs[key] for key in keys]).cpu().unbind(0)))
    return host


def _nvjpeg_encode(images: list[torch.Tensor], quality: int) -> list[bytes]:
    if not images:
        return []
    from torchvision.io import encode_jpeg

    encoded = encode_jpeg(images, quality=quality)
    sizes = [int(e.numel()) for e in encoded]
    flat = torch.cat(encoded).cpu()  # one copy back instead of one per image
    return [bytes(chunk.numpy()) for chunk in torch.split(flat, sizes)]


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _drain(source: queue.Queue, stop: threading.Event) -> Iterator:
    while not stop.is_set():
        try:
            item = source.get(timeout=0.1)
        except queue.Empty:
            continue
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
