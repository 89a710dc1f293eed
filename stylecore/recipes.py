"""The two training jobs as the CLI and the Prefect tasks run them: each returns the model and the metadata
that goes beside its weights. No file system here; callers read inputs and store the results."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import serialize_model
from .images import image_to_tensor, resize_long_side
from .losses import LossConfig, PerceptualLoss, StyleTarget, resolve_layers
from .model import UNet, UNetConfig
from .train import StepCallback, TrainConfig, prime_autoencoder, train_style
from .vgg import VGGFeatures


def versions() -> dict:
    import torchvision

    try:
        own = package_metadata.version("stylize")
    except package_metadata.PackageNotFoundError:
        own = "unknown"
    return {"stylize": own, "torch": torch.__version__, "torchvision": torchvision.__version__}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def photos_fingerprint(items: list[tuple[str, bytes | str]]) -> str:
    """Stable digest of a photo set from (name, content or content tag) pairs, order-independent."""
    digest = hashlib.sha256()
    for name, data in sorted(items):
        tag = hashlib.sha256(data).digest() if isinstance(data, bytes) else data.encode()
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0" + tag)  # a local name may not be UTF-8
    return digest.hexdigest()


def priming_key(fingerprint: str, model_config: UNetConfig, train_config: TrainConfig, content: dict | None) -> str:
    """Cache key of a priming run: the photo set and every setting that changes its result (how often it logs or
    saves its state does not)."""
    train = {k: v for k, v in train_config.to_dict().items() if k not in ("log_every", "checkpoint_every")}
    document = json.dumps({"photos": fingerprint, "model": model_config.to_dict(), "train": train,
                           "content": content}, sort_keys=True, default=str)
    return hashlib.sha256(document.encode()).hexdigest()[:24]


def content_term(content_vgg: VGGFeatures | None, content_weight: float) -> dict | None:
    if content_vgg is None or content_weight <= 0:
        return None
    return {"weight": content_weight, "layer": content_vgg.layers[-1], "vgg": content_vgg.source.describe()}


def run_priming(
    photos: list[Image.Image],
    fingerprint: str,
    model_config: UNetConfig,
    train_config: TrainConfig,
    device: str | torch.device = "cpu",
    content_vgg: VGGFeatures | None = None,
    content_weight: float = 0.0,
    on_step: StepCallback | None = None,
    state_dir: Path | None = None,
) -> tuple[UNet, dict]:
    content = content_term(content_vgg, content_weight)
    result = prime_autoencoder(photos, model_config, train_config, device, content_vgg=content_vgg,
                               content_weight=content_weight, on_step=on_step, state_dir=state_dir)
    metadata = {
        "kind": "primed-autoencoder",
        "cache_key": priming_key(fingerprint, model_config, train_config, content),
        "photos_fingerprint": fingerprint,
        "num_photos": len(photos),
        "train_config": train_config.to_dict(),
        "content_term": content,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "training_seconds": round(result.seconds, 2),
        "final_reconstruction_l1": result.history[-1]["reconstruction"] if result.history else None,
        "history": result.history,
        "versions": versions(),
        "created_at": now(),
    }
    return result.model.cpu(), metadata


def run_style_training(
    name: str,
    photos: list[Image.Image],
    fingerprint: str,
    style_image: Image.Image,
    style_source: str,
    style_sha256: str,
    style_size: int,
    primed: UNet,
    primed_ref: dict,
    vgg: VGGFeatures,
    loss_config: LossConfig,
    train_config: TrainConfig,
    device: str | torch.device = "cpu",
    preset: str = "custom",
    on_step: StepCallback | None = None,
    state_dir: Path | None = None,
) -> tuple[UNet, dict, Image.Image]:
    """Train one style; returns the model, its metadata and the style image as used (resized)."""
    style_layers, content_layer = resolve_layers(vgg.source, loss_config)
    style_image = resize_long_side(style_image, style_size)
    target = StyleTarget.from_image(vgg, image_to_tensor(style_image).float().div(255), style_layers)
    loss = PerceptualLoss(vgg, loss_config, target)
    # An interrupted run of the same name resumes only if it trained the same thing.
    resume_key = hashlib.sha256(json.dumps({
        "style_sha256": style_sha256, "style_size": style_size, "photos": fingerprint, "vgg": vgg.source.describe(),
        "layers": [style_layers, content_layer], "loss": loss_config.to_dict(),
        "primed": serialize_model(primed, {})[1]["weights_sha256"],
    }, sort_keys=True, default=str).encode()).hexdigest()
    result = train_style(photos, primed, loss, train_config, device, on_step=on_step, state_dir=state_dir,
                         resume_key=resume_key)
    last = result.history[-1] if result.history else {}
    metadata = {
        "kind": "style-model",
        "name": name,
        "style_image": style_source,
        "style_sha256": style_sha256,
        "style_size": style_size,
        "preset": preset,
        "vgg": vgg.source.describe(),
        "style_layers": style_layers,
        "content_layer": content_layer,
        "loss": loss_config.to_dict(),
        "train_config": train_config.to_dict(),
        "primed_from": primed_ref,
        "num_photos": len(photos),
        "photos_fingerprint": fingerprint,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "training_seconds": round(result.seconds, 2),
        "final_losses": {k: v for k, v in last.items() if k not in ("step", "seconds")},
        "history": result.history,
        "versions": versions(),
        "created_at": now(),
    }
    return result.model.cpu(), metadata, style_image
