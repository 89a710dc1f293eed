"""Prefect tasks for mass stylisation: ingest a bucket into shards, stylise a shard, combine the manifest.

Tasks exchange URLs, shard descriptions and small summaries, never tensors or images.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from typing import Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from stylecore.checkpoint import CheckpointError, check_style_model
from stylecore.model import UNet

from .bucket import PARTS_FOLDER, Shard, ShardOptions, carry_over_rows, combine_parts, list_shards, stylize_shard
from .lease import DestinationLease
from .models import default_device, load_model_from, model_location
from .secrets import StorageSecrets, redact, reveal_options
from .storage import Location, masked_errors, read_bytes, remove_partial_files, write_bytes
from .workers import ShardWorkers


@task(name="ingest")
def ingest(source: str, shard_size: int = 256, storage_options: StorageSecrets | dict | None = None,
           exclude: str | None = None) -> list[Shard]:
    """List the images under ``source`` (recursive, by extension, sorted) and split them into stable shards."""
    options = reveal_options(storage_options)
    shards = list_shards(Location(source, options), shard_size,
                         exclude=Location(exclude, options) if exclude else None)
    get_run_logger().info("%s: %d images in %d shards of up to %d", Location(source, options).display,
                          sum(len(s) for s in shards), len(shards), shard_size)
    return shards


@task(name="carry-over-rows")
def carry_over(source: str, destination: str, shards: list[Shard],
               storage_options: StorageSecrets | dict | None = None) -> int:
    """Earlier rows of unchanged inputs for shards whose ids changed (the listing shifted), so they are not redone."""
    options = reveal_options(storage_options)
    with masked_errors("cannot carry over earlier rows", options):
        carried = carry_over_rows(Location(source, options), Location(destination, options), shards)
    if carried:
        get_run_logger().info("%d finished outputs of earlier runs found again for shards that changed", carried)
    return carried


@task(name="load-models")
def check_models(models: list[str], model_store: str | None,
                 storage_options: StorageSecrets | dict | None = None) -> dict[str, str]:
    """Load every model once (checksums verified) before any shard starts, so a missing, truncated or tampered
    checkpoint stops the run at once with its reason instead of failing every shard. On the CPU: with worker
    processes this one never runs them, so it need not hold a GPU context. Returns each model's weights checksum,
    which the run's shards then insist on (``load_models(pinned=...)``)."""
    storage = reveal_options(storage_options)
    pinned: dict[str, str] = {}
    with masked_errors("cannot load the models", storage):
        load_models(models, model_store, storage, device="cpu", checksums=pinned)
    return pinned


@task(name="clean-destination")
def clean_destination(destination: str, storage_options: StorageSecrets | dict | None = None) -> int:
    """Remove temporary files a killed run left in a local destination."""
    options = reveal_options(storage_options)
    with masked_errors("cannot clean the destination", options):
        return remove_partial_files(Location(destination, options))


def load_models(models: list[str], model_store: str | None, storage: dict, device: str | None = None,
                pinned: dict[str, str] | None = None, checksums: dict[str, str] | None = None) -> dict[str, UNet]:
    """Each model by reference, under its own name, on ``device`` (default: the GPU if there is one), kept for this
    process: shards reuse them. Two models of one name would write the same outputs: refused. A model whose
    weights are not the ``pinned`` ones (replaced in the store since the run began) is refused too, so one run
    never mixes two versions of a style; ``checksums`` receives each model's."""
    device = device or default_device()
    loaded, references = {}, {}
    for reference in models:
        location = model_location(reference, model_store, storage)
        model, metadata = load_model_from(location, device)
        check_style_model(metadata, location.display)
        checksum = str(metadata.get("weights_sha256"))
        if pinned and pinned.get(reference, checksum) != checksum:
            raise CheckpointError(f"model {location.display} was replaced while this run was using it (weights "
                                  f"{pinned[reference][:12]}, now {checksum[:12]}); run again to stylise "
                                  "everything with one version")
        if checksums is not None:
            checksums[reference] = checksum
        name = metadata.get("name") or location.display.rstrip("/").rsplit("/", 1)[-1]
        if name in loaded and references[name] != location.url:
            raise ValueError(f"models {redact(references[name], storage)} and {location.display} are both named "
                             f"{name!r}: their outputs would overwrite each other; stylise with one at a time")
        loaded[name], references[name] = model, location.url
    return loaded


@contextlib.contextmanager
def claimed_destination(destination: str, storage_options: StorageSecrets | dict | None = None) -> Iterator[None]:
    """Hold ``destination``'s lease (tasks.lease) for the block, under this flow run's id: another live run
    writing there stops this one at once (DestinationBusy), before anything is cleaned or written."""
    options = reveal_options(storage_options)
    lease = DestinationLease(Location(destination, options), holder=str(flow_run.id) if flow_run.id else None)
    with masked_errors("cannot claim the destination", options):
        lease.claim()
    try:
        yield
    finally:
        lease.release()


def open_shard_workers(models: list[str], model_store: str | None, count: int,
                       storage_options: StorageSecrets | dict | None = None,
                       pinned: dict[str, str] | None = None) -> ShardWorkers:
    """``count`` worker processes holding the models on this machine's GPU (or CPU), for
    ``stylize_shard_task(workers=...)``; a context manager. This process keeps its copies on the CPU, which are also
    what a worker started again after a crash gets. Models replaced since ``pinned`` was taken are refused."""
    loaded = load_models(models, model_store, reveal_options(storage_options), device="cpu", pinned=pinned)
    return ShardWorkers(loaded, count, device=default_device())


# No Prefect cache: a shard's own manifest part and journal say what is done, and the workers cannot be hashed.
@task(name="stylize-shard", task_run_name="stylize-shard-{shard.shard_id}", cache_policy=NO_CACHE)
def stylize_shard_task(shard: Shard, source: str, destination: str, models: list[str], model_store: str | None,
                       options: dict, storage_options: StorageSecrets | dict | None = None,
                       workers: ShardWorkers | None = None, pinned: dict[str, str] | None = None) -> dict:
    """Stylise one shard with every model, here or in one of ``workers`` (which hold the models already); storage
    failures raise (and are retried), bad images become rows."""
    storage = reveal_options(storage_options)
    shard_options = ShardOptions(**options, workers=workers.count if workers else 1,
                                 flow_run_id=str(flow_run.id) if flow_run.id else None)
    source_location, destination_location = Location(source, storage), Location(destination, storage)
    try:
        if workers is not None:
            result = workers.run(shard, source_location, destination_location, shard_options)
        else:
            loaded = load_models(models, model_store, storage, pinned=pinned)
            result = stylize_shard(shard, source_location, destination_location, loaded, shard_options)
    except Exception as error:  # the message (not the traceback's locals) is what Prefect records and logs
        raise ShardError(f"shard {shard.shard_id}: {type(error).__name__}: {redact(error, storage)}") from None
    get_run_logger().info("shard %s: %s in %.1fs", shard.shard_id, result.counts, result.seconds)
    return asdict(result)


class ShardError(RuntimeError):
    """A shard failed on storage (retried by Prefect); the message says why, with credentials masked."""


@task(name="combine-manifest")
def combine_manifest(destination: str, shard_ids: list[str], storage_options: StorageSecrets | dict | None = None,
                     source: str | None = None) -> dict:
    """Combine the shard parts that exist into ``<destination>/manifest.parquet`` (written atomically); once all
    are there, ``source``'s records of shards no longer listed are removed."""
    storage = reveal_options(storage_options)
    try:
        return combine_parts(Location(destination, storage), shard_ids,
                             Location(source, storage) if source is not None else None)
    except Exception as error:
        raise ShardError(f"cannot write the manifest: {type(error).__name__}: {redact(error, storage)}") from None


RUN_RECORD = f"{PARTS_FOLDER}/run.json"


@task(name="record-run", retries=3, retry_delay_seconds=1)
def record_run(destination: str, parameters: dict, storage_options: StorageSecrets | dict | None = None) -> None:
    """Remember the parameters of the last run into ``destination`` (without storage options, and with any
    credentials in its URLs masked)."""
    storage = reveal_options(storage_options)
    document = redact(json.dumps(parameters, indent=2), storage)
    with masked_errors("cannot write the run's record", storage):
        write_bytes(Location(destination, storage).child(RUN_RECORD), (document + "\n").encode())


def recorded_run(destination: str, storage_options: StorageSecrets | dict | None = None) -> dict:
    try:
        return json.loads(read_bytes(Location(destination, reveal_options(storage_options)).child(RUN_RECORD)))
    except FileNotFoundError:
        raise ValueError(f"{destination} has no record of a stylize-bucket run ({RUN_RECORD} not found)") from None
    except ValueError:  # not JSON (UnicodeDecodeError is one too)
        raise ValueError(f"{destination}'s record of its last run ({RUN_RECORD}) is not readable JSON; run "
                         "stylize-bucket with its parameters instead") from None

