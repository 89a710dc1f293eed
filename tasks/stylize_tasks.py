"""Prefect tasks for mass stylisation: ingest a bucket into shards, stylise a shard, combine the manifest.

Tasks exchange URLs, shard descriptions and small summaries, never tensors or images.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from . import manifest
from .bucket import MANIFEST_NAME, PARTS_FOLDER, Shard, ShardOptions, list_shards, part_location, stylize_shard
from .models import default_device, load_model_from, model_location
from .storage import Location, read_bytes, write_bytes


@task(name="ingest")
def ingest(source: str, shard_size: int = 256, storage_options: dict | None = None,
           exclude: str | None = None) -> list[Shard]:
    """List the images under ``source`` (recursive, by extension, sorted) and split them into stable shards."""
    options = storage_options or {}
    shards = list_shards(Location(source, options), shard_size,
                         exclude=Location(exclude, options) if exclude else None)
    get_run_logger().info("%s: %d images in %d shards of up to %d", source, sum(len(s) for s in shards),
                          len(shards), shard_size)
    return shards


@task(name="stylize-shard", task_run_name="stylize-shard-{shard.shard_id}")
def stylize_shard_task(shard: Shard, source: str, destination: str, models: list[str], model_store: str | None,
                       options: dict, storage_options: dict | None = None) -> dict:
    """Stylise one shard with every model; storage failures raise (and are retried), bad images become rows."""
    storage = storage_options or {}
    device = default_device()
    loaded = {}
    for reference in models:
        location = model_location(reference, model_store, storage)
        model, metadata = load_model_from(location, device)
        loaded[metadata.get("name") or location.url.rstrip("/").rsplit("/", 1)[-1]] = model
    shard_options = ShardOptions(**options, flow_run_id=str(flow_run.id) if flow_run.id else None)
    result = stylize_shard(shard, Location(source, storage), Location(destination, storage), loaded, shard_options)
    get_run_logger().info("shard %s: %s in %.1fs", shard.shard_id, result.counts, result.seconds)
    return asdict(result)


@task(name="combine-manifest")
def combine_manifest(destination: str, shard_ids: list[str], storage_options: dict | None = None) -> dict:
    """Combine the shard parts that exist into ``<destination>/manifest.parquet`` (written atomically)."""
    location = Location(destination, storage_options or {})
    tables = [t for t in (manifest.read_table(part_location(location, sid)) for sid in shard_ids) if t is not None]
    table = manifest.combine(tables)
    target = location.child(MANIFEST_NAME)
    manifest.write_table(target, table)
    return {"manifest_uri": target.url, "rows": table.num_rows, "shards_with_parts": len(tables),
            "counts": manifest.counts(table)}


RUN_RECORD = f"{PARTS_FOLDER}/run.json"


@task(name="record-run", retries=3, retry_delay_seconds=1)
def record_run(destination: str, parameters: dict, storage_options: dict | None = None) -> None:
    """Remember the parameters of the last run into ``destination`` (without storage options)."""
    write_bytes(Location(destination, storage_options or {}).child(RUN_RECORD),
                (json.dumps(parameters, indent=2) + "\n").encode())


def recorded_run(destination: str, storage_options: dict | None = None) -> dict:
    try:
        return json.loads(read_bytes(Location(destination, storage_options or {}).child(RUN_RECORD)))
    except FileNotFoundError:
        raise ValueError(f"{destination} has no record of a stylize-bucket run ({RUN_RECORD} not found)") from None

