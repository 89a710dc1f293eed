"""Style and content losses on a frozen VGG (Gatys et al. 2016; Johnson et al. 2016).

Style: MSE between Gram matrices of the output's and the style image's features at several layers.
Content: MSE between the output's and the input photo's features at one deep layer.

VGG weights differ wildly in feature scale (torchvision's ImageNet VGG against the normalised VGG of
Gatys et al., whose activations average about 1), so by default each layer's error is divided by the
mean square of its target (the style image's Gram for style, the photo's features for content). The
loss weights then mean the same thing whatever weights are loaded, and 0 means "identical".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .vgg import VGGFeatures, VGGSource


@dataclass
class LossConfig:
    """Every knob of the perceptual loss in one place. Layers left as None come from the VGG weights."""

    style_layers: list[str] | None = None
    content_layer: str | None = None
    style_weight: float = 1.0
    content_weight: float = 0.25
    tv_weight: float = 0.0
    style_layer_weights: list[float] | None = None  # one per style layer; equal when None
    relative: bool = True  # divide each term by its target's mean square (see module docstring)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LossConfig":
        return cls(**data)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) features to (N, C, C) Gram matrices, normalised by C*H*W so image size does not matter."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels."""
    dh = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    dw = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return dh + dw


@dataclass
class StyleTarget:
    """The style image's Gram matrices, computed once per style and reused for any batch size."""

    grams: dict[str, torch.Tensor]  # layer -> (C, C)
    scales: dict[str, float] = field(default_factory=dict)  # layer -> mean square of the Gram

    @classmethod
    @torch.no_grad()
    def from_image(cls, vgg: VGGFeatures, style_image: torch.Tensor, layers: list[str]) -> "StyleTarget":
        features = vgg(style_image.unsqueeze(0) if style_image.dim() == 3 else style_image[:1])
        grams = {layer: gram_matrix(features[layer].float())[0] for layer in layers}
        scales = {layer: float(gram.pow(2).mean().clamp_min(1e-12)) for layer, gram in grams.items()}
        return cls(grams, scales)


def style_distance_by_layer(
    features: dict[str, torch.Tensor], target: StyleTarget, layers: Iterable[str], relative: bool
) -> dict[str, torch.Tensor]:
    """Layer -> (N,) Gram MSE of each image against the style at that layer."""
    errors = {}
    for layer in layers:
        gram = gram_matrix(features[layer].float())
        error = (gram - target.grams[layer].unsqueeze(0)).pow(2).mean(dim=(1, 2))
        errors[layer] = error / target.scales[layer] if relative else error
    return errors


def weighted_style_distance(by_layer: dict[str, torch.Tensor], layer_weights: dict[str, float]) -> torch.Tensor:
    """(N,) the per-layer distances averaged with ``layer_weights``."""
    total = 0.0
    for layer, weight in layer_weights.items():
        total = total + weight * by_layer[layer]
    return total / sum(layer_weights.values())


def style_distance_per_image(
    features: dict[str, torch.Tensor], target: StyleTarget, layer_weights: dict[str, float], relative: bool
) -> torch.Tensor:
    """(N,) weighted Gram MSE of each image against the style, averaged over the style layers."""
    return weighted_style_distance(style_distance_by_layer(features, target, layer_weights, relative), layer_weights)


def content_distance_per_image(output: torch.Tensor, reference: torch.Tensor, relative: bool) -> torch.Tensor:
    """(N,) feature MSE of each output against its photo's features."""
    output, reference = output.float(), reference.float()
    error = (output - reference).pow(2).mean(dim=(1, 2, 3))
    if relative:
        error = error / reference.pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return error


class PerceptualLoss(nn.Module):
    """Weighted style + content (+ total variation) loss of stylised outputs against their input photos."""

    def __init__(self, vgg: VGGFeatures, config: LossConfig, style_target: StyleTarget):
        super().__init__()
        style_layers, content_layer = resolve_layers(vgg.source, config)
        missing = [layer for layer in [*style_layers, content_layer] if layer not in vgg.layers]
        if missing:
            raise ValueError(f"the VGG extractor was built without layers {missing}")
        weights = config.style_layer_weights or [1.0] * len(style_layers)
        if len(weights) != len(style_layers):
            raise ValueError(f"{len(weights)} style layer weights given for {len(style_layers)} style layers")
        self.vgg = vgg
        self.config = config
        self.layer_weights = dict(zip(style_layers, weights))
        self.content_layer = content_layer
        # Buffers, so that .to(device) moves the style Grams with the module.
        for layer in style_layers:
            self.register_buffer(f"gram_{layer}", style_target.grams[layer], persistent=False)
        self._scales = {layer: style_target.scales[layer] for layer in style_layers}

    @property
    def style_target(self) -> StyleTarget:
        return StyleTarget({layer: getattr(self, f"gram_{layer}") for layer in self._scales}, self._scales)

    def forward(self, outputs: torch.Tensor, photos: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            photo_features = self.vgg(photos)[self.content_layer]
        features = self.vgg(outputs)
        relative = self.config.relative
        style = style_distance_per_image(features, self.style_target, self.layer_weights, relative).mean()
        content = content_distance_per_image(features[self.content_layer], photo_features, relative).mean()
        tv = total_variation(outputs) if self.config.tv_weight else outputs.new_zeros(())
        total = self.config.style_weight * style + self.config.content_weight * content + self.config.tv_weight * tv
        return {"loss": total, "style": style, "content": content, "tv": tv}


def resolve_layers(source: VGGSource, config: LossConfig) -> tuple[list[str], str]:
    """The style layers and content layer the config asks for, or the VGG weights' defaults."""
    default_style, _ = source.default_layers()
    style_layers = list(config.style_layers or default_style)
    content_layer = config.content_layer or style_layers[-1]
    for layer in [*style_layers, content_layer]:
        source.index_of(layer)  # raises a clear error for a layer the weights do not have
    return style_layers, content_layer


def layers_needed(source: VGGSource, config: LossConfig) -> list[str]:
    style_layers, content_layer = resolve_layers(source, config)
    return list(dict.fromkeys([*style_layers, content_layer]))


def reconstruction_loss(outputs: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
    """Pixel L1, the autoencoder priming objective."""
    return F.l1_loss(outputs, photos)
