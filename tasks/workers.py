"""Shards in worker processes that share the machine and its GPU.

Python's per-image work in a shard (a read, a write, a manifest row, hand-offs between threads) holds the
process's global interpreter lock, so one process tops out at a few hundred images a second whatever the device:
on 2 CPU cores, with a model that costs nothing (32 px), one process ran 660-780 img/s end to end and two workers
1,050 once started.
Each worker process loads the models once, builds its own engine with its share of the cores and of the memory
budget (``ShardOptions.workers``), and takes shards from this process until none are left. ``ShardWorkers`` is
the pool (the stylize-bucket flow's shard tasks hand their shards to it); ``stylize_in_processes`` runs a list of
shards through one (``run_shards``, what ``stylize run`` does on folders).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator

import torch

from stylecore.model import UNet

from .bucket import Shard, ShardOptions, ShardResult, cores_per_worker, models_device, stylize_shard
from .storage import Location

PROGRESS_SECONDS = 0.2  # how often a worker reports finished images to the parent


class WorkerDied(RuntimeError):
    """A worker process ended without finishing its shard (killed, out of memory, or it failed to start, e.g. a
    script that starts workers without an ``if __name__ == "__main__":`` guard)."""


WORKER_DIED = ("a worker process ended unexpectedly (killed, out of memory, or it failed to start: see any error "
               "above); finished images are kept: run the same command again to do the rest")


class ShardWorkers:
    """``count`` spawned processes, each holding ``models`` on ``device`` (default: where ``models`` are), that
    stylise the shards submitted from any thread of this process. A worker that dies breaks the processes it ran
    with: their shards raise ``WorkerDied`` and the next submit starts fresh processes, so a retried shard runs
    again. Use it as a context manager."""

    def __init__(self, models: dict[str, UNet], count: int, device: str | None = None):
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        self.count = count
        self._device = device or str(models_device(models))  # where the workers run the models
        # Workers get the models on the CPU (a CUDA tensor would cross as an IPC handle tied to this process).
        self._cpu_models = {name: copy.deepcopy(model).cpu() for name, model in models.items()}
        # Spawned: forking a process that has used CUDA or threads is unsafe.
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._listeners: dict[int, Callable[[int], None]] = {}  # per submitted shard, until close: progress may lag
        self._tickets = itertools.count()
        self._pool: ProcessPoolExecutor | None = None
        self._progress: multiprocessing.Queue | None = None
        self._closing = threading.Event()
        self._forwarder = threading.Thread(target=self._forward_progress, name="shard-workers-progress", daemon=True)

    def __enter__(self) -> "ShardWorkers":
        with self._lock:
            self._start()
        self._forwarder.start()
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.close(cancel_queued=error_type is not None)

    def submit(self, shard: Shard, source: Location, destination: Location, options: ShardOptions,
               on_progress: Callable[[int], None] | None = None) -> Future:
        """Queue ``shard``; its future gives the ShardResult, or raises what the shard raised (BrokenProcessPool
        when a worker died). ``on_progress`` is called from a background thread with counts of finished images."""
        with self._lock:
            if self._pool is None:
                raise RuntimeError("these shard workers are closed")
            ticket = next(self._tickets)
            if on_progress is not None:
                self._listeners[ticket] = on_progress
            with _deaf_to_ctrl_c():  # a submit starts the workers: they hear SIGINT once ready for it
                try:
                    return self._pool.submit(_run_shard, ticket, shard, source, destination, options)
                except BrokenProcessPool:  # a worker died since the last submit: start afresh
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._start()
                    return self._pool.submit(_run_shard, ticket, shard, source, destination, options)

    def run(self, shard: Shard, source: Location, destination: Location, options: ShardOptions,
            on_progress: Callable[[int], None] | None = None) -> ShardResult:
        """Stylise ``shard`` in a worker and wait for it."""
        try:
            return self.submit(shard, source, destination, options, on_progress).result()
        except BrokenProcessPool:
            raise WorkerDied(WORKER_DIED) from None

    def interrupt(self) -> None:
        """Stop the workers' shards as Ctrl-C would (each records what it wrote) and start no queued one: for a
        parent stopped by a signal that only it received (``kill``, a scheduler's SIGTERM)."""
        with self._lock:
            processes = list(self._pool._processes.values()) if self._pool is not None else []  # noqa: SLF001
        for process in processes:
            if process.is_alive():
                try:
                    os.kill(process.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass

    def close(self, cancel_queued: bool = False) -> None:
        """Let running shards (and queued ones, unless ``cancel_queued``) finish, stop the workers, and deliver the
        last progress."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=cancel_queued)
        self._closing.set()
        if self._forwarder.is_alive():
            self._forwarder.join()

    def _start(self) -> None:
        self._progress = self._context.Queue()
        self._pool = ProcessPoolExecutor(self.count, mp_context=self._context, initializer=_start_worker,
                                         initargs=(self._cpu_models, self._device, self.count, self._progress))

    def _forward_progress(self) -> None:
        while True:
            try:
                ticket, count = self._progress.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            except (EOFError, OSError):  # the queue of processes replaced after a worker died
                continue
            listener = self._listeners.get(ticket)
            try:
                if listener is not None:
                    listener(count)
            except Exception:  # progress is a courtesy: the queue must still be drained or workers cannot exit
                pass


def stylize_in_processes(shards: list[Shard], source: Location, destination: Location, models: dict[str, UNet],
                         options: ShardOptions, on_progress: Callable[[int], None] | None = None,
                         device: str | None = None) -> list[ShardResult]:
    """Every shard, in ``options.workers`` processes running the models on ``device`` (default: where they are).
    The first failure stops the shards not yet started, lets the running ones finish (their work is kept), and
    is raised here."""
    results: list[ShardResult] = []
    failure: BaseException | None = None
    with ShardWorkers(models, options.workers, device) as workers:
        pending: set[Future] = {workers.submit(shard, source, destination, options, on_progress) for shard in shards}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
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
        except BaseException:  # interrupted: shards not started stay undone, running ones record what they wrote
            for future in pending:
                future.cancel()
            workers.interrupt()
            raise
    if isinstance(failure, BrokenProcessPool):
        raise WorkerDied(WORKER_DIED) from failure
    if failure is not None:
        raise failure
    return results


_worker: dict = {}  # this worker process's models and progress queue


@contextlib.contextmanager
def _deaf_to_ctrl_c() -> Iterator[None]:
    """Processes started in the block begin with SIGINT blocked (a blocked signal stays blocked across exec): a
    Ctrl-C while a worker still imports torch would print its KeyboardInterrupt traceback from inside the import.
    The worker unblocks it when ready (``_start_worker``). Started from the main thread, this process's own SIGINT
    and SIGTERM wait for the end of the block: raised half way through a start, they left a worker reading its
    start-up data from a closed pipe, which printed its traceback too."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    deferred: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            handlers[number] = signal.signal(number, lambda signum, frame: deferred.append(signum))
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for number in dict.fromkeys(deferred):
            signal.raise_signal(number)  # now, to the handler it was meant for


def _start_worker(models: dict[str, UNet], device: str, workers: int, progress: multiprocessing.Queue) -> None:
    torch.set_num_threads(cores_per_worker(workers))
    _worker["models"] = {name: model.to(device).eval() for name, model in models.items()}
    _worker["progress"] = progress
    signal.signal(signal.SIGINT, _stop)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # started deaf to it (_deaf_to_ctrl_c)
    except KeyboardInterrupt:  # a Ctrl-C while starting: no shard runs here (_run_shard)
        pass


def _stop(signum, frame) -> None:
    """SIGINT: the running shard stops (recording what it wrote) and shards still queued here do not start. A second
    one (Ctrl-C reaches the workers and their parent, which passes it on) must not cut that recording short."""
    if _worker.get("stopping"):
        return
    _worker["stopping"] = True
    raise KeyboardInterrupt


def _exit_with_parent() -> None:
    """A parent killed outright (kill -9, the OOM killer) cannot stop its workers: they would go on writing, and
    then wait for work forever. When it is gone, stop as on Ctrl-C, then leave."""
    multiprocessing.parent_process().join()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)  # time to record the shard's finished outputs
    os._exit(1)


def _run_shard(ticket: int, shard: Shard, source: Location, destination: Location,
               options: ShardOptions) -> ShardResult:
    if _worker.get("stopping"):
        raise KeyboardInterrupt("stopping: this shard was not started")
    progress: multiprocessing.Queue = _worker["progress"]
    unreported, reported_at = 0, time.monotonic()

    def on_progress(count: int) -> None:
        nonlocal unreported, reported_at
        unreported += count
        if time.monotonic() - reported_at >= PROGRESS_SECONDS:
            progress.put((ticket, unreported))
            unreported, reported_at = 0, time.monotonic()

    try:
        return stylize_shard(shard, source, destination, _worker["models"], options, on_progress)
    finally:
        if unreported:
            progress.put((ticket, unreported))
