"""Checkpoints: weights as safetensors, everything else as JSON beside them. Nothing is ever unpickled.

A model is a folder holding ``model.safetensors`` and ``model.json``. The JSON carries the architecture
(to rebuild the UNet), how it was trained, and the SHA-256 of the weights file, checked on load.
Resumable training state uses the same pair of formats (``state-<id>.safetensors`` + ``state.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import load, save, save_file

from .model import UNet, UNetConfig

WEIGHTS_FILE = "model.safetensors"
# The names this project gives a model's files: the usual one, and a replacing model's (tasks.models.save_model_to)
WEIGHTS_FILE_NAME = re.compile(r"model(-[0-9a-f]+)?\.safetensors")
STYLE_FILE_NAME = re.compile(r"style(-[0-9a-f]+)?\.jpg")
METADATA_FILE = "model.json"
STYLE_FILE = "style.jpg"  # the style image a model learnt, beside it
FORMAT = "stylize-unet"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt, not safetensors, or does not fit the model asked for."""


def serialize_model(model: UNet, metadata: dict) -> tuple[bytes, dict]:
    """The model as safetensors bytes plus its full metadata document (architecture, checksum, ``metadata``)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    weights = save(state)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.config.to_dict(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        **metadata,
    }
    return weights, document


def save_model(directory: str | Path, model: UNet, metadata: dict) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (created); each file appears atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, document = serialize_model(model, metadata)
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: tmp.write_bytes(weights))
    _atomic_write(directory / METADATA_FILE, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
    return directory


def weights_file_of(metadata: dict, where: str = "checkpoint") -> str:
    """The name of the weights' file in the model's folder: model.json's "weights_file" where a model store gave the
    weights a name of their own (replacing a model: ``tasks.models.save_model_to``), else model.safetensors."""
    name = metadata.get("weights_file", WEIGHTS_FILE)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors", name):
        raise CheckpointError(f"{where}: its \"weights_file\" ({name!r}) is not the name of a .safetensors file "
                              "beside it")
    return name


def style_file_of(metadata: dict, where: str = "checkpoint") -> str:
    """The name of the style image the model learnt, in its folder: model.json's "style_file", else style.jpg."""
    name = metadata.get("style_file", STYLE_FILE)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.jpg", name):
        raise CheckpointError(f"{where}: its \"style_file\" ({name!r}) is not the name of a .jpg file beside it")
    return name


def check_style_model(metadata: dict, where: str) -> None:
    """Refuse a primed autoencoder where a style model is wanted: it only gives its input back."""
    if metadata.get("kind") == "primed-autoencoder":
        raise CheckpointError(f"{where} is a primed autoencoder, not a style model (it gives its input back); "
                              "train a style from it with `stylize train`")


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata of a model folder (or of a ``.safetensors`` file with its ``.json`` beside it)."""
    _, metadata_path = _paths(Path(path))
    try:
        text = metadata_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint metadata at {metadata_path}") from None
    except (IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"{metadata_path} is not a file") from None
    return parse_metadata(text, f"checkpoint metadata {metadata_path}")


def parse_metadata(text: bytes | str, where: str) -> dict:
    """A checkpoint's JSON metadata document as a dict; ``where`` names it in the error."""
    try:
        metadata = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    if not isinstance(metadata.get("name", ""), str):  # it names the model's outputs and manifest rows
        raise CheckpointError(f"{where}: its \"name\" is not text")
    return metadata


def load_model(path: str | Path, expected: UNetConfig | None = None) -> tuple[UNet, dict]:
    """Rebuild a UNet from a checkpoint folder or file, checking its checksum and (if given) its architecture."""
    weights_path, _ = _paths(Path(path))
    metadata = read_metadata(path)
    if Path(path).is_dir():
        weights_path = Path(path) / weights_file_of(metadata, str(path))
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights_path}")
    return model_from_bytes(weights_path.read_bytes(), metadata, expected, str(path)), metadata


def model_from_bytes(weights: bytes, metadata: dict, expected: UNetConfig | None = None, where: str = "checkpoint") -> UNet:
    """Rebuild a UNet from safetensors bytes and their metadata (no file system involved)."""
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a stylize model checkpoint (format {metadata.get('format')!r})")
    try:
        config = UNetConfig.from_dict(metadata["architecture"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{where} has an invalid architecture description: {error}") from None
    if expected is not None and config != expected:
        raise CheckpointError(
            f"architecture mismatch: {where} holds {_describe(config)}, but {_describe(expected)} was asked for"
        )
    if not metadata.get("weights_sha256"):
        raise CheckpointError(f"{where} has no weights checksum in its metadata; unverified weights are not loaded")
    state = weights_from_bytes(weights, metadata["weights_sha256"], where)
    model = UNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = str(error).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"weights in {where} do not fit {_describe(config)}: {detail}") from None
    model.eval()
    return model


def read_weights(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, refusing anything else (pickles in particular) and checking the checksum."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {path}")
    return weights_from_bytes(path.read_bytes(), expected_sha256, str(path))


def weights_from_bytes(data: bytes, expected_sha256: str | None, where: str,
                       load_tensors: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes whose SHA-256 is ``expected_sha256`` (where given); with ``load_tensors``
    False only the checks, and an empty dict."""
    if not is_safetensors_bytes(data):
        if len(data) > 8 and data[8:9] == b"{":  # its header says more than the file holds
            raise CheckpointError(f"{where} is truncated: {len(data):,} bytes, shorter than its own header says")
        raise CheckpointError(f"{where} is not a safetensors file; pickle checkpoints are never loaded")
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CheckpointError(f"{where} is corrupt or was modified: its SHA-256 does not match the metadata")
    if not load_tensors:
        return {}
    try:
        return load(data)
    except Exception as error:
        raise CheckpointError(f"cannot read {where}: {(str(error).splitlines() or [type(error).__name__])[0]}") from None


def is_safetensors_bytes(data: bytes) -> bool:
    """safetensors starts with an 8-byte little-endian header length followed by a JSON object."""
    if len(data) < 9:
        return False
    (header_length,) = struct.unpack("<Q", data[:8])
    return data[8:9] == b"{" and 0 < header_length <= len(data) - 8


def save_state(directory: Path, tensors: dict[str, torch.Tensor], document: dict) -> None:
    """Save resumable training state: tensors as safetensors under a name of their own, then the JSON that names
    them (written last, so it marks completion), then the earlier tensors are removed. A kill at any point leaves
    the earlier state or this one, whole: a run cut off while saving resumes from the checkpoint before."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    state_file = f"state-{uuid.uuid4().hex[:12]}.safetensors"
    _atomic_write(directory / state_file, lambda tmp: save_file(tensors, str(tmp)))
    document = {**document, "state_file": state_file, "state_sha256": sha256_file(directory / state_file)}
    _atomic_write(directory / "state.json", lambda tmp: tmp.write_text(json.dumps(document) + "\n"))
    for earlier in directory.glob("state*.safetensors"):
        if earlier.name != state_file:
            earlier.unlink(missing_ok=True)


def load_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Load what save_state wrote, or None when there is no complete state there (the run then starts over)."""
    try:
        document = json.loads((directory / "state.json").read_text())
        state_file = document.get("state_file", "state.safetensors")
        if not isinstance(state_file, str) or "/" in state_file or not state_file.endswith(".safetensors"):
            return None
        tensors = read_weights(directory / state_file, document.get("state_sha256"))
    except (OSError, ValueError, AttributeError, CheckpointError):
        return None
    return tensors, document


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _paths(path: Path) -> tuple[Path, Path]:
    if path.suffix == ".safetensors":  # its own JSON beside it, or the model folder's (weights named by model.json)
        own = path.with_suffix(".json")
        return path, own if own.exists() or not (path.parent / METADATA_FILE).exists() else path.parent / METADATA_FILE
    if path.is_dir():
        return path / WEIGHTS_FILE, path / METADATA_FILE
    if path.exists():
        raise CheckpointError(f"{path} is not a stylize model (expected a model folder or a .safetensors file); "
                              "pickle checkpoints are never loaded")
    raise CheckpointError(f"checkpoint not found: {path}")


def _describe(config: UNetConfig) -> str:
    return f"UNet(base_channels={config.base_channels}, depth={config.depth}, norm={config.norm!r})"


def _atomic_write(path: Path, write) -> None:
    descriptor, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
