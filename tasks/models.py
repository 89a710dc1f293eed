"""Style models and primed checkpoints in a model store at any fsspec URL.

Same layout as the local store (``stylecore.store``): ``<store>/models/<name>/`` and ``<store>/primed/<key>/``,
each holding ``model.safetensors`` (a replaced model: the weights file its model.json names) and ``model.json``.
The JSON is written last, so its presence means the checkpoint is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

import torch

from stylecore.checkpoint import (
    METADATA_FILE, STYLE_FILE_NAME, WEIGHTS_FILE_NAME, CheckpointError, model_from_bytes, parse_metadata,
    serialize_model, style_file_of, weights_file_of,
)
from stylecore.model import UNet
from stylecore.store import check_model_name, default_home

from .secrets import StorageSecrets, reveal_options
from .storage import Location, exists, read_bytes, remove, write_bytes

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
        folder, _, name = reference.rpartition("/")
        if WEIGHTS_FILE_NAME.fullmatch(name):  # a model's weights file: the model is its folder
            reference = folder
        return Location(reference, options)
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
    for attempt in range(2):
        metadata = read_model_metadata(location)
        key = (location.url, str(metadata.get("weights_sha256")), str(device))
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None:
            return cached, metadata
        weights_file = weights_file_of(metadata, f"{location.display}/{METADATA_FILE}")
        try:
            weights = read_bytes(location.child(weights_file))
            break
        except FileNotFoundError:  # replaced between the two reads (save_model_to): the new model.json names them
            if attempt:
                raise CheckpointError(f"no weights at {location.display}/{weights_file}") from None
    model = model_from_bytes(weights, metadata, where=location.display).to(device).eval()
    with _cache_lock:
        _cache[key] = model
    return model, metadata


def save_model_to(location: Location, model: UNet, metadata: dict, style_jpeg: bytes | None = None) -> dict:
    """Write the weights (and the style image the model learnt, where given), then model.json, which makes the model
    whole (a folder's model.json is what readers go by). A model that replaces another gets files of names of their
    own (``model-<sha256>.safetensors``, ``style-<sha256>.jpg``, named in its model.json), and the old files are
    removed only after the new model.json is in place: a replacement interrupted at any point leaves the old model
    or the new one, whole, never new weights under old metadata, nor one model beside another's style image."""
    weights, document = serialize_model(model, metadata)
    for key in ("weights_file", "style_file"):  # from the metadata of a model loaded earlier: not these files' names
        document.pop(key, None)
    replacing = exists(location.child(METADATA_FILE))
    if replacing:
        document["weights_file"] = f"model-{document['weights_sha256'][:16]}.safetensors"
        if style_jpeg is not None:
            document["style_file"] = f"style-{hashlib.sha256(style_jpeg).hexdigest()[:16]}.jpg"
    files = {weights_file_of(document): weights}
    if style_jpeg is not None:
        files[style_file_of(document)] = style_jpeg
    for name, data in files.items():
        write_bytes(location.child(name), data)
    write_bytes(location.child(METADATA_FILE), (json.dumps(document, indent=2) + "\n").encode())
    if replacing:
        remove_replaced_files(location, keep=set(files))
    return document


def remove_replaced_files(location: Location, keep: set[str]) -> None:
    fs, path = location.filesystem()
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name not in keep and (WEIGHTS_FILE_NAME.fullmatch(name) or STYLE_FILE_NAME.fullmatch(name)):
            remove(location.child(name))


def is_complete(location: Location) -> bool:
    """Whether a model is there: its model.json and the weights it names (a model.json that cannot be read counts:
    something is there, and its readers say what is wrong with it)."""
    if not exists(location.child(METADATA_FILE)):
        return False
    try:
        weights_file = weights_file_of(read_model_metadata(location))
    except CheckpointError:
        return True
    return exists(location.child(weights_file))


def model_exists(name: str, model_store: str, storage_options: StorageSecrets | dict | None = None) -> bool:
    """Whether the store holds a whole model of that name."""
    return is_complete(Location(model_store, reveal_options(storage_options)).child(f"models/{name}"))
