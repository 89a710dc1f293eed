"""The ``stylize`` command line: prime, train, run, eval, models, demo.

User mistakes (missing folders, unreadable images, bad options, missing VGG weights) print one line
``stylize: error: ...`` and exit with status 2; a destination another run is writing to exits with 75 (try again
later). Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from tqdm import tqdm

from stylecore import images as image_io
from stylecore.checkpoint import (
    WEIGHTS_FILE_NAME, CheckpointError, check_style_model, load_model, read_metadata, save_model, style_file_of,
)
from stylecore.engine import MAX_OUTPUT_SIDE
from stylecore.evaluate import contact_sheet, evaluate
from stylecore.losses import LossConfig, PerceptualLoss, StyleTarget, layers_needed, resolve_layers
from stylecore.model import NORMS, UNet, UNetConfig
from stylecore.recipes import content_term, photos_fingerprint, priming_key, run_priming, run_style_training
from stylecore.store import HOME_VARIABLE, ModelStore, check_new_model_name, default_home
from stylecore.stylize import stylize_batch
from stylecore.train import PRESETS, Preset, TrainConfig, TrainingDiverged, with_overrides
from stylecore.vgg import WEIGHTS_VARIABLE, VGGFeatures, VGGWeightsError, load_vgg, style_image_problem
from tasks import manifest
from tasks.bucket import (
    AUTO_WORKERS_MIN_IMAGES, DEFAULT_MAX_IMAGE_BYTES, MANIFEST_NAME, SAME_FORMAT, ShardOptions, check_apart,
    run_shards,
)
from tasks.lease import DestinationBusy, DestinationLease
from tasks.models import DEVICE_VARIABLE, model_exists, model_location, read_model_metadata
from tasks.secrets import hide_options, redact
from tasks.storage import Location, MissingBucket, StorageError, check_bucket_exists, list_files, read_bytes
from tasks.workers import WorkerDied

EXIT_BUSY = 75  # sysexits.h EX_TEMPFAIL: another run holds the destination; try again later


class UserError(Exception):
    """A mistake the user can fix; reported as one line with exit status 2."""


# ---------------------------------------------------------------- helpers: inputs


def list_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension), sorted by relative path."""
    if not folder.exists():
        raise UserError(f"photo folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}")
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for path in folder.rglob("*"):
        if path.suffix.lower() in image_io.INPUT_EXTENSIONS and path.is_file():
            if exclude is not None and path.resolve().is_relative_to(exclude):
                continue
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_photos(folder: Path, limit: int | None, quiet: bool) -> tuple[list[Image.Image], str]:
    """Decode the photos under ``folder`` (skipping undecodable ones, with a warning) and fingerprint the set."""
    paths = list_images(folder)
    if limit is not None:
        paths = paths[:limit]
    photos, items = [], []
    for path in tqdm(paths, desc="reading photos", unit="img", disable=quiet or not sys.stderr.isatty(), leave=False):
        try:
            data = path.read_bytes()
            photos.append(image_io.decode_image(data))
        except (image_io.ImageDecodeError, OSError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            print(f"stylize: warning: skipping {path}: {reason}", file=sys.stderr)
            continue
        items.append((path.relative_to(folder).as_posix(), data))
    if not photos:
        raise UserError(f"no readable images in {folder}")
    return photos, photos_fingerprint(items)


def read_style_image(path: Path) -> tuple[Image.Image, str]:
    if not path.is_file():
        raise UserError(f"style image not found: {path}")
    try:
        data = path.read_bytes()
        image = image_io.decode_image(data)
    except OSError as error:
        raise UserError(f"cannot read style image {path}: {error.strerror or error}") from None
    except image_io.ImageDecodeError as error:
        raise UserError(f"cannot read style image {path}: {error}") from None
    width, height = image.size
    if max(width, height) > MAX_STYLE_ASPECT * min(width, height):  # VGG's pooling would leave nothing of it
        raise UserError(f"style image {path} is {width}x{height}: at most {MAX_STYLE_ASPECT} times longer than wide")
    return image, hashlib.sha256(data).hexdigest()


MAX_STYLE_ASPECT = 8


def is_url(text: str | None) -> bool:
    return text is not None and "://" in str(text)


def storage_options_from(args: argparse.Namespace) -> dict:
    options = {}
    for item in getattr(args, "storage_option", None) or []:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise UserError(f"--storage-option must look like KEY=VALUE, not {item!r}")
        options[key.strip()] = value
    return options


def checked_location(url: str, options: dict, what: str, must_exist: bool = True, folder: bool = False) -> Location:
    """A URL the flows will use, checked here first, so that a mistake in it is one line (exit 2), not a flow run
    that fails after Prefect's start-up with a traceback. A ``folder`` must not be a file."""
    location = Location(url, options)
    try:
        with quiet_storage_logs():
            fs, path = location.filesystem()
            if must_exist and not fs.exists(path):
                raise UserError(f"{what} not found: {location.display}")
            if not must_exist:
                check_bucket_exists(location, what)
            if folder and kind_at(fs, path) == "file":  # not fs.isfile: that says False for a store refusing to tell
                raise UserError(f"the {what} {location.display} is a file, not a folder")
    except UserError:
        raise
    except MissingBucket as error:
        raise UserError(str(error)) from None
    except (ValueError, ImportError) as error:  # an unknown protocol, a malformed URL
        raise UserError(f"{what} {location.display}: {error}") from None
    except Exception as error:  # OSError, or a store's own (gcsfs's HttpError for credentials it refuses)
        raise UserError(f"cannot reach the {what} {location.display}: {redact(error, options)}") from None
    return location


def kind_at(fs: Any, path: str) -> str | None:
    """"file", "directory" or None (nothing there); a store's failure to answer raises."""
    try:
        return fs.info(path).get("type")
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def checking_storage(action: str, options: dict) -> Iterator[None]:
    """The storage reads of the checks before a flow starts: one that fails (a store refusing the credentials, a
    storage error) is one line, credentials masked; what the checks themselves raise passes unchanged."""
    try:
        with quiet_storage_logs():
            yield
    except (UserError, CheckpointError, DestinationBusy, image_io.ImageDecodeError, IsADirectoryError):
        raise
    except StorageError as error:
        raise UserError(str(error)) from None
    except Exception as error:  # OSError, or a store's own (gcsfs's HttpError for credentials it refuses)
        raise UserError(f"cannot {action}: {type(error).__name__}: {redact(error, options)}") from None


@contextlib.contextmanager
def quiet_storage_logs() -> Iterator[None]:
    """gcsfs logs a traceback at ERROR for a request it gives up on, before raising; here the error is one line."""
    logger = logging.getLogger("gcsfs")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def start_temporary_server() -> None:
    """Start Prefect's temporary server for this process's flows, where PREFECT_API_URL names no server, deaf to
    Ctrl-C. A terminal's Ctrl-C reaches every process of the command, the server Prefect starts too: with the server
    gone, the interrupted flow run could not record its end, and the command printed connection errors for a minute
    or more before it exited. This process stops the server when it exits, as Prefect's own start does."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    server, failures = SubprocessASGIServer(), []  # the one Prefect's clients use when no API URL is set

    def start() -> None:
        # a thread's blocked signals are its children's: the server never sees SIGINT, this process still does
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            server.start()
        except BaseException as error:
            failures.append(error)

    starter = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    starter.start()
    try:
        while starter.is_alive():
            starter.join(0.1)
    except KeyboardInterrupt:  # while it starts: stop it here, since it would not stop with the others
        while starter.is_alive() and server.server_process is None:
            time.sleep(0.01)
        server.stop()
        raise
    if failures:
        raise failures[0]


@contextlib.contextmanager
def flow_device(args: argparse.Namespace) -> Iterator[None]:
    """``--device`` for the flows run in this process (their tasks read it from $STYLIZE_DEVICE), and the Prefect
    server they report to."""
    pick_device(args.device)  # refuses cuda without a GPU
    start_temporary_server()
    if args.device == "auto":
        yield
        return
    previous = os.environ.get(DEVICE_VARIABLE)
    os.environ[DEVICE_VARIABLE] = args.device
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DEVICE_VARIABLE, None)
        else:
            os.environ[DEVICE_VARIABLE] = previous


def model_store_for(args: argparse.Namespace) -> str:
    return str(getattr(args, "model_store", None) or args.home)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def pick_preset(args: argparse.Namespace, device: torch.device) -> tuple[str, Preset]:
    name = args.preset if args.preset != "auto" else ("full" if device.type == "cuda" else "fast")
    return name, PRESETS[name]


def vgg_weights_path(args: argparse.Namespace) -> str | None:
    return args.vgg_weights or os.environ.get(WEIGHTS_VARIABLE) or None


def load_vgg_source(args: argparse.Namespace):
    """VGG features and their description, from --vgg-weights, $STYLIZE_VGG_WEIGHTS or torchvision."""
    weights = vgg_weights_path(args)
    try:
        return load_vgg(weights, args.vgg_arch)
    except VGGWeightsError as error:
        if weights is None:
            raise UserError(f"no VGG weights: {error}; pass --vgg-weights PATH or set {WEIGHTS_VARIABLE}") from None
        raise UserError(str(error)) from None


def load_vgg_for(args: argparse.Namespace, loss_config: LossConfig) -> VGGFeatures:
    features, source = load_vgg_source(args)
    try:
        return VGGFeatures(features, source, layers_needed(source, loss_config))
    except VGGWeightsError as error:
        raise UserError(str(error)) from None


def loss_config_from(args: argparse.Namespace) -> LossConfig:
    config = LossConfig()
    for field in ("style_weight", "content_weight", "tv_weight", "content_layer"):
        value = getattr(args, field, None)
        if value is not None:
            setattr(config, field, value)
    if getattr(args, "style_layers", None):
        config.style_layers = [layer.strip() for layer in args.style_layers.split(",") if layer.strip()]
    return config


def model_config_from(args: argparse.Namespace, base: UNetConfig | None = None) -> UNetConfig:
    base = base or UNetConfig()
    values = asdict(base)
    for field in ("base_channels", "depth", "norm"):
        if getattr(args, field, None) is not None:
            values[field] = getattr(args, field)
    try:
        return UNetConfig(**values)
    except ValueError as error:
        raise UserError(str(error)) from None


def train_config_from(base: TrainConfig, args: argparse.Namespace, prefix: str = "") -> TrainConfig:
    try:
        return with_overrides(
            base,
            steps=getattr(args, f"{prefix}steps", None),
            epochs=getattr(args, f"{prefix}epochs", None),
            image_size=getattr(args, "image_size", None),
            batch_size=getattr(args, "batch_size", None),
            learning_rate=getattr(args, f"{prefix}lr", None),
            seed=getattr(args, "seed", None),
            checkpoint_every=getattr(args, "checkpoint_every", None),
        )
    except ValueError as error:
        raise UserError(str(error)) from None


def bar(total: int, description: str, quiet: bool, unit: str, initial: int = 0) -> tqdm:
    """A progress bar on stderr; on a non-terminal (logs) it updates every 10 s instead of 10 times a second."""
    return tqdm(total=total, initial=initial, desc=description, unit=unit, disable=quiet,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)


def progress(description: str, quiet: bool, keys: tuple[str, ...]):
    bars: dict[str, tqdm] = {}

    def on_step(step: int, total: int, losses: dict[str, float]) -> None:
        if "bar" not in bars:
            bars["bar"] = bar(total, description, quiet, "step", initial=step - 1)
        bars["bar"].set_postfix({k: f"{losses[k]:.4f}" for k in keys if k in losses}, refresh=False)
        bars["bar"].update(1)
        if step == total:
            bars["bar"].close()

    return on_step


# ---------------------------------------------------------------- priming


def obtain_primed(
    args: argparse.Namespace,
    store: ModelStore,
    photos: list[Image.Image],
    fingerprint: str,
    model_config: UNetConfig,
    prime_config: TrainConfig,
    device: torch.device,
    out: Path | None = None,
    content_vgg: VGGFeatures | None = None,
    content_weight: float = 0.0,
) -> tuple[UNet, dict, Path]:
    """The primed UNet for these photos and configs: from the cache if it is there, trained otherwise."""
    key = priming_key(fingerprint, model_config, prime_config, content_term(content_vgg, content_weight))
    cached = store.primed_dir(key)
    model = None
    if (cached / "model.json").is_file():
        try:
            model, metadata = load_model(cached, expected=model_config)
            print(f"priming: reusing cached autoencoder {cached}", file=sys.stderr)
        except CheckpointError as error:  # a cache can always be made again: set the damaged one aside
            aside = cached.with_name(f".{cached.name}.damaged-{os.getpid()}")
            cached.rename(aside)
            print(f"stylize: warning: the cached autoencoder is damaged ({error}); moved to {aside}, priming again",
                  file=sys.stderr)
    if model is None:
        print(f"priming: training the autoencoder on {len(photos)} photos "
              f"({prime_config.total_steps(len(photos))} steps at {prime_config.image_size}px)", file=sys.stderr)
        model, metadata = run_priming(
            photos, fingerprint, model_config, prime_config, device, content_vgg, content_weight,
            on_step=progress("priming", args.quiet, ("reconstruction",)), state_dir=store.run_dir("prime", key),
        )
        save_model(cached, model, metadata)
        metadata = read_metadata(cached)
        shutil.rmtree(store.run_dir("prime", key), ignore_errors=True)
        print(f"priming: done in {metadata['training_seconds']:.1f}s, "
              f"reconstruction L1 {metadata['final_reconstruction_l1']:.4f}", file=sys.stderr)
    if out is not None and out.resolve() != cached.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for file in ("model.safetensors", "model.json"):
            shutil.copyfile(cached / file, out / file)
    return model, metadata, cached


# ---------------------------------------------------------------- commands


# Options the training flows (which URLs run) do not take: refused there rather than silently ignored.
FLOW_LESS_OPTIONS = {"epochs": "--epochs", "lr": "--lr", "seed": "--seed", "limit": "--limit",
                     "checkpoint_every": "--checkpoint-every", "base_channels": "--base-channels", "depth": "--depth",
                     "norm": "--norm", "primed": "--primed", "out": "--out"}


def refuse_flow_less_options(args: argparse.Namespace, *extra: str) -> None:
    given = [flag for name, flag in FLOW_LESS_OPTIONS.items() if getattr(args, name, None) is not None]
    given += [f"--{name.replace('_', '-')}" for name in extra if getattr(args, name, None)]
    if getattr(args, "vgg_arch", "vgg16") != "vgg16":  # the flows load a weights file or torchvision's vgg16
        given.append("--vgg-arch")
    if given:
        raise UserError(f"{', '.join(given)} {'works' if len(given) == 1 else 'work'} only with local folders: "
                        "with URLs the Prefect flows train with the preset's values; leave "
                        f"{'it' if len(given) == 1 else 'them'} out, or use local copies of the images")


# Training through the flows keeps no resumable state (the local route checkpoints its runs); a finished priming is
# kept, in the model store's cache.
FLOW_TRAINING_INTERRUPTED = ("training on URLs keeps no state: the same command starts it again (a finished priming "
                             "is reused)")


def checked_photos_and_store(args: argparse.Namespace, options: dict) -> Location:
    """The photo folder (holding at least one image file) and the model store of a training through the flows,
    checked before Prefect starts: found out in the flow, a mistake was a failed flow run, logged with its traceback
    (after a priming, for a store that cannot be one). Returns the model store."""
    photos = checked_location(args.photos, options, "photo folder", folder=True)
    with checking_storage(f"read the photo folder {photos.display}", options):
        keys = [entry.key for entry in list_files(photos) if entry.problem is None]
        if not keys:
            raise UserError(f"no images under {photos.display} (looked for {', '.join(image_io.INPUT_EXTENSIONS)})")
        first_problem = None
        for key in keys:  # up to the first that decodes: the flow's priming would find none only after its start
            try:
                image_io.decode_image(read_bytes(photos.child(key)))
                break
            except image_io.ImageDecodeError as error:
                first_problem = first_problem or f"{key}: {error}"
        else:
            raise UserError(f"no readable images under {photos.display}: none of its {len(keys)} image files "
                            f"decodes (first: {first_problem})")
    return checked_location(model_store_for(args), options, "model store", must_exist=False, folder=True)


def flow_training_failed(error: StorageError) -> int:
    print_error(f"{error}; run the same command again to retry (a finished priming is reused)")
    return 1


def cmd_prime(args: argparse.Namespace) -> int:
    if is_url(args.photos) or args.model_store:
        from flows.train_style import prime_photos

        refuse_flow_less_options(args, "content_weight", "content_layer")
        options = storage_options_from(args)
        checked_photos_and_store(args, options)
        device = pick_device(args.device)
        preset_name, _ = pick_preset(args, device)
        try:
            with flow_device(args):
                url = prime_photos(args.photos, model_store_for(args), preset_name, steps=args.steps,
                                   image_size=args.image_size, batch_size=args.batch_size,
                                   storage_options=hide_options(options))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(FLOW_TRAINING_INTERRUPTED) from None
        except ValueError as error:  # the flow refused its inputs (no readable photo, ...)
            raise UserError(str(error)) from None
        except StorageError as error:  # a task failed on storage; its message has credentials masked
            return flow_training_failed(error)
        print(f"primed checkpoint: {url}")
        return 0
    args.photos = Path(args.photos)
    check_output_folder(args.out, "--out")
    check_writable_home(args.home)
    device = pick_device(args.device)
    store = ModelStore(args.home)
    _, preset = pick_preset(args, device)
    prime_config = train_config_from(preset.prime, args)
    model_config = model_config_from(args)
    photos, fingerprint = read_photos(args.photos, args.limit, args.quiet)
    content_vgg = None
    if args.content_weight:
        features, source = load_vgg_source(args)
        try:
            content_vgg = VGGFeatures(features, source, [args.content_layer or source.default_layers()[1]])
        except VGGWeightsError as error:
            raise UserError(str(error)) from None
    _, _, cached = obtain_primed(args, store, photos, fingerprint, model_config, prime_config, device,
                                 args.out, content_vgg, args.content_weight)
    print(f"primed checkpoint: {args.out or cached}")
    return 0


def train_one_style(args: argparse.Namespace, style_path: Path, name: str, photos_dir: Path) -> Path:
    store = ModelStore(args.home)
    try:
        destination = store.model_dir(name)
    except ValueError as error:
        raise UserError(str(error)) from None
    with training_lock(store, name):
        if destination.exists() and not args.force:
            raise UserError(f"model {name!r} already exists at {destination}; use --force to replace it")
        return train_into(args, store, destination, style_path, name, photos_dir)


@contextlib.contextmanager
def training_lock(store: ModelStore, name: str) -> Iterator[None]:
    """This machine's one training of ``name`` at a time: two would share its resumable state, and the one that
    finished last would replace the other's model without --force."""
    path = store.run_dir("train", name).with_name(f".{name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another training of {name!r} is running on this machine (it holds {path}); wait for "
                            "it to finish, or choose another name") from None
        yield


def train_into(args: argparse.Namespace, store: ModelStore, destination: Path, style_path: Path, name: str,
               photos_dir: Path) -> Path:
    device = pick_device(args.device)
    preset_name, preset = pick_preset(args, device)
    style_size = args.style_size or preset.style_size
    style_image, style_sha256 = read_style_image(style_path)
    photos, fingerprint = read_photos(photos_dir, args.limit, args.quiet)
    loss_config = loss_config_from(args)
    vgg = load_vgg_for(args, loss_config)
    problem = style_image_problem(*style_image.size, style_size,
                                  loss_config.style_layers or vgg.source.default_layers()[0])
    if problem:
        raise UserError(f"style image {style_path} {problem}")

    if args.primed:
        if args.prime_steps is not None:
            print("stylize: warning: --prime-steps is not used: the primed model is given (--primed)", file=sys.stderr)
        primed_path = store.resolve(str(args.primed))
        primed, primed_metadata = load_model(primed_path)
        if any(getattr(args, f, None) is not None for f in ("base_channels", "depth", "norm")):
            wanted = model_config_from(args, primed.config)
            if wanted != primed.config:
                raise UserError(f"--primed {primed_path} has architecture {primed.config}, not {wanted}")
    else:
        prime_config = train_config_from(preset.prime, args, prefix="prime_")
        primed, primed_metadata, primed_path = obtain_primed(
            args, store, photos, fingerprint, model_config_from(args), prime_config, device
        )

    style_config = train_config_from(preset.style, args)
    run_dir = store.run_dir("train", name)
    total = style_config.total_steps(len(photos))
    print(f"training style {name!r} from {style_path} on {len(photos)} photos "
          f"({total} steps at {style_config.image_size}px, preset {preset_name}, device {device})", file=sys.stderr)
    model, metadata, used_style = run_style_training(
        name, photos, fingerprint, style_image, style_path.name, style_sha256, style_size, primed,
        {"path": str(primed_path), "weights_sha256": primed_metadata.get("weights_sha256")},
        vgg, loss_config, style_config, device, preset_name,
        on_step=progress(f"style {name}", args.quiet, ("style", "content")), state_dir=run_dir,
    )
    if metadata["resumed_from_step"]:
        print(f"resumed from step {metadata['resumed_from_step']}", file=sys.stderr)
    # Written beside it, then swapped in: an interrupt leaves the old model or the new one, never half of one.
    staging = destination.with_name(f".{destination.name}.partial-{uuid.uuid4().hex[:8]}")
    save_model(staging, model, metadata)
    used_style.save(staging / "style.jpg", "JPEG", quality=95)
    replaced = destination.with_name(f".{destination.name}.replaced-{uuid.uuid4().hex[:8]}")
    if destination.exists():
        destination.rename(replaced)
    staging.rename(destination)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    losses = metadata["final_losses"]
    print(f"trained in {metadata['training_seconds']:.1f}s: style {losses.get('style', float('nan')):.4f}, "
          f"content {losses.get('content', float('nan')):.4f}", file=sys.stderr)
    return destination


def cmd_train(args: argparse.Namespace) -> int:
    if is_url(args.style_image) or is_url(args.photos) or args.model_store:
        from flows.train_style import train_style

        refuse_flow_less_options(args)
        options = storage_options_from(args)
        try:
            check_new_model_name(args.name)
        except ValueError as error:
            raise UserError(str(error)) from None
        store = checked_photos_and_store(args, options)
        with checking_storage("read the model store", options):
            if not args.force and model_exists(args.name, store.url, options):
                raise UserError(f"model {args.name!r} already exists in {store.display}; use --force to replace it")
        style = checked_location(args.style_image, options, "style image")
        style_fs, style_path = style.filesystem()
        try:
            with checking_storage(f"read the style image {style.display}", options):
                style_image = image_io.decode_image(style_fs.cat_file(style_path))
        except image_io.ImageDecodeError as error:
            raise UserError(f"cannot read style image {style.display}: {error}") from None
        except IsADirectoryError:
            raise UserError(f"style image {style.display} is a folder") from None
        device = pick_device(args.device)
        preset_name, preset = pick_preset(args, device)
        loss = loss_config_from(args)
        problem = style_image_problem(*style_image.size, args.style_size or preset.style_size, loss.style_layers)
        if problem:
            raise UserError(f"style image {style.display} {problem}")
        weights = vgg_weights_path(args)
        if is_url(weights):
            checked_location(weights, options, "VGG weights")
        else:  # missing weights or an unknown layer now, not after the priming
            load_vgg_for(args, loss)
        try:
            with flow_device(args):
                [url] = train_style(
                    [args.style_image], args.photos, model_store_for(args), names=[args.name], preset=preset_name,
                    steps=args.steps, prime_steps=args.prime_steps, image_size=args.image_size,
                    batch_size=args.batch_size, style_size=args.style_size, style_weight=args.style_weight,
                    content_weight=args.content_weight, tv_weight=args.tv_weight, style_layers=loss.style_layers,
                    content_layer=args.content_layer, vgg_weights=weights,
                    storage_options=hide_options(options), replace=args.force,
                )
        except KeyboardInterrupt:
            raise KeyboardInterrupt(FLOW_TRAINING_INTERRUPTED) from None
        except ValueError as error:  # the flow refused its inputs (a name taken, an unknown layer, ...)
            raise UserError(str(error)) from None
        except StorageError as error:  # a task failed on storage; its message has credentials masked
            return flow_training_failed(error)
        print(f"model: {url}")
        return 0
    check_writable_home(args.home)
    destination = train_one_style(args, Path(args.style_image), args.name, Path(args.photos))
    print(f"model: {destination}")
    return 0


def load_style_model(store: ModelStore, name_or_path: str, device: torch.device) -> tuple[UNet, dict, Path]:
    path = store.resolve(name_or_path)
    model, metadata = load_model(path)
    check_style_model(metadata, str(path))
    return model.to(device).eval(), metadata, path


def shard_options_from(args: argparse.Namespace) -> ShardOptions:
    return ShardOptions(output_format=args.format.lower(), quality=args.quality, batch_size=args.batch_size or 0,
                        max_batch_pixels=args.max_batch_pixels or 0,
                        max_pixels=args.max_pixels, max_image_bytes=args.max_bytes, gpu_codec=not args.no_gpu_codec,
                        gpu_decode=args.gpu_decode, compile=args.compile, skip_existing=args.skip_existing,
                        journal_seconds=args.journal_seconds, workers=args.workers)


def cmd_run(args: argparse.Namespace) -> int:
    if args.format.lower() != SAME_FORMAT:
        try:
            image_io.output_format(args.format)
        except ValueError:
            raise UserError(f"unknown output format {args.format!r}; use jpeg, png, webp or same") from None
    if is_url(args.source) or is_url(args.destination) or is_url(args.model) or args.model_store:
        return run_bucket_flow(args)
    source, destination = Path(args.source), Path(args.destination)
    if not source.is_dir():
        raise UserError(f"source is a file, not a folder: {source}" if source.exists()
                        else f"source folder not found: {source}")
    if not os.access(source, os.R_OK | os.X_OK):
        raise UserError(f"source folder cannot be read (permission denied): {source}")
    if destination.exists() and not destination.is_dir():
        raise UserError(f"destination is a file, not a folder: {destination}")
    device = pick_device(args.device)
    # On the CPU here: run_shards puts it on the device, or worker processes do (then this one needs no GPU).
    model, metadata, path = load_style_model(ModelStore(args.home), args.model, torch.device("cpu"))
    name = metadata.get("name") or path.name
    started = time.perf_counter()
    progress_bar = bar(0, "stylizing", args.quiet, "img")
    try:
        summary = run_shards(Location(str(source.resolve())), Location(str(destination.resolve())), {name: model},
                             shard_options_from(args), args.shard_size, on_progress=progress_bar.update,
                             on_total=lambda total: setattr(progress_bar, "total", total), device=device)
    except DestinationBusy as error:
        print_error(str(error))
        return EXIT_BUSY
    except StorageError as error:
        raise UserError(str(error)) from None
    except WorkerDied as error:
        print_error(str(error))
        return 1
    except OSError as error:  # storage failed: full disk, read-only destination, no permission, I/O error
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print_error(f"storage failed: {error.strerror or error}{where}; fix it and run the same command again "
                    "(finished images are kept and skipped)")
        return 1
    finally:
        progress_bar.close()
    seconds = time.perf_counter() - started
    counts = summary["counts"]
    rate = summary["redone"] / seconds if seconds > 0 else 0.0
    processes = f" in {summary['workers']} processes" if summary["workers"] > 1 else ""
    print(f"{counts['ok']} written to {destination}, {counts['error']} not stylised (see the manifest's error "
          f"column), {counts['skipped']} already done; {seconds:.1f}s, {rate:.1f} img/s with {name}{processes}; "
          f"manifest: {summary['manifest_uri']}")
    warn_of_errors(Location(summary["manifest_uri"]))
    if not sum(counts.values()):
        print(f"stylize: warning: no images under {source} (looked for {', '.join(image_io.INPUT_EXTENSIONS)})",
              file=sys.stderr)
    return 0


def warn_of_errors(manifest_location: Location) -> None:
    """Name on stderr each input the manifest says was not stylised, with its reason."""
    table = manifest.read_table(manifest_location)
    for row in table.to_pylist() if table is not None else []:
        if row["status"] == "error":
            print(f"stylize: warning: not stylised: {row['input_uri']}: {row['error']}", file=sys.stderr)


def flow_error(state) -> BaseException | None:
    """The exception a failed flow run (called in this process) raised, where Prefect kept it."""
    try:
        result = state.result(raise_on_failure=False)
    except Exception:  # no result kept (a crash, a cancellation)
        return None
    return result if isinstance(result, BaseException) else None


def run_bucket_flow(args: argparse.Namespace) -> int:
    """Stylise a bucket with the stylize-bucket Prefect flow: manifest, skip-if-done, retried shards."""
    from flows.stylize_bucket import ShardsFailed, stylize_bucket

    model = args.model
    if not is_url(model) and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
        if Path(model).is_file() and not WEIGHTS_FILE_NAME.fullmatch(Path(model).name):
            raise UserError(f"{args.model} is a file: runs on URLs take a model by name or by its folder (the one "
                            "that holds model.json and model.safetensors)")
    options = storage_options_from(args)
    source = checked_location(args.source, options, "source", folder=True)
    destination = checked_location(args.destination, options, "destination", must_exist=False, folder=True)
    try:
        with checking_storage("read the model or the destination", options):
            check_apart(source, destination)
            location = model_location(model, model_store_for(args), options)
            check_style_model(read_model_metadata(location), location.display)
            # here, not only in the flow: there a busy destination is a failed flow run, logged with its traceback
            DestinationLease(destination).check_free()
    except DestinationBusy as error:
        print_error(str(error))
        return EXIT_BUSY
    with flow_device(args):
        state = stylize_bucket(
            args.source, args.destination, [model], model_store=model_store_for(args),
            storage_options=hide_options(options), shard_size=args.shard_size, batch_size=args.batch_size or 0,
            max_batch_pixels=args.max_batch_pixels or 0, output_format=args.format.lower(), quality=args.quality,
            max_pixels=args.max_pixels, max_image_bytes=args.max_bytes, retries=args.retries,
            gpu_codec=not args.no_gpu_codec, compile=args.compile, gpu_decode=args.gpu_decode,
            skip_existing=args.skip_existing, journal_seconds=args.journal_seconds, workers=args.workers, return_state=True,
        )
    if state.is_completed():
        print_flow_summary(state.result())
        warn_of_errors(destination.child(MANIFEST_NAME))
        return 0
    failure = flow_error(state)
    if isinstance(failure, DestinationBusy):
        print_error(str(failure))
        return EXIT_BUSY
    if isinstance(failure, ShardsFailed):
        if failure.summary:  # what the shards that did not fail made
            print_flow_summary(failure.summary)
        message = failure.reason
    else:
        message = (state.message or "the flow run failed").splitlines()[0]
    print_error(f"{message}; run the same command again to retry (only missing and failed images are redone)")
    return 1


def print_flow_summary(summary: dict) -> None:
    counts, shards = summary["counts"], summary["shards"]
    print(f"{counts['ok']} written, {counts['skipped']} already done, {counts['error']} not stylised (see the "
          f"manifest's error column) ({summary['images']} images, {shards} shard{'s' if shards != 1 else ''}, "
          f"{summary['images_per_second']} img/s); manifest: {summary['manifest_uri']}")


def check_writable_home(home: Path) -> None:
    """Refuse, before any training, a model store that cannot be written: its checkpoints are written after it."""
    try:
        for folder in ("models", "primed", "runs/prime", "runs/train"):  # a file where one goes fails after training
            (Path(home) / folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        raise UserError(f"the model store {home} cannot be written ({error.strerror or error}{where}); "
                        "choose another with --home or $STYLIZE_HOME") from None


def check_output_folder(folder: Path | None, option: str) -> None:
    """Refuse, before any work, an output folder that cannot be one."""
    if folder is None:
        return
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"{option} {folder}: {path} is a file, not a folder")
            return


def cmd_eval(args: argparse.Namespace) -> int:
    for what, value in (("--model", args.model), ("--photos", args.photos)):
        if is_url(value):  # a Path would have read gs://b/x as gs:/b/x, "not found"
            raise UserError(f"{what} {value}: eval works on local folders; copy the model's folder or the photos here "
                            "first (e.g. `gcloud storage cp -r URL .`)")
    args.photos = Path(args.photos)
    if args.sheet is not None:
        if args.sheet.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            raise UserError(f"--sheet {args.sheet}: name a .png, .jpg or .webp file")
        check_output_folder(args.sheet.parent, "--sheet")
    device = pick_device(args.device)
    store = ModelStore(args.home)
    model, metadata, path = load_style_model(store, args.model, device)
    evaluation, photos, _ = evaluate_model(args, model, metadata, path, args.photos, device)
    if args.sheet:  # first: a sheet that cannot be written is the command's one line, with nothing printed before
        write_contact_sheet(model, photos[: args.sheet_rows], args.sheet)
    if args.json:
        sheet = {"sheet": str(args.sheet)} if args.sheet else {}
        print(json.dumps({**evaluation.to_dict(), "model_path": str(path), **sheet}))
    else:
        print_evaluation(evaluation)
        if args.sheet:
            print(f"contact sheet: {args.sheet}")
    return 0


def trained_loss_and_size(metadata: dict, path: Path) -> tuple[LossConfig, int]:
    """The loss a model was trained with and its crop size, from its model.json: one edited by hand, or written by
    a version with other fields, is one line rather than a traceback."""
    try:
        loss_config = LossConfig.from_dict(metadata["loss"]) if "loss" in metadata else LossConfig()
        loss_config.style_layers = metadata.get("style_layers", loss_config.style_layers)
        loss_config.content_layer = metadata.get("content_layer", loss_config.content_layer)
        size = (metadata.get("train_config") or {}).get("image_size", 256)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"train_config's image_size is {size!r}")
    except (TypeError, AttributeError, ValueError) as error:
        raise UserError(f"the model at {path} has a model.json this version cannot read ({error}); train it again, "
                        "or give --image-size and mend its \"loss\" and \"train_config\"") from None
    return loss_config, size


def evaluate_model(args, model, metadata, path: Path, photos_dir: Path, device):
    loss_config, trained_size = trained_loss_and_size(metadata, path)
    vgg = load_vgg_for(args, loss_config)
    trained = metadata.get("vgg") if isinstance(metadata.get("vgg"), dict) else {}
    now = vgg.source.describe()
    if trained and (trained.get("arch") != now["arch"] or trained.get("sha256") != now["sha256"]):
        # torchvision's weights have no checksum here: a file's and torchvision's differ by that too
        print(f"stylize: warning: this model was trained with other VGG weights ({trained.get('origin') or '?'}, "
              f"{trained.get('arch') or '?'}) than these ({now['origin']}, {now['arch']}); its distances are "
              "comparable only with the same weights (--vgg-weights, --vgg-arch)", file=sys.stderr)
    style_file = (path if path.is_dir() else path.parent) / style_file_of(metadata, str(path))
    if not style_file.is_file():
        raise UserError(f"the model at {path} has no {style_file.name}, so its style distance cannot be measured")
    try:
        style_image = image_io.decode_image(style_file.read_bytes())
    except image_io.ImageDecodeError as error:
        raise UserError(f"the model's style image {style_file} cannot be read ({error}); its style distance "
                        "cannot be measured") from None
    style_layers, _ = resolve_layers(vgg.source, loss_config)
    target = StyleTarget.from_image(vgg, image_io.image_to_tensor(style_image).float().div(255), style_layers)
    loss = PerceptualLoss(vgg, loss_config, target)
    photos, _ = read_photos(photos_dir, args.limit, args.quiet)
    size = args.image_size or trained_size
    return evaluate(model, loss, photos, image_size=size, batch_size=args.batch_size or 8), photos, loss


def print_evaluation(evaluation) -> None:
    print(f"{evaluation.images} photos at {evaluation.image_size}px (lower is better)")
    print(f"{'':10}{'style distance':>16}{'content distance':>18}")
    print(f"{'model':10}{evaluation.model.style:>16.4f}{evaluation.model.content:>18.4f}")
    print(f"{'identity':10}{evaluation.identity.style:>16.4f}{evaluation.identity.content:>18.4f}")


def write_contact_sheet(model: UNet, photos: list[Image.Image], out: Path) -> None:
    """The photos beside their stylised versions, written beside ``out`` and then renamed onto it: a sheet that
    fails (too large for its format, an interrupt) leaves an earlier one as it was."""
    rows = []
    for photo in photos:
        small = image_io.resize_long_side(photo, 512)
        output = stylize_batch(model, image_io.image_to_tensor(small).unsqueeze(0))[0].cpu()
        rows.append([small, image_io.tensor_to_image(output)])
    sheet = contact_sheet(rows)
    fmt = image_io.output_format(out.suffix)  # the suffix was checked to be .png, .jpg, .jpeg or .webp
    if max(sheet.size) > MAX_OUTPUT_SIDE[fmt]:
        raise UserError(f"the contact sheet would be {sheet.width}x{sheet.height} px, more than {fmt} holds "
                        f"({MAX_OUTPUT_SIDE[fmt]:,} a side): choose fewer --sheet-rows or a .png sheet")
    temporary = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(temporary, fmt)
        os.replace(temporary, out)
    except OSError as error:
        raise UserError(f"cannot write the contact sheet {out}: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def cmd_models(args: argparse.Namespace) -> int:
    store = ModelStore(args.home)
    models = store.list()
    if args.json:
        # the name is the folder's (what --model takes); the metadata's own name, if it differs, is "trained_as"
        print(json.dumps([{"name": n, "path": str(store.models / n),
                           **{("trained_as" if k == "name" else k): v for k, v in m.items() if k != "history"}}
                          for n, m in models]))
        return 0
    if not models:
        print(f"no models in {store.models}")
        return 0
    print(f"{'name':24}{'style image':28}{'steps':>7}{'train s':>9}  {'vgg':28}created")
    for name, meta in models:
        if "error" in meta:
            print(f"{name:24}(unreadable: {meta['error']})")
            continue
        vgg = meta.get("vgg") if isinstance(meta.get("vgg"), dict) else {}
        vgg_text = f"{vgg.get('arch', '?')}..{vgg.get('deepest_layer', '?')}"
        steps, seconds = meta.get("steps"), meta.get("training_seconds")
        print(f"{name:24}{str(meta.get('style_image', '?')):28}"
              f"{steps if isinstance(steps, int) else '?':>7}"
              f"{format(seconds, '.0f') if isinstance(seconds, (int, float)) else '?':>9}  {vgg_text:28}"
              f"{meta.get('created_at', '?')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    assets = Path(str(resources.files("stylecore") / "assets"))
    photos_dir = args.photos or assets / "photos"
    style_path = args.style or assets / "style_swirls.jpg"
    check_output_folder(args.out, "--out")
    for name in ("contact_sheet.png", "evaluation.json"):
        if (args.out / name).is_dir():
            raise UserError(f"--out {args.out}: {args.out / name} is a folder; the demo writes a file there")
    check_writable_home(args.home)
    if photos_dir.is_dir() and args.out.resolve().is_relative_to(photos_dir.resolve()):
        raise UserError(f"--out {args.out} lies inside the photo folder {photos_dir}: its outputs would be taken "
                        "for photos on the next run; choose an output folder outside it")
    args.force = True
    args.primed = None
    destination = train_one_style(args, style_path, args.name, photos_dir)
    device = pick_device(args.device)
    model, metadata, path = load_style_model(ModelStore(args.home), str(destination), device)
    out = args.out
    stylized = out / "stylized"
    progress_bar = bar(0, "stylizing", args.quiet, "img")
    try:
        stylized_location = Location(str(stylized.resolve()))
        summary = run_shards(Location(str(photos_dir.resolve())), stylized_location,
                             {metadata.get("name", args.name): model}, ShardOptions(quality=92, batch_size=4),
                             on_progress=progress_bar.update,
                             on_total=lambda total: setattr(progress_bar, "total", total), limit=args.limit)
    except (StorageError, OSError) as error:
        raise UserError(f"cannot write the stylised photos into {stylized}: {error}") from None
    finally:
        progress_bar.close()
    warn_of_errors(stylized_location.child(MANIFEST_NAME))
    evaluation, photos, _ = evaluate_model(args, model, metadata, path, photos_dir, device)
    write_contact_sheet(model, photos[:6], out / "contact_sheet.png")
    try:
        (out / "evaluation.json").write_text(json.dumps(evaluation.to_dict(), indent=2) + "\n")
    except OSError as error:
        raise UserError(f"cannot write {out / 'evaluation.json'}: {error.strerror or error}") from None
    print_evaluation(evaluation)
    print(f"model:          {destination}")
    counts = summary["counts"]
    not_stylised = f", {counts['error']} not stylised (named above)" if counts["error"] else ""
    print(f"stylized:       {stylized} ({counts['ok'] + counts['skipped']} images{not_stylised}, "
          f"manifest {summary['manifest_uri']})")
    print(f"contact sheet:  {out / 'contact_sheet.png'}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


# ---------------------------------------------------------------- argument parsing


def checked(name: str, convert: Callable, accept: Callable, wanted: str) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, then refuse a value ``accept`` rejects, saying what was ``wanted``."""
    def parse(text: str):
        value = convert(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text}")
        return value

    parse.__name__ = name  # argparse names the type when the text does not convert at all
    return parse


positive_int = checked("positive_int", int, lambda value: value >= 1, "a positive integer")
quality = checked("quality", int, lambda value: 1 <= value <= 100, "between 1 and 100")
non_negative_float = checked("non_negative_float", float, lambda value: 0 <= value < math.inf,  # nan fails too
                             "a finite number, zero or more")
positive_float = checked("positive_float", float, lambda value: 0 < value < math.inf, "a finite number above zero")
epochs = checked("epochs", float, lambda value: 0 < value <= 1_000_000, "above 0 and at most 1,000,000")
seed = checked("seed", int, lambda value: 0 <= value < 2**63, "between 0 and 2**63 - 1")
image_side = checked("image_side", int, lambda value: value >= 32, "at least 32 pixels (VGG's pooling needs them)")
# The stylize-bucket flow's bounds, so that a URL run refuses what a folder run refuses.
journal_seconds = checked("journal_seconds", float, lambda value: 0 < value <= 86_400, "above 0 and at most 86400")
retries = checked("retries", int, lambda value: 0 <= value <= 100, "between 0 and 100")
workers = checked("workers", int, lambda value: 0 <= value <= 1024, "between 0 and 1024")


def local_home(text: str) -> Path:
    if "://" in text:  # as a Path, "gs://b" became the local folder "gs:/b", where nothing was found
        raise argparse.ArgumentTypeError(f"must be a folder on this machine, not {text}; a model store at a URL is "
                                         "--model-store (of prime, train and run)")
    return Path(text).expanduser()


def at_most(limit: int) -> Callable[[str], int]:
    return checked("positive_int", int, lambda value: 1 <= value <= limit, f"between 1 and {limit}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=local_home, default=None,
                        help=f"model store and caches (default: ${HOME_VARIABLE} or ~/.stylize)")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to compute (default: auto = cuda if available)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="fsspec storage option for URLs, repeatable (e.g. project=my-project, "
                             "endpoint_url=http://127.0.0.1:9023, token=anon)")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--model-store", metavar="URL",
                       help="model store of the Prefect flows: given, the command runs through them, as with URLs "
                            "(default: the --home folder)")

    vgg = argparse.ArgumentParser(add_help=False)
    vgg.add_argument("--vgg-weights", metavar="PATH",
                     help=f"VGG weights file (.pth or .safetensors state dict of torchvision vgg16/19 features); "
                          f"default: ${WEIGHTS_VARIABLE}, else torchvision's ImageNet weights (needs internet once)")
    vgg.add_argument("--vgg-arch", choices=("vgg16", "vgg19"), default="vgg16",
                     help="torchvision VGG used when no weights file is given (default: vgg16)")

    architecture = argparse.ArgumentParser(add_help=False)
    architecture.add_argument("--base-channels", type=positive_int, help=f"UNet width (default {UNetConfig.base_channels})")
    architecture.add_argument("--depth", type=positive_int, help=f"UNet downsamplings (default {UNetConfig.depth})")
    architecture.add_argument("--norm", choices=NORMS, help=f"UNet normalisation (default {UNetConfig.norm})")

    training = argparse.ArgumentParser(add_help=False)
    training.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                          help="training budget: fast (CPU, minutes) or full (the seed's 60+120 epochs, for GPUs); "
                               "default auto = full on CUDA, fast on CPU")
    length = training.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="training steps (overrides the preset; or --epochs)")
    length.add_argument("--epochs", type=epochs,
                        help="training epochs over the photos (overrides the preset; or --steps)")
    training.add_argument("--image-size", type=image_side, help="side of the square training crops")
    training.add_argument("--batch-size", type=positive_int, help="training batch size")
    training.add_argument("--lr", type=positive_float, help="Adam learning rate")
    training.add_argument("--seed", type=seed, help="random seed (default 0)")
    training.add_argument("--limit", type=positive_int, help="use only the first N photos (sorted by path)")
    training.add_argument("--checkpoint-every", type=positive_int,
                          help="save resumable training state every N steps (default: preset)")

    parser = argparse.ArgumentParser(
        prog="stylize",
        description="Fast neural style transfer: train a UNet once per style, then restyle whole folders.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prime = commands.add_parser("prime", parents=[common, store, vgg, architecture, training],
                                help="prime the UNet as an autoencoder on a folder of photos (cached)",
                                description="Train the UNet to reconstruct photos. The result is cached under "
                                            "$STYLIZE_HOME/primed by photo set and configuration, and reused by "
                                            "every style trained from the same photos.")
    prime.add_argument("photos", metavar="PHOTOS", help="folder or URL of photos (searched recursively)")
    prime.add_argument("--out", type=Path, help="also copy the primed checkpoint into this folder")
    prime.add_argument("--content-weight", type=non_negative_float, default=0.0,
                       help="add this much VGG content distance to the pixel loss (default 0: pixels only; "
                            "a value above 0 needs VGG weights)")
    prime.add_argument("--content-layer", help="VGG layer of that content term (default: the weights' content layer)")
    prime.set_defaults(func=cmd_prime)

    train = commands.add_parser("train", parents=[common, store, vgg, architecture, training],
                                help="train one style model from a style image and a folder of photos",
                                description="Train a style model, starting from a primed autoencoder (primed "
                                            "first, or taken from the cache, if --primed is not given). An "
                                            "interrupted run resumes when the same command is run again.")
    train.add_argument("style_image", metavar="STYLE_IMAGE", help="the painting whose style to learn (path or URL)")
    train.add_argument("--photos", required=True, help="folder or URL of training photos (recursive)")
    train.add_argument("--name", required=True, help="model name in the store")
    train.add_argument("--primed", help="primed checkpoint (folder or .safetensors) to start from")
    train.add_argument("--force", action="store_true", help="replace an existing model of the same name")
    _add_loss_options(train)
    train.set_defaults(func=cmd_train)

    run = commands.add_parser("run", parents=[common, store],
                              help="stylise every image under a folder into another folder",
                              description="Stylise every image under SRC (recursive) into DST with the same "
                                          "relative paths, and write DST/manifest.parquet with one row per "
                                          "image (ok, skipped when an earlier run made it, or error with its "
                                          "reason); inputs that cannot be stylised are named on stderr. Run it "
                                          "again after a crash or a failure: finished images are skipped, the "
                                          "rest is done.")
    run.add_argument("source", metavar="SRC", help="folder or URL (gs://, file://, ...) of input images")
    run.add_argument("destination", metavar="DST", help="output folder or URL (created)")
    run.add_argument("--model", required=True, help="model name in the store, or a model folder / .safetensors path")
    run.add_argument("--format", default="jpeg", help="output format: jpeg, png, webp or same (default jpeg)")
    run.add_argument("--quality", type=quality, default=90, help="JPEG/WebP quality (default 90)")
    run.add_argument("--batch-size", type=at_most(65_536),
                     help="images per forward pass (default: 64 on a GPU, within its free memory; 8 on a CPU)")
    run.add_argument("--max-batch-pixels", type=positive_int,
                     help="pixels per forward pass, which bounds its memory (default: from the free memory; on a "
                          "CPU a quarter of it, at about 700 bytes a pixel with the default UNet); a larger image is "
                          "stylised in tiles, giving the same picture")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model: slower start, faster on long runs of few image sizes")
    run.add_argument("--no-gpu-codec", action="store_true",
                     help="encode every JPEG output on the CPU even on a GPU (default: nvjpeg, full chroma, encodes a "
                          "share of each batch, the CPU threads the rest)")
    run.add_argument("--gpu-decode", action=argparse.BooleanOptionalAction, default=True,
                     help="on a GPU, decode plain JPEG inputs there (nvjpeg, a batch at a time; the default); "
                          "--no-gpu-decode decodes them in CPU threads")
    run.add_argument("--max-pixels", type=positive_int, default=image_io.DEFAULT_MAX_PIXELS,
                     help=f"refuse images with more pixels (default {image_io.DEFAULT_MAX_PIXELS:,})")
    run.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_IMAGE_BYTES,
                     help=f"refuse input files larger than this (default {DEFAULT_MAX_IMAGE_BYTES:,})")
    run.add_argument("--skip-existing", action="store_true",
                     help="also leave outputs alone that exist without a manifest row (e.g. from another tool)")
    run.add_argument("--journal-seconds", type=journal_seconds, default=ShardOptions.journal_seconds,
                     help="how often finished images are recorded while a shard runs, i.e. the most work a crash "
                          f"can cost (default {ShardOptions.journal_seconds:g})")
    run.add_argument("--shard-size", type=at_most(1_000_000), default=256,
                     help="images per shard: the unit of retries and of the manifest parts (default 256)")
    run.add_argument("--retries", type=retries, default=3, help="retries of a failed shard, for URLs (default 3)")
    run.add_argument("--workers", type=workers, default=0,
                     help="processes stylising shards side by side, each with its share of the cores and of the "
                          "memory. Per-image file work in one process tops out at a few hundred "
                          "images a second; workers take seconds to start. Default 0: one per four cores, at "
                          f"least two, from {AUTO_WORKERS_MIN_IMAGES:,} images up, one below (for URLs: the "
                          "flow's two threads)")
    run.set_defaults(func=cmd_run)

    evaluate_parser = commands.add_parser("eval", parents=[common, vgg],
                                          help="style and content distance of a model against identity",
                                          description="Measure a model on photos: style distance (Gram MSE to "
                                                      "the style image) and content distance (VGG feature MSE to "
                                                      "each photo), for the model and for the identity.")
    evaluate_parser.add_argument("--model", required=True, help="model name or path")
    evaluate_parser.add_argument("--photos", required=True, help="folder of photos to evaluate on (local)")
    evaluate_parser.add_argument("--sheet", type=Path, help="write a contact sheet PNG (input | output rows)")
    evaluate_parser.add_argument("--sheet-rows", type=positive_int, default=8, help="rows in the sheet (default 8)")
    evaluate_parser.add_argument("--limit", type=positive_int, help="use only the first N photos")
    evaluate_parser.add_argument("--image-size", type=image_side, help="evaluation crop size (default: training size)")
    evaluate_parser.add_argument("--batch-size", type=positive_int, default=8, help="batch size (default 8)")
    evaluate_parser.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate_parser.set_defaults(func=cmd_eval)

    models = commands.add_parser("models", parents=[common], help="list trained models and their metadata")
    models.add_argument("--json", action="store_true", help="print JSON (full metadata, without loss history)")
    models.set_defaults(func=cmd_models)

    demo = commands.add_parser("demo", parents=[common, vgg, architecture, training],
                               help="prime, train one style, stylise photos and evaluate, end to end",
                               description="The whole job on small inputs that ship with the project (or "
                                           "--photos/--style): primes (or reuses a cached priming), trains a "
                                           "style, stylises the photos, evaluates and writes a contact sheet.")
    demo.add_argument("--out", type=Path, default=Path("stylize-demo"), help="output folder (default ./stylize-demo)")
    demo.add_argument("--photos", type=Path, help="folder of photos (default: the bundled public-domain photos)")
    demo.add_argument("--style", type=Path, help="style image (default: the bundled swirl painting)")
    demo.add_argument("--name", default="demo", help="model name (default demo; replaced on each run)")
    _add_loss_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def _add_loss_options(parser: argparse.ArgumentParser) -> None:
    defaults = LossConfig()
    group = parser.add_argument_group("loss")
    group.add_argument("--style-weight", type=non_negative_float, help=f"default {defaults.style_weight}")
    group.add_argument("--content-weight", type=non_negative_float, help=f"default {defaults.content_weight}")
    group.add_argument("--tv-weight", type=non_negative_float, help=f"total variation, default {defaults.tv_weight}")
    group.add_argument("--style-layers", help="comma-separated VGG layers, e.g. relu1_2,relu2_2,relu3_3,relu4_3 "
                                              "(default: the weights' four standard layers)")
    group.add_argument("--content-layer", help="VGG content layer (default: the last style layer)")
    group.add_argument("--style-size", type=image_side, help="long side of the style image (default: preset)")
    group.add_argument("--prime-steps", type=positive_int, help="priming steps when priming is needed (default: preset)")


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


# Prefect's temporary (ephemeral) server, which URL runs start when PREFECT_API_URL names none, gets 20 s to start
# by default; its first start in a new PREFECT_HOME builds its database and took longer than that on 2 CPU cores.
EPHEMERAL_STARTUP_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_STARTUP_SECONDS = "120"
ANALYTICS_VARIABLE = "PREFECT_SERVER_ANALYTICS_ENABLED"
QUIET_CONSOLE_VARIABLE = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"  # what Prefect's console handler shows


def prefect_defaults(quiet: bool) -> None:
    """Settings for the Prefect flows this process may run, unless the environment sets them: they take effect only
    before Prefect is imported."""
    if "prefect" in sys.modules:
        return
    os.environ.setdefault(EPHEMERAL_STARTUP_VARIABLE, EPHEMERAL_STARTUP_SECONDS)
    # The temporary server lives for one command; offline its telemetry logged an error line on every run.
    os.environ.setdefault(ANALYTICS_VARIABLE, "false")
    if quiet:  # URL runs: Prefect's own log lines too, its errors' tracebacks included (the run's log keeps them)
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault(QUIET_CONSOLE_VARIABLE, "CRITICAL")


def print_error(message: str) -> None:
    """The one line a failure is to the user: a message of several lines (a storage service's reply) joined into it."""
    lines = (line.strip() for line in message.splitlines())
    print("stylize: error: " + " ".join(line for line in lines if line), file=sys.stderr)


def is_server_start_timeout(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "ephemeral Prefect API server" in str(error)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "home", None) is None:
        args.home = default_home()
    prefect_defaults(getattr(args, "quiet", False))
    # SIGTERM (what schedulers and `kill` send) stops as cleanly as Ctrl-C: the same message, nothing half-written.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupted) if in_main_thread else None
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, where a reader gone away is caught, not at exit
        return status
    except (UserError, CheckpointError, VGGWeightsError) as error:
        print_error(str(error))
        return 2
    except KeyboardInterrupt as interrupt:  # its text, where there is one, is what to do instead of resuming
        print(f"stylize: interrupted; {str(interrupt) or 'run the same command again to resume'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`stylize models | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor fail flushing stdout at exit
        return 1
    except TrainingDiverged as error:
        print_error(str(error))
        return 1
    except RuntimeError as error:
        if not is_server_start_timeout(error):
            raise
        print_error(f"Prefect's temporary server did not start within "
                    f"{os.environ.get(EPHEMERAL_STARTUP_VARIABLE, '20')} s (a slow or busy machine); raise "
                    f"{EPHEMERAL_STARTUP_VARIABLE}, or start one (`prefect server start`) and set PREFECT_API_URL")
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
