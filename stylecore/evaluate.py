"""How good a style model is: style and content distance over held-out photos, and a contact sheet to look at.

Style distance is the style loss of the outputs against the style image (mean over layers of the Gram MSE,
relative to the style Gram's mean square unless the loss config says otherwise); content distance is the
content-layer feature MSE of each output against its own photo. Both are reported for the model and for
the identity (the photo itself), which bounds what "no stylisation" scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from PIL import Image, ImageOps

from .images import image_to_tensor, resize_short_side
from .losses import (
    PerceptualLoss,
    content_distance_per_image,
    style_distance_by_layer,
    style_distance_per_image,
    weighted_style_distance,
)
from .model import UNet
from .stylize import autocast_for


@dataclass
class Distances:
    style: float
    content: float


@dataclass
class Evaluation:
    model: Distances
    identity: Distances
    images: int
    image_size: int
    model_style_by_layer: dict[str, float]  # each style layer's share of model.style, to see where a model falls short

    def to_dict(self) -> dict:
        return asdict(self)


def center_square(image: Image.Image, size: int) -> torch.Tensor:
    """uint8 (3, size, size): the photo scaled so its short side is ``size``, centre-cropped."""
    image = resize_short_side(image, size)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image_to_tensor(image.crop((left, top, left + size, top + size)))


@torch.inference_mode()
def evaluate(
    model: UNet, loss: PerceptualLoss, photos: list[Image.Image], image_size: int = 256, batch_size: int = 8
) -> Evaluation:
    if not photos:
        raise ValueError("no photos to evaluate on")
    device = next(model.parameters()).device
    loss.to(device)
    target = loss.style_target
    model.eval()
    sums = {"model_style": 0.0, "model_content": 0.0, "identity_style": 0.0, "identity_content": 0.0}
    by_layer = dict.fromkeys(loss.layer_weights, 0.0)
    for start in range(0, len(photos), batch_size):
        batch = torch.stack([center_square(p, image_size) for p in photos[start : start + batch_size]])
        batch = batch.to(device).float().div_(255)
        with autocast_for(device):
            outputs = model(batch).float().clamp(0, 1)
        photo_features = loss.vgg(batch)
        output_features = loss.vgg(outputs)
        relative = loss.config.relative
        layer = loss.content_layer
        model_by_layer = style_distance_by_layer(output_features, target, loss.layer_weights, relative)
        sums["model_style"] += float(weighted_style_distance(model_by_layer, loss.layer_weights).sum())
        sums["identity_style"] += float(style_distance_per_image(photo_features, target, loss.layer_weights, relative).sum())
        sums["model_content"] += float(
            content_distance_per_image(output_features[layer], photo_features[layer], relative).sum()
        )
        for style_layer, distances in model_by_layer.items():
            by_layer[style_layer] += float(distances.sum())
    n = len(photos)
    return Evaluation(
        model=Distances(sums["model_style"] / n, sums["model_content"] / n),
        identity=Distances(sums["identity_style"] / n, sums["identity_content"] / n),
        images=n,
        image_size=image_size,
        model_style_by_layer={style_layer: total / n for style_layer, total in by_layer.items()},
    )


def contact_sheet(rows: list[list[Image.Image]], cell_height: int = 256, gap: int = 6) -> Image.Image:
    """One row per photo (e.g. input | output), each image scaled to ``cell_height``, on a white background."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    scaled = [[ImageOps.contain(image, (cell_height * 4, cell_height)) for image in row] for row in rows]
    width = max(sum(image.width for image in row) + gap * (len(row) + 1) for row in scaled)
    height = sum(max(image.height for image in row) + gap for row in scaled) + gap
    sheet = Image.new("RGB", (width, height), "white")
    y = gap
    for row in scaled:
        x = gap
        for image in row:
            sheet.paste(image, (x, y))
            x += image.width + gap
        y += max(image.height for image in row) + gap
    return sheet
