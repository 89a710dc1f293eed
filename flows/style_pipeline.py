"""The whole job in one run: ingest photos, prime (cached), train the given styles, stylise a bucket with them.

    train-style (priming cached) -> stylize-bucket with every new model
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.stylize_bucket import OutputFormat, stylize_bucket
from flows.train_style import train_style
from tasks.secrets import StorageSecrets, hide_options, reveal_options
from tasks.storage import Location, check_bucket_exists


@flow(name="style-pipeline")
def style_pipeline(
    styles: list[str],
    photos: str,
    model_store: str,
    source: str,
    destination: str,
    names: list[str] | None = None,
    preset: str = "fast",
    steps: int | None = None,
    prime_steps: int | None = None,
    image_size: int | None = None,
    vgg_weights: str | None = None,
    storage_options: StorageSecrets | dict | None = None,
    shard_size: Annotated[int, Field(ge=1, le=1_000_000)] = 256,
    output_format: OutputFormat = "jpeg",
    replace: bool = False,
) -> dict:
    """Train a model per style on ``photos``, then stylise every image under ``source`` into ``destination``. A name
    that already has a model in the store is refused unless ``replace`` (so a run that failed after training some
    styles is run again with ``replace=True``)."""
    storage_options = hide_options(storage_options)
    check_bucket_exists(Location(destination, reveal_options(storage_options)), "destination")  # before any training
    models = train_style(styles, photos, model_store, names=names, preset=preset, steps=steps,
                         prime_steps=prime_steps, image_size=image_size, vgg_weights=vgg_weights,
                         storage_options=storage_options, replace=replace)
    summary = stylize_bucket(source, destination, models, storage_options=storage_options,
                             shard_size=shard_size, output_format=output_format)
    return {"models": models, **summary}
