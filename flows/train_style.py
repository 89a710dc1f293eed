"""Training: prime once (cached), then train one model per style image from the primed weights.

    prime the autoencoder on the photos (cached) -> train each style (one GPU slot each) -> model URLs
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import PurePosixPath
from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from stylecore.losses import LossConfig
from stylecore.model import UNetConfig
from stylecore.store import check_new_model_name
from stylecore.train import PRESETS, with_overrides
from tasks.models import model_exists
from tasks.training_tasks import check_style_images, ensure_gpu_limit, primed_checkpoint, train_style_task
from tasks.secrets import StorageSecrets, hide_options, redact, reveal_options
from tasks.storage import Location, check_bucket_exists, masked_errors


# Checked before the run starts (and shown in a deployment's form): NaN or a negative weight trained a model of NaNs
LossWeight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def training_plan(preset: str, steps: int | None, prime_steps: int | None, image_size: int | None,
                  batch_size: int | None) -> tuple[dict, dict, int]:
    """Priming and style TrainConfigs (as dicts) and the style size, from a preset plus overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    prime = with_overrides(chosen.prime, steps=prime_steps, image_size=image_size, batch_size=batch_size)
    style = with_overrides(chosen.style, steps=steps, image_size=image_size, batch_size=batch_size)
    return prime.to_dict(), style.to_dict(), chosen.style_size


@flow(name="train-style")
def train_style(
    styles: list[str],
    photos: str,
    model_store: str,
    names: list[str] | None = None,
    preset: str = "fast",
    steps: int | None = None,
    prime_steps: int | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    style_size: int | None = None,
    style_weight: LossWeight | None = None,
    content_weight: LossWeight | None = None,
    tv_weight: LossWeight | None = None,
    style_layers: list[str] | None = None,
    content_layer: str | None = None,
    vgg_weights: str | None = None,
    storage_options: StorageSecrets | dict | None = None,
    replace: bool = False,
) -> list[str]:
    """Train one style model per image in ``styles`` on the photos under ``photos``; returns the model URLs. A name
    that already has a model in the store is refused unless ``replace``."""
    storage_options = hide_options(storage_options)
    names = names or [PurePosixPath(style).stem for style in styles]
    if len(names) != len(styles):
        raise ValueError(f"{len(names)} names given for {len(styles)} styles")
    for name in names:
        check_new_model_name(name)
    if len(set(names)) != len(names):
        raise ValueError(f"two styles would be saved under one name: {names}")
    check_bucket_exists(Location(model_store, reveal_options(storage_options)), "model store")
    if not replace:
        with masked_errors("cannot read the model store", reveal_options(storage_options)):
            existing = [name for name in names if model_exists(name, model_store, storage_options)]
        if existing:
            raise ValueError(f"model {existing[0]!r} already exists in {redact(model_store)}; choose another name, "
                             "or replace it (replace=True; --force in the CLI)")
    prime_config, style_config, default_style_size = training_plan(preset, steps, prime_steps, image_size, batch_size)
    loss = LossConfig()
    for field, value in {"style_weight": style_weight, "content_weight": content_weight, "tv_weight": tv_weight,
                         "style_layers": style_layers, "content_layer": content_layer}.items():
        if value is not None:
            setattr(loss, field, value)
    check_style_images(styles, style_size or default_style_size, loss.style_layers, storage_options)
    ensure_gpu_limit()
    primed = primed_checkpoint(photos, model_store, UNetConfig().to_dict(), prime_config, storage_options)
    # One after another, in this thread: they would take turns on the device anyway, and Ctrl-C (or SIGTERM) reaches
    # this thread only, so a training in a task runner's thread would run to its end and save its model after it.
    states = [
        train_style_task(style, name, photos, primed, model_store, style_config, asdict(loss),
                         style_size or default_style_size, vgg_weights, storage_options, preset, replace,
                         return_state=True)
        for style, name in zip(styles, names)
    ]
    models = [state.result() for state in states]  # every style tried; the first failure raised
    get_run_logger().info("trained %d style models: %s", len(models),
                          ", ".join(redact(model, reveal_options(storage_options)) for model in models))
    return models


@flow(name="prime-autoencoder")
def prime_photos(
    photos: str,
    model_store: str,
    preset: str = "fast",
    steps: int | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    storage_options: StorageSecrets | dict | None = None,
) -> str:
    """Prime the UNet as an autoencoder on ``photos`` (cached); returns the primed checkpoint's URL."""
    storage_options = hide_options(storage_options)
    prime_config, _, _ = training_plan(preset, None, steps, image_size, batch_size)
    check_bucket_exists(Location(model_store, reveal_options(storage_options)), "model store")
    ensure_gpu_limit()
    return primed_checkpoint(photos, model_store, UNetConfig().to_dict(), prime_config, storage_options)
