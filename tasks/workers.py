"""Shards in worker processes that share the machine and its GPU.

Python's per-image work in a shard (a read, a write, a manifest row, hand-offs between threads) holds the
process's global interpreter lock, so one process tops out at a few hundred images a second whatever the device:
on 2 CPU cores, with a model that costs nothing (32 px), one process ran 660-780 img/s end to end and two workers
1,050 once started.
Each worker process loads the models once, builds its own engine with its share of the cores and of the memory
budget (``ShardOptions.workers``), and takes shards from the parent until none are left.
"""

from __future__ import annotations

import copy
import multiprocessing
import queue
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

import torch

from stylecore.model import UNet

from .bucket import Shard, ShardOptions, ShardResult, cores_per_worker, models_device, stylize_shard
from .storage import Location

PROGRESS_SECONDS = 0.2  # how often a worker reports finished images to the parent


class WorkerDied(RuntimeError):
    """A worker process ended without finishing its shard (killed, or out of memory)."""


def stylize_in_processes(shards: list[Shard], source: Location, destination: Location, models: dict[str, UNet],
                         options: ShardOptions, on_progress: Callable[[int], None] | None = None) -> list[ShardResult]:
    """Every shard, in ``options.workers`` processes. The first failure stops the shards not yet started, lets the
    running ones finish (their work is kept), and is raised here."""
    device = str(models_device(models))
    # Workers get the models on the CPU (a CUDA tensor would cross as an IPC handle tied to this process).
    cpu_models = {name: copy.deepcopy(model).cpu() for name, model in models.items()}
    context = multiprocessing.get_context("spawn")  # forking a process that has used CUDA or threads is unsafe
    progress = context.Queue()
    report = on_progress or (lambda count: None)
    results: list[ShardResult] = []
    failure: BaseException | None = None
    with ProcessPoolExecutor(options.workers, mp_context=context, initializer=_start_worker,
                             initargs=(cpu_models, device, options.workers, progress)) as pool:
        pending: set[Future] = {pool.submit(_run_shard, shard, source, destination, options) for shard in shards}
        try:
            while pending:
                done, pending = wait(pending, timeout=PROGRESS_SECONDS, return_when=FIRST_COMPLETED)
                _forward_progress(progress, report)
                for future in done:
                    if future.cancelled():
                        continue
                    error = future.exception()
                    if error is None:
                        results.append(future.result())
                    elif failure is None:
                        failure = error
                        for other in pending:
                            other.cancel()
        except BaseException:  # interrupted: shards not started stay undone, running ones finish their journal
            for future in pending:
                future.cancel()
            raise
    _forward_progress(progress, report)
    if isinstance(failure, BrokenProcessPool):
        raise WorkerDied("a worker process ended unexpectedly (killed, or out of memory); finished images are "
                         "kept: run the same command again to do the rest") from failure
    if failure is not None:
        raise failure
    return results


def _forward_progress(progress: multiprocessing.Queue, report: Callable[[int], None]) -> None:
    while True:
        try:
            report(progress.get_nowait())
        except queue.Empty:
            return


_worker: dict = {}  # this worker process's models and progress queue


def _start_worker(models: dict[str, UNet], device: str, workers: int, progress: multiprocessing.Queue) -> None:
    torch.set_num_threads(cores_per_worker(workers))
    _worker["models"] = {name: model.to(device).eval() for name, model in models.items()}
    _worker["progress"] = progress


def _run_shard(shard: Shard, source: Location, destination: Location, options: ShardOptions) -> ShardResult:
    progress: multiprocessing.Queue = _worker["progress"]
    unreported, reported_at = 0, time.monotonic()

    def on_progress(count: int) -> None:
        nonlocal unreported, reported_at
        unreported += count
        if time.monotonic() - reported_at >= PROGRESS_SECONDS:
            progress.put(unreported)
            unreported, reported_at = 0, time.monotonic()

    try:
        return stylize_shard(shard, source, destination, _worker["models"], options, on_progress)
    finally:
        if unreported:
            progress.put(unreported)
