"""The frozen VGG feature extractor used by the style and content losses.

Weights come from a file (any slice of torchvision's ``vgg16``/``vgg19`` ``features``, as a state dict in
safetensors or PyTorch format, optionally with a JSON description beside it) or from torchvision's
ImageNet weights. The available layers and the input normalisation are read from the weights, never
assumed: a truncated file only offers the layers it has.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
import torchvision.models.vgg as vgg_module
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Johnson et al. 2016 (the seed's four layers); content at the fourth.
JOHNSON_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
# Gatys et al. / AdaIN: the first ReLU of each block, used to pick layers from truncated weights.
GATYS_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")


class VGGWeightsError(Exception):
    """The VGG weights cannot be found, read or used as asked."""


def style_image_problem(width: int, height: int, style_size: int, style_layers: list[str] | None) -> str | None:
    """Why a style image of ``width`` x ``height``, shrunk to ``style_size`` on its long side, cannot give Gram
    matrices at ``style_layers`` (None: the defaults, down to relu4_x at most), or None. VGG halves an image at
    each pooling before a layer (three before relu4_x): a side of fewer pixels than that leaves nothing."""
    blocks = [int(match.group(1)) for layer in (style_layers or JOHNSON_LAYERS)
              if (match := re.match(r"(?:relu|conv)(\d+)_", layer))]
    deepest = max(blocks, default=1)
    needed = 2 ** (deepest - 1)
    scale = min(1.0, style_size / max(width, height))
    short = max(1, round(min(width, height) * scale))
    if short >= needed:
        return None
    return (f"is {width}x{height}: with its long side at most {style_size} px its short side is {short} px, and "
            f"VGG's block {deepest} layers need at least {needed}; use a larger or less elongated image, or a larger style size (--style-size)")


_TORCHVISION_CFG = {"vgg16": "D", "vgg19": "E"}


def _empty_features(arch: str) -> nn.Sequential:
    """torchvision's ``features`` for ``arch`` with untrained weights (without building the huge classifier)."""
    if arch not in _TORCHVISION_CFG:
        raise VGGWeightsError(f"unknown VGG architecture {arch!r}; use vgg16 or vgg19")
    return vgg_module.make_layers(vgg_module.cfgs[_TORCHVISION_CFG[arch]])


def layer_names(arch: str) -> list[str]:
    """Names of torchvision's ``features`` modules in order: conv1_1, relu1_1, conv1_2, ..., pool5."""
    names, block, conv = [], 1, 0
    for entry in vgg_module.cfgs[_TORCHVISION_CFG[arch]]:
        if entry == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
    return names


@dataclass(frozen=True)
class VGGSource:
    """What a set of VGG weights is: architecture, how deep it goes, and how its input is normalised."""

    arch: str  # "vgg16" or "vgg19"
    origin: str  # "file:<path>" or "torchvision:<weights enum>"
    num_modules: int  # how many of ``features``' modules the weights cover
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    sha256: str | None = None
    names: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def available_layers(self) -> list[str]:
        return [name for name in self.names[: self.num_modules] if name.startswith("relu")]

    def default_layers(self) -> tuple[list[str], str]:
        """The seed's four style layers with content at the fourth; for truncated weights the best four it has."""
        available = self.available_layers()
        if all(layer in available for layer in JOHNSON_LAYERS):
            return list(JOHNSON_LAYERS), JOHNSON_LAYERS[-1]
        chosen = [layer for layer in GATYS_LAYERS if layer in available]
        for layer in reversed(available):  # fill up with the deepest layers not yet chosen
            if len(chosen) >= 4:
                break
            if layer not in chosen:
                chosen.append(layer)
        chosen.sort(key=available.index)
        return chosen, chosen[-1]

    def index_of(self, layer: str) -> int:
        if layer not in self.available_layers():
            raise VGGWeightsError(
                f"VGG layer {layer!r} is not in these weights ({self.origin}); "
                f"available: {', '.join(self.available_layers())}"
            )
        return self.names.index(layer)

    def describe(self) -> dict:
        return {"arch": self.arch, "origin": self.origin, "mean": list(self.mean), "std": list(self.std),
                "sha256": self.sha256, "deepest_layer": self.available_layers()[-1]}


class VGGFeatures(nn.Module):
    """Frozen VGG that maps RGB images in [0, 1] to a dict of the requested layers' activations."""

    def __init__(self, features: nn.Sequential, source: VGGSource, layers: list[str]):
        super().__init__()
        if not layers:
            raise VGGWeightsError("at least one VGG layer is needed")
        indices = {layer: source.index_of(layer) for layer in layers}
        self.source = source
        self.layers = list(layers)
        self._index_to_name = {index: name for name, index in indices.items()}
        self.features = features[: max(indices.values()) + 1]
        self.register_buffer("mean", torch.tensor(source.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(source.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGGFeatures":
        return super().train(False)  # always eval: it is a fixed measuring instrument

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images - self.mean) / self.std
        outputs = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self._index_to_name:
                outputs[self._index_to_name[index]] = x
        return outputs


WEIGHTS_VARIABLE = "STYLIZE_VGG_WEIGHTS"  # a weights file used where none is named (CLI, flows)


def load_vgg(weights: str | Path | None = None, arch: str = "vgg16") -> tuple[nn.Sequential, VGGSource]:
    """Load VGG ``features`` from a weights file, or torchvision's ImageNet weights when ``weights`` is None."""
    if weights is not None:
        return _load_from_file(Path(weights))
    return _load_from_torchvision(arch)


def build_vgg_features(weights: str | Path | None, layers: list[str], arch: str = "vgg16") -> VGGFeatures:
    features, source = load_vgg(weights, arch)
    return VGGFeatures(features, source, layers)


def _load_from_torchvision(arch: str) -> tuple[nn.Sequential, VGGSource]:
    if arch not in _TORCHVISION_CFG:
        raise VGGWeightsError(f"unknown VGG architecture {arch!r}; use vgg16 or vgg19")
    enum = {"vgg16": torchvision.models.VGG16_Weights, "vgg19": torchvision.models.VGG19_Weights}[arch]
    messages = io.StringIO()  # torch.hub announces its download on stderr; only worth showing if it worked
    try:
        with contextlib.redirect_stderr(messages):
            model = getattr(torchvision.models, arch)(weights=enum.IMAGENET1K_V1, progress=False)
    except Exception as error:  # offline, proxy, corrupt download: all mean "no weights here"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VGGWeightsError(f"torchvision's ImageNet {arch} weights could not be loaded ({reason})") from None
    sys.stderr.write(messages.getvalue())
    names = tuple(layer_names(arch))
    source = VGGSource(arch, f"torchvision:{enum.IMAGENET1K_V1}", len(model.features), names=names)
    return model.features, source


_KEY = re.compile(r"^(?:features\.)?(\d+)\.(weight|bias)$")


def _load_from_file(path: Path) -> tuple[nn.Sequential, VGGSource]:
    if not path.is_file():
        raise VGGWeightsError(f"VGG weights file not found: {path}")
    state = _read_state_dict(path)
    convs: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if not match:
            raise VGGWeightsError(f"{path} is not a VGG features state dict (unexpected key {key!r})")
        convs[f"{match.group(1)}.{match.group(2)}"] = tensor
    if not convs:
        raise VGGWeightsError(f"{path} holds no VGG tensors")
    description = _read_description(path)
    arch = _infer_arch(convs, description)
    deepest_conv = max(int(key.split(".")[0]) for key in convs)
    num_modules = deepest_conv + 2  # include the ReLU after the deepest convolution
    features = _empty_features(arch)[:num_modules]
    try:
        features.load_state_dict(convs, strict=True)
    except RuntimeError as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise VGGWeightsError(f"{path} does not match torchvision's {arch} layout: {first}") from None
    normalisation = description.get("input", {})
    source = VGGSource(
        arch=arch,
        origin=f"file:{path.resolve()}",
        num_modules=num_modules,
        mean=tuple(normalisation.get("mean", IMAGENET_MEAN)),
        std=tuple(normalisation.get("std", IMAGENET_STD)),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        names=tuple(layer_names(arch)),
    )
    return features, source


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with open(path, "rb") as file:
            start = file.read(4)
        if not start:
            raise VGGWeightsError(f"cannot read VGG weights {path}: the file is empty")
        if not (start.startswith(b"PK\x03\x04") or start[:1] == b"\x80"):  # torch.save's zip, or a bare pickle
            raise VGGWeightsError(f"{path} is not VGG weights: neither a PyTorch state dict (.pth) nor a "
                                  ".safetensors file")
        # weights_only=True uses PyTorch's restricted unpickler: tensors and containers only, never code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except VGGWeightsError:
        raise
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error).strip() else f"{type(error).__name__} (empty or truncated?)"
        if "Weights only load failed" in reason:  # its advice is to run the pickle's code: never here
            reason = "it holds more than tensors, and pickled objects are never loaded (save its state_dict())"
        raise VGGWeightsError(f"cannot read VGG weights {path}: {reason}") from None
    if not isinstance(state, dict):
        raise VGGWeightsError(f"{path} is not a state dict")
    return state


def _read_description(path: Path) -> dict:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise VGGWeightsError(f"cannot read the weights' description {sidecar}: {error}") from None


def _infer_arch(convs: dict[str, torch.Tensor], description: dict) -> str:
    text = str(description.get("architecture", "")).lower().replace("-", "")
    if "vgg19" in text:
        return "vgg19"
    if "vgg16" in text:
        return "vgg16"
    # The two share the first 16 modules; after that VGG-19 has a conv at 16 where VGG-16 has one at 17.
    if "16.weight" in convs:
        return "vgg19"
    if "17.weight" in convs:
        return "vgg16"
    return "vgg19"
