"""Batched stylisation: one forward pass per image, images of the same size batched together."""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import Iterable, Iterator

import torch

from .model import UNet


def autocast_for(device: torch.device):
    """bf16 (or fp16 where bf16 is missing) autocast on CUDA; nothing on CPU, where bf16 is very slow."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.inference_mode()
def stylize_batch(model: UNet, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 or [0, 1] float images, on the model's device, to uint8 stylised images on the same device."""
    device = next(model.parameters()).device
    batch = images.to(device, non_blocking=True)
    if batch.dtype == torch.uint8:
        batch = batch.float().div_(255)
    with autocast_for(device):
        output = model(batch)
    return output.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def stylize_images(
    model: UNet, images: Iterable[torch.Tensor], batch_size: int = 8, window: int = 4
) -> Iterator[torch.Tensor]:
    """Stylise a stream of (3, H, W) uint8 images, yielding (3, H, W) uint8 CPU results in input order.

    Up to ``batch_size * window`` images are read ahead and grouped by size, so a stream of mixed sizes
    still runs in full batches; memory stays bounded by that window.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    model.eval()
    chunk: list[torch.Tensor] = []
    for image in images:
        chunk.append(image)
        if len(chunk) == batch_size * window:
            yield from _stylize_chunk(model, chunk, batch_size)
            chunk = []
    if chunk:
        yield from _stylize_chunk(model, chunk, batch_size)


def _stylize_chunk(model: UNet, chunk: list[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(chunk):
        by_size[tuple(image.shape[-2:])].append(index)
    results: list[torch.Tensor | None] = [None] * len(chunk)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            group = indices[start : start + batch_size]
            outputs = stylize_batch(model, torch.stack([chunk[i] for i in group])).cpu()
            for index, output in zip(group, outputs):
                results[index] = output
    yield from results
