"""Prefect tasks for training: cached autoencoder priming and per-style training, reading photos and style
images from any fsspec URL and writing checkpoints to a model store URL.

Priming is cached by Prefect (persisted result = the primed checkpoint's URL) under a key made of the photo
set's listing (keys, sizes and etags/mtimes), the architecture and the training settings, so a new run with
the same inputs, in any process, does not train again. The checkpoint's own location is derived from the
same key, so even without Prefect's cache an existing priming is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from stylecore.checkpoint import CheckpointError, model_from_bytes, weights_file_of
from stylecore.images import ImageDecodeError, decode_image
from stylecore.losses import LossConfig, layers_needed
from stylecore.model import UNetConfig
from stylecore.recipes import photos_fingerprint, priming_key, run_priming, run_style_training
from stylecore.train import TrainConfig
from stylecore.vgg import WEIGHTS_VARIABLE, VGGFeatures, load_vgg, style_image_problem

from .models import default_device, is_complete, load_model_from, model_exists, read_model_metadata, save_model_to
from .secrets import StorageSecrets, redact, reveal_options
from .storage import IMAGE_EXTENSIONS, Location, list_files, masking_errors, read_bytes

GPU_LIMIT = "stylize-gpu"


def listing_fingerprint(photos: Location) -> str:
    return photos_fingerprint([(key, f"{size}:{tag}") for key, size, tag, problem in list_files(photos, IMAGE_EXTENSIONS) if problem is None])


def read_photo_set(photos: Location) -> list[Image.Image]:
    """Decode every image under ``photos``; undecodable files are logged and left out."""
    logger = get_run_logger()
    keys = [entry.key for entry in list_files(photos, IMAGE_EXTENSIONS) if entry.problem is None]

    def load(key: str) -> Image.Image | None:
        try:
            return decode_image(read_bytes(photos.child(key)))
        except ImageDecodeError as error:
            logger.warning("skipping %s: %s", photos.child(key).display, error)
            return None

    with ThreadPoolExecutor(8) as pool:
        images = [image for image in pool.map(load, keys) if image is not None]
    if not images:
        raise ValueError(f"no readable images under {photos.display}")
    return images


def _priming_key(parameters: dict) -> str:
    photos = Location(parameters["photos"], reveal_options(parameters.get("storage_options")))
    return priming_key(listing_fingerprint(photos), UNetConfig(**parameters["model_config"]),
                       TrainConfig(**parameters["train_config"]), None)


def priming_cache_key(context: TaskRunContext, parameters: dict) -> str:
    # the store's URL hashed: it may carry credentials, and the key becomes a file name under PREFECT_HOME
    store = hashlib.sha256(parameters["model_store"].encode()).hexdigest()[:16]
    return f"stylize-prime-{_priming_key(parameters)}-{store}"


def primed_checkpoint(photos: str, model_store: str, model_config: dict, train_config: dict,
                      storage_options: StorageSecrets | dict | None = None, return_state: bool = False):
    """Run the cached priming task, refreshing its cache when the checkpoint a cached result would point to
    is gone from the model store (deleted, or never finished)."""
    parameters = {"photos": photos, "model_store": model_store, "model_config": model_config,
                  "train_config": train_config, "storage_options": storage_options}
    task_ = prime_autoencoder_task.with_options(refresh_cache=priming_is_missing(parameters))
    return task_(photos, model_store, model_config, train_config, storage_options, return_state=return_state)


def priming_is_missing(parameters: dict) -> bool:
    """Whether the primed checkpoint for these priming-task parameters is absent from the model store, or
    damaged (a cache can always be made again)."""
    store = Location(parameters["model_store"], reveal_options(parameters.get("storage_options")))
    return not is_usable(store.child(f"primed/{_priming_key(parameters)}"))


def is_usable(target: Location) -> bool:
    """Whether a complete checkpoint is at ``target`` and its weights match their checksum."""
    if not is_complete(target):
        return False
    try:  # read afresh, not through load_model_from's cache of this process
        metadata = read_model_metadata(target)
        model_from_bytes(read_bytes(target.child(weights_file_of(metadata))), metadata, where=target.display)
    except CheckpointError:
        return False
    return True


@task(name="prime-autoencoder", cache_key_fn=priming_cache_key, persist_result=True, result_serializer="json")
@masking_errors
def prime_autoencoder_task(photos: str, model_store: str, model_config: dict, train_config: dict,
                           storage_options: StorageSecrets | dict | None = None) -> str:
    """Prime the UNet as an autoencoder on the photos; returns the primed checkpoint's URL."""
    logger = get_run_logger()
    options = reveal_options(storage_options)
    key = _priming_key({"photos": photos, "model_config": model_config, "train_config": train_config,
                        "storage_options": options})
    target = Location(model_store, options).child(f"primed/{key}")
    if is_usable(target):
        logger.info("reusing primed checkpoint %s", target.display)
        return target.url
    if is_complete(target):
        logger.warning("the primed checkpoint %s is damaged; priming again", target.display)
    images = read_photo_set(Location(photos, options))
    config = TrainConfig(**train_config)
    logger.info("priming on %d photos (%d steps at %d px)", len(images), config.total_steps(len(images)),
                config.image_size)
    with gpu_slot():
        model, metadata = run_priming(images, listing_fingerprint(Location(photos, options)),
                                      UNetConfig(**model_config), config, default_device())
    save_model_to(target, model, metadata)
    logger.info("primed in %.1fs: %s", metadata["training_seconds"], target.display)
    return target.url


@task(name="check-style-images", cache_policy=NO_CACHE)
@masking_errors
def check_style_images(styles: list[str], style_size: int, style_layers: list[str] | None,
                       storage_options: StorageSecrets | dict | None = None) -> None:
    """Refuse a style image that cannot be read, or that VGG's pooling would shrink to nothing at
    ``style_size``, in one sentence, before any priming."""
    options = reveal_options(storage_options)
    for style in styles:
        location = Location(style, options)
        try:
            image = decode_image(read_bytes(location))
        except FileNotFoundError:
            raise ValueError(f"style image not found: {location.display}") from None
        except (IsADirectoryError, NotADirectoryError):
            raise ValueError(f"style image {location.display} is a folder, not an image file") from None
        except ImageDecodeError as error:
            raise ValueError(f"style image {location.display} is not a readable image: {error}") from None
        problem = style_image_problem(*image.size, style_size, style_layers)
        if problem:
            raise ValueError(f"style image {location.display} {problem}")


@task(name="train-style", task_run_name="train-style-{name}", cache_policy=NO_CACHE)
@masking_errors
def train_style_task(style: str, name: str, photos: str, primed: str, model_store: str, train_config: dict,
                     loss_config: dict, style_size: int, vgg_weights: str | None = None,
                     storage_options: StorageSecrets | dict | None = None, preset: str = "custom",
                     replace: bool = True) -> str:
    """Train one style from the primed checkpoint; writes ``<model_store>/models/<name>`` and returns its URL. Unless
    ``replace``, a model another training saved under that name meanwhile is left alone (this one fails)."""
    logger = get_run_logger()
    options = reveal_options(storage_options)

    def check_still_free() -> None:  # the flow checked at its start; two trainings of one new name both pass that
        if not replace and model_exists(name, model_store, storage_options):
            raise ValueError(f"model {name!r} was saved in {redact(model_store, options)} by another training while "
                             "this one ran; this one was not saved: choose another name, or replace it")

    style_location = Location(style, options)
    style_bytes = read_bytes(style_location)
    style_image = decode_image(style_bytes)
    images = read_photo_set(Location(photos, options))
    primed_model, primed_metadata = load_model_from(Location(primed, options))
    losses = LossConfig(**loss_config)
    vgg = _load_vgg(vgg_weights, losses, options)
    config = TrainConfig(**train_config)
    logger.info("training %r on %d photos (%d steps at %d px)", name, len(images), config.total_steps(len(images)),
                config.image_size)
    with gpu_slot():
        check_still_free()  # a training of the same name may have held the slot
        model, metadata, used_style = run_style_training(
            name, images, listing_fingerprint(Location(photos, options)), style_image, style_location.display,
            hashlib.sha256(style_bytes).hexdigest(), style_size, primed_model,
            {"uri": Location(primed, options).display, "weights_sha256": primed_metadata.get("weights_sha256")},
            vgg, losses, config, default_device(), preset,
        )
    check_still_free()
    target = Location(model_store, options).child(f"models/{name}")
    buffer = io.BytesIO()
    used_style.save(buffer, "JPEG", quality=95)
    save_model_to(target, model, metadata, style_jpeg=buffer.getvalue())
    logger.info("trained %r in %.1fs: %s", name, metadata["training_seconds"], metadata["final_losses"])
    return target.url


def _load_vgg(weights: str | None, losses: LossConfig, options: dict) -> VGGFeatures:
    """VGG features from ``weights`` (a path or URL), else $STYLIZE_VGG_WEIGHTS, else torchvision's ImageNet VGG."""
    weights = weights or os.environ.get(WEIGHTS_VARIABLE) or None
    path = None
    if weights is not None:
        location = Location(weights, options)
        fs, local = location.filesystem()
        if isinstance(fs, LocalFileSystem):
            path = Path(local)
        else:  # fetch a remote weights file (and its JSON description) into a temporary folder
            folder = Path(tempfile.mkdtemp(prefix="stylize-vgg-"))
            path = folder / Path(local).name
            path.write_bytes(read_bytes(location))
            description = Location(weights.rsplit(".", 1)[0] + ".json", options)
            try:
                path.with_suffix(".json").write_bytes(read_bytes(description))
            except FileNotFoundError:
                pass
    features, source = load_vgg(path)
    return VGGFeatures(features, source, layers_needed(source, losses))


@contextlib.contextmanager
def gpu_slot(wait_report_seconds: float = 60) -> Iterator[None]:
    """A slot of the stylize-gpu limit while a training runs, so the trainings of a served deployment take the GPU
    in turn; a wait is reported every ``wait_report_seconds``. Not on the temporary server a run without
    PREFECT_API_URL starts: it reclaims no slot of a run killed outright (its leases die with it, their count stays
    in PREFECT_HOME's database), and one `kill -9` would leave every later training waiting for good."""
    if PREFECT_API_URL.value() is None:
        yield
        return
    waited = 0.0
    with contextlib.ExitStack() as held:
        while True:
            try:
                held.enter_context(concurrency(GPU_LIMIT, occupy=1, timeout_seconds=wait_report_seconds))
                break
            except TimeoutError:
                waited += wait_report_seconds
                get_run_logger().warning(
                    "waiting %.0f s for the GPU: another training holds the %s slot (if none is running, a killed "
                    "one may: `prefect gcl update %s --active-slots 0` frees it)", waited, GPU_LIMIT, GPU_LIMIT)
        yield


def ensure_gpu_limit(limit: int = 1) -> None:
    """Create the global concurrency limit that training tasks take a slot of, if it does not exist yet."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=limit))

