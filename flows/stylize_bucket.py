"""Mass stylisation: every image under a source URL, through one or more style models, into a destination URL.

    ingest the source into shards -> stylise each shard (retried on storage failures) -> combine the manifest

Shards that still fail after their retries leave the run Failed, after the manifest has been written
with every other shard's rows; running the flow again redoes only what is missing.
"""

from __future__ import annotations

import concurrent.futures
import time
from contextlib import ExitStack
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import Field

from stylecore.images import DEFAULT_MAX_PIXELS
from tasks.bucket import DEFAULT_MAX_IMAGE_BYTES, shards_may_run, stop_running_shards, workers_for
from tasks.secrets import StorageSecrets, redact, reveal_options, with_secret_block
from tasks.storage import Location, check_bucket_exists
from tasks.stylize_tasks import (
    carry_over, check_models, claimed_destination, clean_destination, combine_manifest, ingest, open_shard_workers,
    record_run, stylize_shard_task,
)


class ShardsFailed(RuntimeError):
    """Some shards failed after all their retries. ``reason`` says how many and why (the first failure), without
    the advice; ``summary`` is the run's summary where its manifest was written."""

    def __init__(self, reason: str, summary: dict | None = None):
        super().__init__(reason, summary)  # what a pickled copy is rebuilt from
        self.reason, self.summary = reason, summary

    def __str__(self) -> str:
        return f"{self.reason}; run the flow again to redo only the missing images"


OutputFormat = Literal["jpeg", "jpg", "png", "webp", "same"]
# The progress artifact is updated at most this often (and when the last shard ends): each update is a request the
# Prefect server spends about 12 ms of CPU on, with thousands of shards in a large run.
PROGRESS_UPDATE_SECONDS = 2.0
STOP_WAIT_SECONDS = 60  # at most, for interrupted shards to record what they wrote


def run_shard_tasks(shard_task, shards: list, arguments: dict, workers: int) -> tuple[list[dict], list[str]]:
    """Every shard through ``shard_task``, in ``workers`` processes when more than one; returns the finished shards'
    counts and the failed ones' reasons (each failure already retried)."""
    progress = create_progress_artifact(0.0, description=f"shards of {redact(arguments['source'])} done")
    per_shard, failed = [], []
    with ExitStack() as stack:
        pool = stack.enter_context(open_shard_workers(arguments["models"], arguments["model_store"], workers,
                                                      arguments["storage_options"], arguments["pinned"])
                                   ) if workers > 1 else None
        threads = stack.enter_context(ThreadPoolTaskRunner(2 * workers)) if pool else None
        futures = []
        for shard in shards:
            # With worker processes each shard task (in a thread of this flow) hands its shard to them; two
            # tasks a worker keep one queued while the other's task run is recorded.
            # quote: Prefect would otherwise walk every key of every shard looking for futures (about 0.2 s of
            # CPU a shard of 250, taken from the workers' cores)
            futures.append(threads.submit(shard_task, {**arguments, "shard": quote(shard), "workers": pool}) if pool
                           else shard_task.submit(shard=quote(shard), **arguments))
        updated_at = time.monotonic()
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                try:
                    result = future.result()
                    per_shard.append({"shard_id": result["shard_id"], "images": result["images"],
                                      **result["counts"], "seconds": round(result["seconds"], 2)})
                except Exception as error:  # the task already retried; record it and let the other shards finish
                    failed.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
                if done == len(futures) or time.monotonic() - updated_at >= PROGRESS_UPDATE_SECONDS:
                    update_progress_artifact(progress, 100.0 * done / len(futures))
                    updated_at = time.monotonic()
        except BaseException:  # Ctrl-C, SIGTERM: running shards stop at their next image and record what they wrote
            stop_running_shards()
            if pool is not None:
                pool.interrupt()  # a signal to this process only (SIGTERM) does not reach the workers
            for future in futures:
                future.wrapped_future.cancel()  # queued: never started
            try:
                concurrent.futures.wait([future.wrapped_future for future in futures], timeout=STOP_WAIT_SECONDS)
            finally:  # also after a second Ctrl-C: later runs in this process must not find shards stopping
                shards_may_run()
            raise
    if not futures:
        update_progress_artifact(progress, 100.0)
    return per_shard, failed


# The bounds are checked (and shown in the deployment's form) before the run starts: a bad value would otherwise
# fail every shard, after all its retries.
@flow(name="stylize-bucket", task_runner=ThreadPoolTaskRunner(max_workers=2))
def stylize_bucket(
    source: Annotated[str, Field(min_length=1)],
    destination: Annotated[str, Field(min_length=1)],
    models: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)],
    model_store: str | None = None,
    storage_options: StorageSecrets | dict | None = None,
    storage_secret_block: str | None = None,
    shard_size: Annotated[int, Field(ge=1, le=1_000_000)] = 256,
    batch_size: Annotated[int, Field(ge=0, le=65_536)] = 0,
    max_batch_pixels: Annotated[int, Field(ge=0)] = 0,
    output_format: OutputFormat = "jpeg",
    quality: Annotated[int, Field(ge=1, le=100)] = 90,
    max_pixels: Annotated[int, Field(ge=1)] = DEFAULT_MAX_PIXELS,
    max_image_bytes: Annotated[int, Field(ge=1)] = DEFAULT_MAX_IMAGE_BYTES,
    gpu_codec: bool = True,
    gpu_decode: bool = True,
    compile: bool = False,
    skip_existing: bool = False,
    retries: Annotated[int, Field(ge=0, le=100)] = 3,
    retry_delay_seconds: Annotated[float, Field(ge=0, le=86_400)] = 5.0,
    journal_seconds: Annotated[float, Field(gt=0, le=86_400)] = 5.0,
    workers: Annotated[int, Field(ge=0, le=1024)] = 0,
) -> dict:
    """Stylise every image under ``source`` into ``destination`` with each of ``models`` (names in ``model_store``,
    by default the worker's $STYLIZE_HOME as for train-new-style, or model URLs), writing
    ``destination/manifest.parquet``. ``batch_size`` 0 picks it (64 on a GPU within its free memory, 8 on a CPU).
    ``max_batch_pixels`` bounds one forward pass (0: from the free memory, a quarter of it on a CPU); a larger image
    is stylised in tiles. ``gpu_codec`` encodes a share of each batch's JPEG outputs on the GPU, ``gpu_decode`` decodes
    plain JPEG inputs there (off: in CPU threads); ``compile`` runs the model through torch.compile.
    ``skip_existing`` also counts an output that exists without a manifest row as done. Images over
    ``max_pixels`` pixels or ``max_image_bytes`` bytes get error rows. A running shard journals its finished rows
    every ``journal_seconds``: the most work a crashed worker can cost. ``workers`` N > 1 runs shards in N worker
    processes, each holding the models with its share of the cores and memory (one process's per-image Python work
    tops out at a few hundred images a second), each shard still a task of this flow run, retried in fresh processes
    if a worker dies; 1 runs two shards at a time in this process's threads; 0 (the default) picks 1 below 2,000
    images and one per four cores, at least two, from there (as ``stylize run``). ``storage_options`` (credentials
    included) are kept out of logs, manifests and artifacts, and are recorded by Prefect as ``**********`` when given
    as hidden options (``tasks.secrets.hide_options``; the CLI does so); a deployment run records what it was given,
    so there name a Prefect Secret block holding them (a JSON object) in ``storage_secret_block``: only its name is
    recorded, and a retried run reads it again."""
    logger = get_run_logger()
    started = time.perf_counter()
    storage_options = with_secret_block(storage_options, storage_secret_block)
    check_bucket_exists(Location(destination, reveal_options(storage_options)), "destination")
    pinned = check_models(models, model_store, storage_options)  # every shard uses these very weights
    shards = ingest(source, shard_size, storage_options, exclude=destination)
    # One run at a time per destination: another's start would clear this one's temporary files.
    with claimed_destination(destination, storage_options):
        clean_destination(destination, storage_options)
        carry_over(source, destination, quote(shards), storage_options)
        options = {"output_format": output_format, "quality": quality, "batch_size": batch_size,
                   "max_batch_pixels": max_batch_pixels, "max_pixels": max_pixels,
                   "max_image_bytes": max_image_bytes, "gpu_codec": gpu_codec,
                   "gpu_decode": gpu_decode, "compile": compile, "skip_existing": skip_existing,
                   "journal_seconds": journal_seconds}
        # What this run was asked to do (storage options left out: they may hold secrets), for retry-failed.
        record_run(destination, {"source": source, "models": models, "model_store": model_store,
                                 "storage_secret_block": storage_secret_block, "shard_size": shard_size, **options},
                   storage_options)
        delays = [retry_delay_seconds * 2**attempt for attempt in range(retries)]  # exponential backoff
        shard_task = stylize_shard_task.with_options(retries=retries, retry_delay_seconds=delays)
        workers = workers_for(workers, shards)
        arguments = {"source": source, "destination": destination, "models": models, "model_store": model_store,
                     "options": options, "storage_options": storage_options, "pinned": pinned}
        per_shard, failed = run_shard_tasks(shard_task, shards, arguments, workers)
        try:
            summary = combine_manifest(destination, [s.shard_id for s in shards], storage_options, source)
        except Exception as error:
            raise ShardsFailed(f"{len(failed)} of {len(shards)} shards failed ({failed[0] if failed else 'none'}), and "
                               f"{error}") from None
    seconds = time.perf_counter() - started
    images = sum(len(s) for s in shards)
    summary.update({"images": images, "shards": len(shards), "failed_shards": len(failed), "workers": workers,
                    "seconds": round(seconds, 2),
                    "images_per_second": round(images / seconds, 2) if seconds > 0 else 0.0})
    if per_shard:
        create_table_artifact(per_shard, key="stylize-bucket-shards", description="per-shard counts")
    counts = summary["counts"]
    create_markdown_artifact(
        f"## Stylised {redact(source)}\n\n"
        f"- images: {images} in {len(shards)} shards, {len(failed)} failed\n"
        f"- rows: ok {counts['ok']}, skipped {counts['skipped']}, error {counts['error']}\n"
        f"- throughput: {summary['images_per_second']} images/s over {seconds:.1f} s\n"
        f"- outputs: `{redact(destination)}`, manifest `{summary['manifest_uri']}`\n",
        key="stylize-bucket-summary",
    )
    logger.info("stylize-bucket: %s", summary)
    if failed:
        raise ShardsFailed(f"{len(failed)} of {len(shards)} shards failed ({failed[0]})", summary)
    return summary
