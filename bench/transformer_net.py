"""The peer model for benchmarks: Johnson, Alahi & Fei-Fei (2016) "TransformerNet", written from the paper's
description (instance-norm variant of Ulyanov et al.): a 9x9 stride-1 convolution, two 3x3 stride-2
downsampling convolutions, five residual blocks, two upsampling stages (nearest resize then 3x3 convolution,
the checkerboard fix) and a 9x9 output convolution. Benchmarks only; not part of the product."""

from __future__ import annotations

import torch
from torch import nn


class ConvLayer(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, upsample: bool = False):
        layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest")] if upsample else []
        layers += [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(in_channels, out_channels, kernel, stride)]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            ConvLayer(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True), nn.ReLU(inplace=True),
            ConvLayer(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TransformerNet(nn.Module):
    """RGB in [0, 1] to RGB in [0, 1]; H and W must be multiples of 4."""

    def __init__(self):
        super().__init__()

        def block(in_channels, out_channels, kernel, stride=1, upsample=False):
            return [ConvLayer(in_channels, out_channels, kernel, stride, upsample),
                    nn.InstanceNorm2d(out_channels, affine=True), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(
            *block(3, 32, 9), *block(32, 64, 3, 2), *block(64, 128, 3, 2),
            *[ResidualBlock(128) for _ in range(5)],
            *block(128, 64, 3, upsample=True), *block(64, 32, 3, upsample=True),
            ConvLayer(32, 3, 9),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(images))
