"""Stylising an image too large for one forward pass: in tiles, giving the same picture as one pass would.

A tile carries a margin of the network's receptive field on each side, which is cut away, so its kept centre
does not depend on where the tile ends. What tiles cannot see is the rest of the image, and instance (or group)
norm divides every feature map by the mean and variance of the *whole* map: tiles normalised on their own would
each get their own look, and seams. So the statistics are measured first, exactly, one norm layer at a time:
every tile runs up to that layer (the layers before it already normalised with the whole image's numbers), its
centre is added to the layer's sums, and the pass stops there. Then every tile runs through the whole network with
those numbers. That costs about six forward passes instead of one (the later layers' passes run most of the
network), but memory stays that of one forward pass of ``max_pixels``, whatever the image's size, and the output
equals the one-pass output (to rounding).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .model import UNet
from .stylize import stylize_batch


def stylize_tiled(model: UNet, image: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """(3, H, W) uint8 image on the model's device to its (3, H, W) uint8 stylisation, no forward pass over more
    than ``max_pixels`` (tiles and their margins)."""
    network = SharedStatisticsNetwork(model)
    tiles = list(split_into_tiles(*image.shape[-2:], max_pixels, receptive_margin(model), model.stride))
    network.measure(image, tiles)
    output = torch.empty_like(image, dtype=torch.uint8)
    for tile in tiles:
        result = stylize_batch(network, tile.of(image))[0]
        output[:, tile.top : tile.bottom, tile.left : tile.right] = result[:, tile.core_rows, tile.core_columns]
    return output


@dataclass(frozen=True)
class Tile:
    """Rows y0:y1 and columns x0:x1 go through the network; rows top:bottom, columns left:right are kept."""

    y0: int
    y1: int
    x0: int
    x1: int
    top: int
    bottom: int
    left: int
    right: int

    def of(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, self.y0 : self.y1, self.x0 : self.x1].unsqueeze(0)

    @property
    def core_rows(self) -> slice:
        return slice(self.top - self.y0, self.bottom - self.y0)

    @property
    def core_columns(self) -> slice:
        return slice(self.left - self.x0, self.right - self.x0)


def split_into_tiles(height: int, width: int, max_pixels: int, margin: int, stride: int) -> Iterator[Tile]:
    """Tiles whose centres cover the image once. Every tile starts on the stride grid, so its downsampled levels
    line up with the whole image's."""
    core = tile_core(max_pixels, margin, stride)
    for top in range(0, height, core):
        for left in range(0, width, core):
            yield Tile(max(top - margin, 0), min(top + core + margin, height), max(left - margin, 0),
                       min(left + core + margin, width), top, min(top + core, height), left, min(left + core, width))


def tile_core(max_pixels: int, margin: int, stride: int) -> int:
    """Side of a tile's kept centre: the largest multiple of the stride whose tile, margins included, fits."""
    side = math.isqrt(max_pixels) - 2 * margin
    return max(side // stride * stride, 4 * stride)


def receptive_margin(model: UNet) -> int:
    """Pixels of context each side of a tile's centre that make the centre independent of the tile's border:
    the reach of every 3x3 convolution at its level's scale, and of each resize, rounded up to the stride."""
    config = model.config
    convs_at = [0] * (config.depth + 1)  # 3x3 convolutions, by the level of their input
    convs_at[0] += 2 + 3 + 1  # stem, the last up block (up-conv + two), head
    for level in range(1, config.depth + 1):
        convs_at[level - 1] += 1  # the stride-2 convolution reads the level above
        convs_at[level] += 1
    for level in range(1, config.depth):
        convs_at[level] += 3
    if config.res_blocks:
        convs_at[config.res_level] += 2 * config.res_blocks
    reach = sum(count * 2**level for level, count in enumerate(convs_at)) + 2 * model.stride
    return -(-reach // model.stride) * model.stride


class SharedStatisticsNetwork(nn.Module):
    """A copy of ``model`` whose instance / group norm layers normalise with the whole image's statistics, measured
    by ``measure``, instead of each tile's own. The model itself is left untouched (other threads may be using it)."""

    def __init__(self, model: UNet):
        super().__init__()
        self.network = copy.deepcopy(model)
        self.norms: list[_SharedStatisticsNorm] = []
        for parent in list(self.network.modules()):
            for name, child in parent.named_children():
                if isinstance(child, (nn.InstanceNorm2d, nn.GroupNorm)):
                    shared = _SharedStatisticsNorm(child, self.network.padded_side)
                    setattr(parent, name, shared)
                    self.norms.append(shared)

    @torch.inference_mode()
    def measure(self, image: torch.Tensor, tiles: list[Tile]) -> None:
        """Each pass measures the first norm layer the forward pass meets that has no statistics yet."""
        for norm in self.norms:
            norm.mean = norm.var = norm.sums = None
        for _ in self.norms:
            for tile in tiles:
                for norm in self.norms:
                    norm.window = tile if norm.mean is None else None
                try:
                    stylize_batch(self, tile.of(image))
                except _StopForward:
                    pass
            next(norm for norm in self.norms if norm.sums is not None).finish()
        for norm in self.norms:
            norm.window = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


class _StopForward(Exception):
    """Raised by the norm layer being measured: nothing after it is needed in that pass."""


class _SharedStatisticsNorm(nn.Module):
    def __init__(self, norm: nn.InstanceNorm2d | nn.GroupNorm, padded_side: Callable[[int], int]):
        super().__init__()
        self.padded_side = padded_side
        self.groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else norm.num_features
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.window: Tile | None = None  # while measuring: the tile whose centre is added to the sums
        self.sums: torch.Tensor | None = None  # (3, groups): count, sum, sum of squares, in float64

    def finish(self) -> None:
        count, total, squares = self.sums
        self.mean = (total / count).float()
        self.var = (squares / count - (total / count) ** 2).clamp_min(0).float()
        self.window = self.sums = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        grouped = x.float().reshape(n, self.groups, c // self.groups, h, w)
        if self.window is not None:
            centre = _centre_at_level(grouped, self.window, self.padded_side).double()
            sums = torch.stack([torch.full_like(centre[0, :, 0, 0, 0], centre[0, 0].numel()),
                                centre.sum(dim=(0, 2, 3, 4)), centre.pow(2).sum(dim=(0, 2, 3, 4))])
            self.sums = sums if self.sums is None else self.sums + sums
            raise _StopForward
        if self.mean is None:
            raise RuntimeError("measure the statistics before stylising tiles")
        shape = (1, self.groups, 1, 1, 1)
        normalised = (grouped - self.mean.view(shape)) * torch.rsqrt(self.var.view(shape) + self.eps)
        out = normalised.reshape(n, c, h, w)
        if self.weight is not None:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out.to(x.dtype)


def _centre_at_level(grouped: torch.Tensor, tile: Tile, padded_side: Callable[[int], int]) -> torch.Tensor:
    """The part of a tile's feature map at some level that belongs to its centre. A centre at the image's bottom or
    right edge runs to the end of the map, taking in the rows and columns the network padded the image with, as the
    whole-image pass does."""
    row_scale = padded_side(tile.y1 - tile.y0) // grouped.shape[-2]  # 2 ** level
    column_scale = padded_side(tile.x1 - tile.x0) // grouped.shape[-1]
    rows = slice((tile.top - tile.y0) // row_scale,
                 None if tile.bottom == tile.y1 else (tile.bottom - tile.y0) // row_scale)
    columns = slice((tile.left - tile.x0) // column_scale,
                    None if tile.right == tile.x1 else (tile.right - tile.x0) // column_scale)
    return grouped[..., rows, columns]
