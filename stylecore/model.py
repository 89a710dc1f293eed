"""The stylisation network: a UNet without its longest skip connection.

A UNet's skips copy encoder features to the mirrored decoder level. The longest one carries the
full-resolution input features straight to the last decoder stage; with it the network can simply
copy its input, so the output stays too close to the photo (the original project removed it, as does
fastai's ``DynamicUnet(last_cross=False)``). Here the full-resolution decoder stage only sees
upsampled features, and the shorter skips keep the layout.

Upsampling is resize-then-convolve rather than transposed convolution, which is the known fix for
checkerboard artefacts (Odena et al., distill.pub 2016, "Deconvolution and Checkerboard Artifacts").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance", "group", "none")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the UNet. Saved with every checkpoint, so a model can be rebuilt from it."""

    base_channels: int = 16  # width of the full-resolution level; doubles at each level down
    # Number of 2x downsamplings; inputs are padded to a multiple of 2**depth. Two (bottom at 1/4, like Johnson
    # et al.'s network) reached the same distances as four at equal training time, for half the compute per
    # pixel (31k against 61k multiply-adds; bench/peer_quality.py, three seeds against two).
    depth: int = 2
    norm: str = "instance"
    max_channels: int = 256
    # Levels (from full resolution down) that are normalised; None = all. Instance norm at the 1/8 and 1/16
    # levels of a depth-4 net made round blobs in flat areas (sky, water): measured, see bench/peer_quality.py.
    norm_levels: int | None = 3
    # Decoder levels below this one get no skip from the encoder. Level 0 (the longest skip) never has one;
    # raising it leaves the decoder freer to restyle fine detail, at some cost in content.
    first_skip_level: int = 1
    # Residual blocks on the decoder's features at ``res_level`` (texture capacity where style lives, as in
    # Johnson et al.'s network, which puts five at 1/4 resolution); res_level == depth puts them on the bottleneck.
    res_blocks: int = 0
    res_level: int = 2

    # What a checkpoint written before a field existed meant by leaving it out.
    LEGACY = {"norm_levels": None, "first_skip_level": 1, "res_blocks": 0, "res_level": 2}

    def norm_at(self, level: int) -> str:
        return self.norm if self.norm_levels is None or level < self.norm_levels else "none"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, not {self.norm!r}")
        if not 1 <= self.depth <= 6:
            raise ValueError(f"depth must be between 1 and 6, not {self.depth}")
        if self.base_channels < 4:
            raise ValueError(f"base_channels must be at least 4, not {self.base_channels}")
        if self.norm_levels is not None and self.norm_levels < 0:
            raise ValueError(f"norm_levels must not be negative, not {self.norm_levels}")
        if not 1 <= self.first_skip_level <= self.depth:
            raise ValueError(f"first_skip_level must be between 1 and depth ({self.depth}), not {self.first_skip_level}")

        if self.res_blocks and not 0 <= self.res_level <= self.depth:
            raise ValueError(f"res_level must be between 0 and depth ({self.depth}), not {self.res_level}")

    def has_skip(self, level: int) -> bool:
        return level >= self.first_skip_level

    def channels(self, level: int) -> int:
        return min(self.base_channels * 2**level, self.max_channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        return cls(**{**cls.LEGACY, **data})


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions (reflection padded, so borders stay clean), each followed by norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride: int = 1):
        super().__init__(
            nn.ReflectionPad2d(1),
            nn.Conv2d(in_channels, out_channels, 3, stride=stride),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(out_channels, out_channels, 3),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Nearest-neighbour 2x upsampling, a 3x3 convolution, then a ConvBlock over [upsampled, skip]."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.up_conv = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(in_channels, out_channels, 3),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )
        self.merge = ConvBlock(out_channels + skip_channels, out_channels, norm)
        self.skip_channels = skip_channels

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.merge(x)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), make_norm(norm, channels), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), make_norm(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UNet(nn.Module):
    """Maps an RGB batch in [0, 1] (N, 3, H, W), any H and W, to a stylised RGB batch in [0, 1] of the same size."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c = config.channels
        self.stem = ConvBlock(3, c(0), config.norm_at(0))
        self.down = nn.ModuleList(
            ConvBlock(c(level - 1), c(level), config.norm_at(level), stride=2) for level in range(1, config.depth + 1)
        )
        # up[i] brings level i+1 up to level i. Level 0 (full resolution) gets no skip: that is the
        # longest skip, removed by design.
        self.up = nn.ModuleList(
            UpBlock(c(level + 1), c(level) if config.has_skip(level) else 0, c(level), config.norm_at(level))
            for level in range(config.depth)
        )
        level = config.res_level
        self.residual = nn.Sequential(*(ResidualBlock(c(level), config.norm_at(level)) for _ in range(config.res_blocks)))
        self.head = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c(0), 3, 3))

    @property
    def stride(self) -> int:
        return 2**self.config.depth

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        x = self._pad_to_stride(images)
        features = [self.stem(x)]
        for block in self.down:
            features.append(block(features[-1]))
        x = features[-1]
        if self.config.res_blocks and self.config.res_level == self.config.depth:  # on the bottleneck
            x = self.residual(x)
        for level in reversed(range(self.config.depth)):
            skip = features[level] if self.config.has_skip(level) else None
            x = self.up[level](x, skip)
            if level == self.config.res_level and self.config.res_blocks:
                x = self.residual(x)
        return torch.sigmoid(self.head(x))[..., :height, :width]

    def padded_side(self, side: int) -> int:
        """The side an input of this side is padded to: a multiple of the stride, and at least twice it, so every
        level stays at least 2 pixels wide for its reflection padding."""
        return max(-(-side // self.stride) * self.stride, 2 * self.stride)

    def _pad_to_stride(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        pad_h = self.padded_side(height) - height
        pad_w = self.padded_side(width) - width
        if pad_h == 0 and pad_w == 0:
            return images
        # Reflection needs the pad to be smaller than the side; tiny images fall back to replicate.
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        return F.pad(images, (0, pad_w, 0, pad_h), mode=mode)
