"""The whole job in one run: ingest photos, prime (cached), train the given styles, stylise a bucket with them.

    train-style (priming cached) -> stylize-bucket with every new model
"""

from __future__ import annotations

from prefect import flow

from flows.stylize_bucket import stylize_bucket
from flows.train_style import train_style
from tasks.secrets import StorageSecrets, hide_options


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
    shard_size: int = 256,
    output_format: str = "jpeg",
) -> dict:
    """Train a model per style on ``photos``, then stylise every image under ``source`` into ``destination``."""
    storage_options = hide_options(storage_options)
    models = train_style(styles, photos, model_store, names=names, preset=preset, steps=steps,
                         prime_steps=prime_steps, image_size=image_size, vgg_weights=vgg_weights,
                         storage_options=storage_options)
    summary = stylize_bucket(source, destination, models, storage_options=storage_options,
                             shard_size=shard_size, output_format=output_format)
    return {"models": models, **summary}
