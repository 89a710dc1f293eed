"""Style models and primed checkpoints in a model store at any fsspec URL.

Same layout as the local store (``stylecore.store``): ``<store>/models/<name>/`` and ``<store>/primed/<key>/``,
each holding ``model.safetensors`` and ``model.json``. The JSON is written last, so its presence means the
checkpoint is complete.
"""

from __future__ import annotations

import json
import os
import threading

import torch

from stylecore.checkpoint import (
    METADATA_FILE, WEIGHTS_FILE, CheckpointError, model_from_bytes, parse_metadata, serialize_model,
)
from stylecore.model import UNet
from stylecore.store import check_model_name, default_home

from .secrets import StorageSecrets, reveal_options
from .storage import Location, exists, read_bytes, write_bytes

DEVICE_VARIABLE = "STYLIZE_DEVICE"  # cpu or cuda: where this process's tasks compute (default: the GPU if any)


def default_device() -> str:
    wanted = os.environ.get(DEVICE_VARIABLE, "").strip().lower()
    if wanted in ("cpu", "cuda"):
        return wanted
    if wanted not in ("", "auto"):
        raise ValueError(f"${DEVICE_VARIABLE} must be cpu, cuda or auto, not {wanted!r}")
    return "cuda" if torch.cuda.is_available() else "cpu"


_cache: dict[tuple[str, str, str], UNet] = {}
_cache_lock = threading.Lock()


def model_location(reference: str, store: str | None, options: dict | None = None) -> Location:
    """A model by URL or path (anything with a '/'), or by name in the model store ``store`` (default: this
    machine's $STYLIZE_HOME, where train-new-style puts models by default)."""
    options = options or {}
    if "/" in reference or "://" in reference:
        return Location(reference.removesuffix("/" + WEIGHTS_FILE), options)
    if store is None:  # as for training: the worker's $STYLIZE_HOME
        store = str(default_home())
    try:
        check_model_name(reference)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return Location(store, options).child(f"models/{reference}")


def read_model_metadata(location: Location) -> dict:
    try:
        text = read_bytes(location.child(METADATA_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"no model at {location.display} ({METADATA_FILE} not found)") from None
    except (NotADirectoryError, IsADirectoryError):  # a file given as the model's folder, or a folder as its file
        raise CheckpointError(f"no model at {location.display} (not a model's folder)") from None
    return parse_metadata(text, f"{location.display}/{METADATA_FILE}")


def load_model_from(location: Location, device: str = "cpu") -> tuple[UNet, dict]:
    """Load (and keep for this process, per device) the model at ``location``; its checksum is verified on
    first load. The model is shared between threads, which is safe for inference."""
    metadata = read_model_metadata(location)
    key = (location.url, str(metadata.get("weights_sha256")), str(device))
    with _cache_lock:
        cached = _cache.get(key)
    if cached is None:
        try:
            weights = read_bytes(location.child(WEIGHTS_FILE))
        except FileNotFoundError:
            raise CheckpointError(f"no weights at {location.display}/{WEIGHTS_FILE}") from None
        cached = model_from_bytes(weights, metadata, where=location.display).to(device).eval()
        with _cache_lock:
            _cache[key] = cached
    return cached, metadata


def save_model_to(location: Location, model: UNet, metadata: dict) -> dict:
    weights, document = serialize_model(model, metadata)
    write_bytes(location.child(WEIGHTS_FILE), weights)
    write_bytes(location.child(METADATA_FILE), (json.dumps(document, indent=2) + "\n").encode())
    return document


def is_complete(location: Location) -> bool:
    return exists(location.child(METADATA_FILE)) and exists(location.child(WEIGHTS_FILE))


def model_exists(name: str, model_store: str, storage_options: StorageSecrets | dict | None = None) -> bool:
    """Whether the store holds a whole model of that name."""
    return is_complete(Location(model_store, reveal_options(storage_options)).child(f"models/{name}"))
